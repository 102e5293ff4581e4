"""The cases of docs/reliability.md and the check that each gives one line, exit 2, no damage.

Each case runs the command line in a child process. The message printed must
equal the one documented for the case, after the temporary paths are replaced
by placeholders, and every file that existed before (a finished run, the input
files) must be unchanged afterwards.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, run_cli

DOC = os.path.join(REPO_ROOT, "docs", "reliability.md")
CLASSIFICATION = "--config=configs/fashion_mnist_kd.py:tiny"
LANGUAGE_MODEL = "--config=configs/gemma3_270m_distill.py:tiny"


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input: the flags, and files it needs, with `{name}` placeholders."""
  args: tuple[str, ...]
  # Writes the case's input files under the test's temporary directory, given
  # (that directory, the Gemma 3 GGUF path, the finished run's workdir).
  setup: Callable[..., None] | None = None
  # Runs the case itself instead of one command, for inputs that change mid-run.
  run: Callable[..., subprocess.CompletedProcess] | None = None


# --- files the cases read ----------------------------------------------------


def write_truncated_gguf(tmp, gemma, existing):
  with open(gemma, "rb") as source, open(tmp / "truncated.gguf", "wb") as target:
    target.write(source.read(1 << 20))


def write_garbage(tmp, name):
  (tmp / name).write_bytes(np.random.default_rng(0).bytes(4096))


def tiny_gemma3_model(gguf=True):
  """A 4-layer Gemma 3 of width 32 with the packaged tokenizer's 262144-row vocabulary."""
  from test_gemma3 import TINY, _gguf_config, _tiny_model  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(TINY, vocab_size=262144)
  return _tiny_model(config=_gguf_config(config) if gguf else config)


def write_other_architecture_gguf(tmp, gemma, existing):
  from test_gemma3 import _write_gguf  # pylint: disable=g-import-not-at-top

  _write_gguf(tmp / "llama.gguf", tiny_gemma3_model(), architecture="llama")


def write_gguf_without_tensor(tmp, gemma, existing):
  from test_gemma3 import _write_gguf  # pylint: disable=g-import-not-at-top

  _write_gguf(tmp / "incomplete.gguf", tiny_gemma3_model(), drop=("blk.2.ffn_up.weight",))


def write_safetensors(tmp, gemma, *, drop=(), model_type=None, truncate=False):
  import json  # pylint: disable=g-import-not-at-top

  from test_gemma3 import _write_safetensors  # pylint: disable=g-import-not-at-top

  directory = tmp / "hf"
  directory.mkdir()
  path = _write_safetensors(str(directory), tiny_gemma3_model(gguf=False), drop=drop)
  if truncate:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
  if model_type:
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = model_type
    config_path.write_text(json.dumps(config))


def write_corrupt_safetensors(tmp, gemma, existing):
  write_safetensors(tmp, gemma)
  (tmp / "hf" / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not a header")


def write_texts(tmp, gemma, existing):
  """GNU standards files whose only paragraph falls in the train split."""
  directory = tmp / "texts"
  directory.mkdir()
  paragraph = ("Every program should print a clear message on bad input, naming the value "
               "and the way to fix it, then exit with a non-zero status.")
  for name in ("standards.text.gz", "maintain.text.gz"):
    with gzip.open(directory / name, "wt", encoding="utf-8") as f:
      f.write(paragraph + "\n")


def copy_run_with_other_model_checkpoints(tmp, gemma, existing):
  """Copy the finished run to TMP/run with the teacher's checkpoints in place of the student's."""
  shutil.copytree(existing, tmp / "run")
  shutil.rmtree(tmp / "run" / "checkpoints" / "distill")
  shutil.copytree(tmp / "run" / "checkpoints" / "teacher", tmp / "run" / "checkpoints" / "distill")


def make_empty_directory(tmp, gemma, existing):
  (tmp / "empty").mkdir()


def write_blocker(tmp, gemma, existing):
  (tmp / "blocker").write_text("keep me")


# --- cases that need a mount -------------------------------------------------


@contextlib.contextmanager
def tmpfs(path, size, *options):
  """Mount a tmpfs of `size` at `path`; skips the test where mounting is not permitted."""
  path.mkdir(parents=True, exist_ok=True)
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}",) + options),
                          "tmpfs", str(path)], capture_output=True, text=True, check=False)
  if mount.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}); run as root")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def run_read_only_workdir(tmp, tfds, **unused):
  with tmpfs(tmp / "read_only", "1m", "ro"):
    return run_cli(CLASSIFICATION, f"--workdir={tmp / 'read_only'}",
                   f"--config.data.data_dir={tfds}")


def fill(directory, leave_bytes):
  """Fill the file system of `directory` up to `leave_bytes` of free space; return the file."""
  path = os.path.join(directory, "filler")
  with open(path, "wb") as f:
    while True:
      free = shutil.disk_usage(directory).free - leave_bytes
      if free <= 0:
        return path
      f.write(b"\0" * min(free, 1 << 20))
      f.flush()


def stop_after_first_step(args):
  """Run the command until it logs a step, then stop it with SIGTERM; return its log."""
  process = subprocess.Popen([sys.executable, "-m", "distill_jax.main", *args], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stderr:
    lines.append(line)
    if re.search(r"teacher step \d+/", line):
      process.terminate()
      break
  lines += process.stderr.readlines()
  process.wait(timeout=300)
  output = "".join(lines)
  assert process.returncode == 0, output[-3000:]
  return output


def run_disk_full(tmp, tfds, **unused):
  """Save a checkpoint, fill the disk and rerun; then, with space again, resume."""
  workdir = tmp / "small_disk" / "run"
  args = (CLASSIFICATION, f"--workdir={workdir}", f"--config.data.data_dir={tfds}",
          "--config.teacher.train.steps=100000", "--config.checkpoint.every_steps=3",
          "--config.eval_every_steps=100000")
  with tmpfs(tmp / "small_disk", "8m"):
    stop_after_first_step(args)
    checkpoints = workdir / "checkpoints" / "teacher"
    saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    # Room for the logs and config.json, not for another checkpoint.
    filler = fill(tmp / "small_disk", leave_bytes=300_000)
    result = run_cli(*args)
    assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == saved

    os.remove(filler)
    resumed = stop_after_first_step(args)
  assert f"teacher: resuming at step {saved[-1]} of 100000" in resumed, resumed[-3000:]
  assert "skipped the checkpoint" not in resumed, resumed[-3000:]
  return result


# --- the cases -----------------------------------------------------------------

CASES = {
    # Config values of the classification recipe, against a finished run's workdir.
    "unknown-key": Case((CLASSIFICATION, "--workdir={existing}",
                         "--config.distill.temperatur=2")),
    "wrong-type": Case((CLASSIFICATION, "--workdir={existing}",
                        "--config.student.train.steps=abc")),
    "temperature-zero": Case((CLASSIFICATION, "--workdir={existing}",
                              "--config.distill.temperature=0")),
    "temperature-negative": Case((CLASSIFICATION, "--workdir={existing}",
                                  "--config.distill.temperature=-1")),
    "alpha-above-one": Case((CLASSIFICATION, "--workdir={existing}",
                             "--config.distill.alpha=1.5")),
    "beta-below-zero": Case((CLASSIFICATION, "--workdir={existing}",
                             "--config.distill.beta=-0.1")),
    "unknown-divergence": Case((CLASSIFICATION, "--workdir={existing}",
                                "--config.distill.divergence=kl2")),
    "mesh-not-dividing-devices": Case((CLASSIFICATION, "--workdir={existing}",
                                       "--config.mesh.data=3")),
    "batch-not-divisible": Case((CLASSIFICATION, "--workdir={existing}",
                                 "--config.student.train.batch_size=30")),
    "learning-rate-negative": Case((CLASSIFICATION, "--workdir={existing}",
                                    "--config.teacher.train.learning_rate=-0.1")),
    "unknown-model": Case((CLASSIFICATION, "--workdir={existing}",
                           "--config.student.model.name=transformer")),
    "unknown-nonfinite-policy": Case((CLASSIFICATION, "--workdir={existing}",
                                      "--config.nonfinite_policy=ignore")),
    "steps-zero": Case((CLASSIFICATION, "--workdir={existing}",
                        "--config.student.train.steps=0")),
    "unknown-variant": Case(("--config=configs/fashion_mnist_kd.py:bogus",
                             "--workdir={existing}")),
    "missing-recipe-file": Case(("--config=configs/missing.py", "--workdir={existing}")),
    "missing-workdir-flag": Case((CLASSIFICATION,)),
    # Config values of the language-model recipe.
    "lm-temperature-zero": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                 "--config.distill.temperature=0.0")),
    "lm-alpha-above-one": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                "--config.distill.alpha=1.5")),
    "lm-beta-below-zero": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                "--config.distill.beta=-0.5")),
    "lm-top-k-below-one": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                "--config.distill.top_k=-2")),
    "lm-top-k-zero-with-cache": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                      "--config.distill.top_k=0")),
    "lm-top-k-above-vocabulary": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                       "--config.data.data_dir={tmp}/tfds",
                                       "--config.distill.top_k=300000")),
    "lm-mesh-not-dividing-devices": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                          "--config.mesh.data=3")),
    "lm-batch-not-divisible": Case((LANGUAGE_MODEL, "--workdir={existing}",
                                    "--config.student.train.batch_size=3")),
    "lm-wrong-type": Case((LANGUAGE_MODEL, "--workdir={existing}",
                           "--config.data.seq_len=long")),
    "lm-unknown-source": Case((LANGUAGE_MODEL, "--workdir={existing}",
                               "--config.data.sources=('wikipedia',)")),
    # Teacher and checkpoint files.
    "gguf-missing": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                          "--config.teacher.path={tmp}/missing.gguf")),
    "gguf-truncated": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                            "--config.teacher.path={tmp}/truncated.gguf"),
                           setup=write_truncated_gguf),
    "gguf-corrupt": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                          "--config.teacher.path={tmp}/garbage.gguf"),
                         setup=lambda tmp, gemma, existing: write_garbage(tmp, "garbage.gguf")),
    "gguf-other-architecture": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                     "--config.teacher.path={tmp}/llama.gguf"),
                                    setup=write_other_architecture_gguf),
    "gguf-missing-tensor": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                 "--config.data.data_dir={tmp}/tfds",
                                 "--config.teacher.path={tmp}/incomplete.gguf",
                                 "--config.tokenizer.gguf_path={gemma}"),
                                setup=write_gguf_without_tensor),
    "safetensors-missing": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                 "--config.teacher.format=safetensors",
                                 "--config.teacher.path={tmp}/hf/model.safetensors")),
    "safetensors-truncated": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                   "--config.teacher.format=safetensors",
                                   "--config.teacher.path={tmp}/hf/model.safetensors",
                                   "--config.tokenizer.gguf_path={gemma}"),
                                  setup=lambda tmp, gemma, existing: write_safetensors(tmp, gemma,
                                                                             truncate=True)),
    "safetensors-corrupt": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                 "--config.teacher.format=safetensors",
                                 "--config.teacher.path={tmp}/hf/model.safetensors",
                                 "--config.tokenizer.gguf_path={gemma}"),
                                setup=write_corrupt_safetensors),
    "safetensors-missing-tensor": Case(
        (LANGUAGE_MODEL, "--workdir={tmp}/run", "--config.data.data_dir={tmp}/tfds",
         "--config.teacher.format=safetensors", "--config.teacher.path={tmp}/hf/model.safetensors",
         "--config.tokenizer.gguf_path={gemma}"),
        setup=lambda tmp, gemma, existing: write_safetensors(tmp, gemma,
                                                   drop=("model.layers.1.mlp.up_proj.weight",))),
    "safetensors-other-architecture": Case(
        (LANGUAGE_MODEL, "--workdir={tmp}/run", "--config.teacher.format=safetensors",
         "--config.teacher.path={tmp}/hf/model.safetensors", "--config.tokenizer.gguf_path={gemma}"),
        setup=lambda tmp, gemma, existing: write_safetensors(tmp, gemma, model_type="llama")),
    "teacher-checkpoint-other-model": Case(
        (CLASSIFICATION, "--workdir={tmp}/run", "--config.data.data_dir={tfds}",
         "--config.teacher.checkpoint_dir={existing}/checkpoints/teacher",
         "--config.teacher.model.stage_widths=(8,16)")),
    "workdir-checkpoint-other-model": Case(
        (CLASSIFICATION, "--workdir={tmp}/run", "--config.data.data_dir={tfds}"),
        setup=copy_run_with_other_model_checkpoints),
    "teacher-checkpoint-empty": Case(
        (CLASSIFICATION, "--workdir={tmp}/run", "--config.data.data_dir={tfds}",
         "--config.teacher.checkpoint_dir={tmp}/empty"), setup=make_empty_directory),
    "teacher-checkpoint-not-directory": Case(
        (CLASSIFICATION, "--workdir={existing}",
         "--config.teacher.checkpoint_dir={tmp}/no_such_dir")),
    # Data.
    "no-dataset-source": Case((CLASSIFICATION, "--workdir={tmp}/run",
                               "--config.data.source=debian",
                               "--config.data.data_dir={tmp}/tfds",
                               "--config.data.fashion_mnist_dir={tmp}/no_such_dir")),
    "lm-no-text-source": Case((LANGUAGE_MODEL, "--workdir={existing}",
                               "--config.data.sources=()")),
    "lm-empty-split": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                            "--config.data.data_dir={tmp}/tfds",
                            "--config.data.sources=('gnu_standards',)",
                            "--config.data.text_dir={tmp}/texts"), setup=write_texts),
    "lm-sequence-longer-than-context": Case((LANGUAGE_MODEL, "--workdir={tmp}/run",
                                             "--config.data.data_dir={tmp}/tfds",
                                             "--config.data.seq_len=40000")),
    # The environment.
    "workdir-is-file": Case((CLASSIFICATION, "--workdir={tmp}/blocker"), setup=write_blocker),
    "workdir-under-file": Case((CLASSIFICATION, "--workdir={tmp}/blocker/run"),
                               setup=write_blocker),
    "workdir-read-only": Case((), run=run_read_only_workdir),
    "disk-full-during-save": Case((), run=run_disk_full),
    "workdir-of-other-config": Case((CLASSIFICATION, "--workdir={existing}",
                                     "--config.data.data_dir={tfds}",
                                     "--config.distill.alpha=0.5")),
}


# --- the checks ---------------------------------------------------------------


def documented_messages():
  """Return {case: message} from the table rows of docs/reliability.md."""
  messages = {}
  with open(DOC, encoding="utf-8") as f:
    for line in f:
      match = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|.*\|\s*`` (distill-jax: error: .*) ``\s*\|\s*$",
                       line)
      if match:
        messages[match.group(1)] = match.group(2).replace("\\|", "|")
  return messages


def message_pattern(documented):
  """Turn a documented message into a regex; `...` stands for any text."""
  return "".join(".*" if part == "..." else re.escape(part)
                 for part in re.split(r"(\.\.\.)", documented))


def snapshot(*roots):
  """Return {path: sha256} of every file under `roots`."""
  digests = {}
  for root in roots:
    for directory, _, names in os.walk(root):
      for name in names:
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          digests[path] = hashlib.sha256(f.read()).hexdigest()
  return digests


def is_config_case(case):
  """Whether a case fails on its flags alone, before any input file is read."""
  return (case.setup is None and case.run is None
          and not any("{tmp}" in arg for arg in case.args))


def check_case(name, tiny_run, tfds_data_dir, gemma_gguf, tmp_path):
  """Run case `name` and check its exit code, its one error line and the files before it."""
  existing, _, first = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  case = CASES[name]
  if case.setup is not None:
    case.setup(tmp_path, gemma_gguf, existing)
  before = snapshot(existing, tmp_path)

  if case.run is not None:
    result = case.run(tmp_path, tfds_data_dir)
  else:
    placeholders = dict(existing=existing, tmp=tmp_path, tfds=tfds_data_dir, gemma=gemma_gguf)
    result = run_cli(*(arg.format(**placeholders) for arg in case.args))

  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  # Log lines of the work done before the error may precede it.
  errors = [line for line in result.stderr.splitlines() if line.startswith("distill-jax:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
  message = (errors[0].replace(str(existing), "WORKDIR").replace(str(tmp_path), "TMP")
             .replace(gemma_gguf, "GEMMA_GGUF").replace(tfds_data_dir, "TFDS"))
  documented = documented_messages()[name]
  assert re.fullmatch(message_pattern(documented), message), (message, documented)
  after = snapshot(existing, tmp_path)
  changed = sorted(path for path, digest in before.items() if after.get(path) != digest)
  assert not changed, changed
