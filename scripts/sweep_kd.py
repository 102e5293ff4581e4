r"""Sweep distillation hyperparameters against one trained teacher.

Runs the recipe once per (temperature, alpha) pair with the teacher restored
from TEACHER_DIR, so only the student is trained, and prints a Markdown table
of the distilled student's test accuracy and KL to the teacher, with the
baseline's. Each run keeps its own workdir, so an interrupted sweep resumes.

    .venv/bin/python scripts/sweep_kd.py \
        --teacher_dir=workdirs/fashion_mnist_kd/checkpoints/teacher \
        --workdir=workdirs/sweep --temperatures=1,2,4,8 --alphas=0.5,0.9
"""

import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

_TEACHER_DIR = flags.DEFINE_string("teacher_dir", None, "Orbax directory of a trained teacher.",
                                   required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs.", required=True)
_CONFIG = flags.DEFINE_string("config", "configs/fashion_mnist_kd.py", "Recipe file.")
_TEMPERATURES = flags.DEFINE_list("temperatures", ["1", "2", "4", "8"], "Temperatures to try.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.5", "0.9"], "Teacher-term weights to try.")
_EXTRA = flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE for every run.")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(workdir: str, temperature: str, alpha: str, baseline: bool) -> dict:
  command = [sys.executable, "-m", "distill_jax.main", f"--config={_CONFIG.value}",
             f"--workdir={workdir}", f"--config.teacher.checkpoint_dir={_TEACHER_DIR.value}",
             f"--config.distill.temperature={temperature}", f"--config.distill.alpha={alpha}",
             f"--config.run_baseline={baseline}", *_EXTRA.value]
  started = time.perf_counter()
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
  print(f"finished T={temperature} alpha={alpha} in {time.perf_counter() - started:.0f} s",
        file=sys.stderr)
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


def main(argv):
  del argv
  rows = []
  baseline = None
  for index, (temperature, alpha) in enumerate(itertools.product(_TEMPERATURES.value,
                                                                 _ALPHAS.value)):
    workdir = os.path.join(_WORKDIR.value, f"t{temperature}_a{alpha}")
    report = run_one(workdir, temperature, alpha, baseline=index == 0)
    if index == 0:
      baseline = report["models"]["baseline_student"]
    distilled = report["models"]["distilled_student"]
    rows.append((temperature, alpha, distilled["test_accuracy"], distilled["kl_teacher_student"],
                 distilled["top1_agreement_with_teacher"]))

  print("| temperature | alpha | distilled accuracy | KL(teacher ‖ student) | top-1 agreement |")
  print("|---:|---:|---:|---:|---:|")
  for temperature, alpha, accuracy, kl, agreement in rows:
    print(f"| {temperature} | {alpha} | {accuracy:.2%} | {kl:.4f} | {agreement:.2%} |")
  print(f"| baseline | – | {baseline['test_accuracy']:.2%} | {baseline['kl_teacher_student']:.4f} "
        f"| {baseline['top1_agreement_with_teacher']:.2%} |")


if __name__ == "__main__":
  app.run(main)
