"""The language-model recipe: a pretrained teacher distilled into a smaller decoder.

One command runs, each part resumable:
  1. load the teacher (GGUF or safetensors) and its tokenizer, and pack the
     configured text sources into fixed-length rows;
  2. with `distill.source="cache"`, run the teacher once over the training
     rows and write its top-k distributions to WORKDIR/teacher_cache (or
     reuse a cache whose manifest matches);
  3. distill: train the student against the teacher, online or from the cache;
  4. baseline: train the same student, from the same initial parameters, on
     next-token cross-entropy for the same steps;
  5. report: perplexity, KL to the teacher, next-token agreement, calibration,
     speed, memory, parameters and greedy continuations of fixed prompts.
"""

from collections.abc import Mapping
import dataclasses
import functools
import os
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from distill_jax import evaluation
from distill_jax.evaluation import lm_report
from distill_jax import parallel
from distill_jax.checkpoints import gemma3_import
from distill_jax.data import packing
from distill_jax.data import teacher_cache as cache_lib
from distill_jax.data import text_datasets
from distill_jax.data import vocabulary
from distill_jax.data.pipeline import make_train_loader
from distill_jax.data.tokenizer import Tokenizer
from distill_jax.data.tokenizer import tokenizer_from_gguf
from distill_jax.errors import ConfigError
from distill_jax.losses import token_level
from distill_jax.models import gemma3
from distill_jax.models import student_init
from distill_jax.training import lm_steps
from distill_jax.training import loop
from distill_jax.training import preemption
from distill_jax.training import workdir as workdir_lib

# Student config keys that map onto `Gemma3Config` fields.
STUDENT_SIZE_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "sliding_window", "global_every")


@dataclasses.dataclass
class LMData:
  """Packed training and validation rows with the tokenizer that produced them."""
  tokenizer: Tokenizer
  train: packing.PackedTokens
  validation: packing.PackedTokens
  name: str


def teacher_file(teacher_config: Mapping[str, Any]) -> str:
  """Return the teacher's weights file: the configured path or the packaged Gemma 3 270M."""
  path = teacher_config["path"] or gemma3_import.default_gemma3_270m_gguf()
  return os.path.expanduser(path)


def read_teacher_config(teacher_config: Mapping[str, Any], path: str) -> gemma3.Gemma3Config:
  """Read the teacher's model config from its file, without loading the weights."""
  if teacher_config["format"] == "gguf":
    return gemma3_import.read_gemma3_gguf_config(path)
  return gemma3_import.read_gemma3_safetensors_config(path)


def load_teacher(teacher_config: Mapping[str, Any], path: str) -> gemma3.Gemma3Decoder:
  """Load the teacher's weights from `path`."""
  started = time.perf_counter()
  if teacher_config["format"] == "gguf":
    model_config, model = gemma3_import.load_gemma3_gguf(path)
  else:
    model_config, model = gemma3_import.load_gemma3_safetensors(path)
  logging.info("loaded the teacher from %s in %.1f s: %d layers, d_model %d, vocabulary %d",
               path, time.perf_counter() - started, model_config.num_layers,
               model_config.d_model, model_config.vocab_size)
  return model


def load_tokenizer(config: Mapping[str, Any], teacher_path: str) -> Tokenizer:
  """Rebuild the tokenizer from `tokenizer.gguf_path`, or from the teacher's GGUF."""
  path = config["tokenizer"]["gguf_path"]
  if not path:
    if config["teacher"]["format"] != "gguf":
      raise ConfigError("config.tokenizer.gguf_path is empty and the teacher is not a GGUF "
                        "file; set it to a GGUF file with the teacher's tokenizer")
    path = teacher_path
  return tokenizer_from_gguf(os.path.expanduser(path))


def load_data(config: Mapping[str, Any], tokenizer: Tokenizer, max_seq_len: int) -> LMData:
  """Load every configured text source, mix the records and pack them into rows."""
  data_config = config["data"]
  seq_len = int(data_config["seq_len"])
  if seq_len > max_seq_len:
    raise ConfigError(f"config.data.seq_len={seq_len} exceeds the model's context of "
                      f"{max_seq_len} tokens; lower it")

  train_records, validation_records, names = [], [], []
  for source in data_config["sources"]:
    splits = text_datasets.load_text_splits(
        source, os.path.expanduser(data_config["data_dir"]),
        generators=[dict(g) for g in data_config["generators"]],
        text_dir=data_config["text_dir"])
    train_records += splits.train
    validation_records += splits.validation
    names.append(splits.name)

  # A fixed shuffle mixes the sources within rows; packing keeps this order.
  random.Random(int(config["seed"])).shuffle(train_records)
  random.Random(int(config["seed"]) + 1).shuffle(validation_records)
  max_train_rows = int(data_config["max_train_rows"]) or None
  max_eval_rows = int(data_config["max_eval_rows"]) or None
  train = packing.pack_records(train_records, tokenizer, seq_len, max_rows=max_train_rows)
  validation = packing.pack_records(validation_records, tokenizer, seq_len,
                                    max_rows=max_eval_rows)
  logging.info("data %s: %d train rows (%d target tokens), %d validation rows (%d target "
               "tokens) of %d tokens", "+".join(names), len(train), train.target_tokens(),
               len(validation), validation.target_tokens(), seq_len)
  return LMData(tokenizer, train, validation, "+".join(names))


def student_model_config(config: Mapping[str, Any],
                         teacher_config: gemma3.Gemma3Config) -> gemma3.Gemma3Config:
  """Return the student's `Gemma3Config`: the teacher's, with the configured sizes."""
  student_config = config["student"]
  overrides = {key: int(student_config[key]) for key in STUDENT_SIZE_KEYS}
  overrides["vocab_size"] = int(student_config["vocab_size"]) or teacher_config.vocab_size
  try:
    return dataclasses.replace(teacher_config, **overrides)
  except ValueError as error:
    raise ConfigError(f"invalid config.student: {error}") from None


def build_student(config: Mapping[str, Any], model_config: gemma3.Gemma3Config,
                  teacher: gemma3.Gemma3Decoder) -> gemma3.Gemma3Decoder:
  """Build the student from scratch or from every k-th teacher layer."""
  if config["student"]["init"] == "teacher":
    return student_init.init_student_from_teacher(teacher, model_config)
  return gemma3.Gemma3Decoder(model_config, rngs=nnx.Rngs(int(config["seed"]) + 1))


def _batches_of_rows(rows: int, batch_size: int):
  for first in range(0, rows, batch_size):
    yield first, np.arange(first, min(first + batch_size, rows))


def _pad_rows(packed: packing.PackedTokens, indices: np.ndarray, batch_size: int
              ) -> dict[str, np.ndarray]:
  """Gather rows `indices` and pad the batch with empty rows to `batch_size`."""
  batch = {name: getattr(packed, name)[indices] for name in packing.FIELDS}
  missing = batch_size - len(indices)
  if missing:
    batch = {name: np.concatenate([value, np.zeros((missing,) + value.shape[1:], value.dtype)])
             for name, value in batch.items()}
  return batch


def teacher_cache_dir(config: Mapping[str, Any], workdir: str) -> str:
  return os.path.expanduser(config["teacher_cache"]["dir"]) or os.path.join(workdir,
                                                                            "teacher_cache")


def teacher_cache_spec(config: Mapping[str, Any], data: LMData, teacher_path: str,
                       vocab_size: int) -> cache_lib.CacheSpec:
  """Describe the cache this run needs, for writing it or checking an existing one."""
  distill_config = config["distill"]
  return cache_lib.CacheSpec(
      teacher_sha256=cache_lib.file_sha256(teacher_path),
      tokenizer_sha256=data.tokenizer.fingerprint, vocab_size=vocab_size,
      top_k=int(distill_config["top_k"]), temperature=float(distill_config["temperature"]),
      seq_len=data.train.seq_len, packing=packing.PACKING,
      dataset_fingerprint=data.train.fingerprint(), rows=len(data.train))


def write_teacher_cache(config: Mapping[str, Any], directory: str, spec: cache_lib.CacheSpec,
                        data: LMData, teacher: gemma3.Gemma3Decoder,
                        mesh: jax.sharding.Mesh) -> cache_lib.TeacherCacheSource:
  """Run the teacher over every training row and write its top-k to `directory`."""
  graphdef, params = nnx.split(teacher, nnx.Param)
  params = jax.device_put(params, parallel.replicated_sharding(mesh))
  batch_size = int(config["teacher_cache"]["batch_size"])
  chunk_size = int(config["distill"]["vocab_chunk_size"])

  @jax.jit
  def top_k_fn(params, batch):
    hidden, embedding, model_config = lm_steps.final_hidden(graphdef, params, batch)
    return token_level.chunked_top_k(
        hidden, embedding[:spec.vocab_size], spec.top_k, temperature=spec.temperature,
        chunk_size=chunk_size, softcap=model_config.final_logit_softcap)

  def compute_top_k(indices: np.ndarray):
    batch = parallel.global_batch_from_local(_pad_rows(data.train, indices, batch_size), mesh)
    ids, log_probs = top_k_fn(params, batch)
    shape = (batch_size, spec.seq_len, spec.top_k)
    ids, log_probs = np.asarray(ids).reshape(shape), np.asarray(log_probs).reshape(shape)
    return ids[:len(indices)], log_probs[:len(indices)]

  def batches_until_stopped():
    for first_row, indices in _batches_of_rows(spec.rows, batch_size):
      signal_name = preemption.stop_requested()
      if signal_name is not None:
        raise preemption.RunStopped(
            f"stopped writing the teacher cache at row {first_row} of {spec.rows} after "
            f"{signal_name}; the next run writes it again from the start")
      yield first_row, indices

  # NOTE: every process writes the whole cache; on a multi-host run point
  # teacher_cache.dir at a per-host directory or a cache written beforehand.
  logging.info("writing the teacher cache to %s: %d rows, top-%d at temperature %g", directory,
               spec.rows, spec.top_k, spec.temperature)
  return cache_lib.write_teacher_cache(directory, spec, batches_until_stopped(), compute_top_k,
                                       rows_per_shard=int(config["teacher_cache"]["rows_per_shard"]))


class ValidationSet:
  """Validation batches and the teacher's hidden states on them, computed once."""

  def __init__(self, data: LMData, batch_size: int, mesh: jax.sharding.Mesh,
               teacher: loop.Teacher, vocab_size: int, chunk_size: int):
    self.mesh = mesh
    self.teacher = teacher
    self.vocab_size = vocab_size
    self.chunk_size = chunk_size
    self.batches = [
        _pad_rows(data.validation, indices, batch_size)
        for _, indices in _batches_of_rows(len(data.validation), batch_size)
    ]
    hidden_fn = jax.jit(lambda params, batch: lm_steps.final_hidden(
        teacher.graphdef, params, batch)[0])
    self.teacher_hidden = [hidden_fn(teacher.params, self._device_batch(batch))
                           for batch in self.batches]

  def _device_batch(self, batch):
    return parallel.global_batch_from_local(batch, self.mesh)

  def evaluate(self, graphdef: nnx.GraphDef, params: nnx.State) -> dict[str, float]:
    """Return validation perplexity, KL, agreement and calibration of a student."""
    eval_fn = _jitted_lm_eval(graphdef, self.teacher.graphdef, self.vocab_size, self.chunk_size)
    sums = None
    for batch, teacher_hidden in zip(self.batches, self.teacher_hidden):
      batch_sums = eval_fn(params, teacher_hidden, self.teacher.params,
                           self._device_batch(batch))
      sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
    return lm_steps.finalize_lm_sums(jax.device_get(sums))


@functools.lru_cache(maxsize=8)
def _jitted_lm_eval(student_graphdef, teacher_graphdef, vocab_size, chunk_size):
  return jax.jit(functools.partial(lm_steps.lm_eval_sums, student_graphdef=student_graphdef,
                                   teacher_graphdef=teacher_graphdef, vocab_size=vocab_size,
                                   chunk_size=chunk_size))


def _train_iterator_factory(source, data_config):
  def make_train_iterator(batch_size: int, seed: int):
    return iter(make_train_loader(source, batch_size, seed,
                                  worker_count=int(data_config["worker_count"]),
                                  scale_images=False))
  return make_train_iterator


def run(config: Any, workdir: str, overwrite: bool = False) -> dict[str, Any]:
  """Run every stage of the language-model recipe in `workdir`; return the report.

  With `teacher_cache.only`, stop once the teacher cache is written or
  verified and return `{"teacher_cache": directory, "timings": ...}`. With
  `overwrite`, a run of a different config found in `workdir` is deleted first.
  """
  started = time.perf_counter()
  workdir = workdir_lib.prepare_workdir(
      workdir, config.to_json_best_effort(indent=2, sort_keys=True),
      write=jax.process_index() == 0, overwrite=overwrite)
  mesh = parallel.make_mesh(config["mesh"])

  # Every check that needs no weights runs before the teacher is loaded.
  teacher_path = teacher_file(config["teacher"])
  teacher_config = read_teacher_config(config["teacher"], teacher_path)
  tokenizer = load_tokenizer(config, teacher_path)
  data = load_data(config, tokenizer, teacher_config.max_seq_len)
  student_config = student_model_config(config, teacher_config)
  vocab_size = vocabulary.shared_vocab_size(
      teacher_rows=teacher_config.vocab_size, student_rows=student_config.vocab_size,
      teacher_tokenizer=tokenizer.fingerprint, student_tokenizer=tokenizer.fingerprint,
      tokenizer_size=tokenizer.vocab_size)
  distill_config = config["distill"]
  loss = token_level.TokenDistillationLoss(
      divergence=distill_config["divergence"], temperature=float(distill_config["temperature"]),
      beta=float(distill_config["beta"]), top_k=int(distill_config["top_k"]),
      vocab_chunk_size=int(distill_config["vocab_chunk_size"]))
  loss.check_vocab_size(vocab_size)
  mode = "cached" if distill_config["source"] == "cache" else "online"
  cache = cache_spec = None
  if mode == "cached":
    cache_spec = teacher_cache_spec(config, data, teacher_path, vocab_size)
    cache = cache_lib.open_teacher_cache(teacher_cache_dir(config, workdir), cache_spec)

  teacher_model = load_teacher(config["teacher"], teacher_path)
  student_model = build_student(config, student_config, teacher_model)
  teacher_graphdef, teacher_params = nnx.split(teacher_model, nnx.Param)
  teacher = loop.Teacher(graphdef=teacher_graphdef,
                         params=jax.device_put(teacher_params,
                                               parallel.replicated_sharding(mesh)))
  timings = {}

  train_source = packing.PackedSource(data.train, name=data.name)
  if mode == "cached":
    if cache is None:
      stage_start = time.perf_counter()
      cache = write_teacher_cache(config, teacher_cache_dir(config, workdir), cache_spec, data,
                                  teacher_model, mesh)
      timings["teacher_cache_seconds"] = time.perf_counter() - stage_start
    else:
      logging.info("reusing the teacher cache in %s (%d rows)", cache.directory, len(cache))
    train_source = packing.PackedSource(data.train, name=data.name, teacher_cache=cache)
    if config["teacher_cache"]["only"]:
      logging.info("the teacher cache in %s is complete; stopping before training because "
                   "teacher_cache.only is set", cache.directory)
      return {"teacher_cache": cache.directory, "timings": timings}

  validation = ValidationSet(data, int(config["data"]["eval_batch_size"]), mesh, teacher,
                             vocab_size, loss.vocab_chunk_size)
  stage_args = dict(config=config, workdir=workdir, mesh=mesh,
                    make_train_iterator=_train_iterator_factory(train_source, config["data"]),
                    eval_batches=None, evaluate_fn=validation.evaluate,
                    tokens_per_example=data.train.seq_len,
                    train_config=config["student"]["train"])
  initial_student = nnx.state(student_model, nnx.Param)

  def student_copy() -> gemma3.Gemma3Decoder:
    model = nnx.eval_shape(lambda: gemma3.Gemma3Decoder(student_model.config,
                                                        rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.copy, initial_student))
    return model

  token_chunk_size = int(distill_config["token_chunk_size"])
  distill_step = functools.partial(
      lm_steps.lm_train_step, teacher_graphdef=teacher.graphdef if mode == "online" else None,
      step_config=lm_steps.LMStepConfig(mode=mode, loss=loss,
                                        alpha=float(distill_config["alpha"]),
                                        vocab_size=vocab_size,
                                        token_chunk_size=token_chunk_size))
  distilled = loop.run_stage("distill", model=student_copy(),
                             teacher=teacher if mode == "online" else None,
                             step_fn=distill_step, **stage_args)
  timings["distill_train_seconds"] = distilled.train_seconds

  baseline = None
  if config["run_baseline"]:
    baseline_step = functools.partial(
        lm_steps.lm_train_step, teacher_graphdef=None,
        step_config=lm_steps.LMStepConfig(mode="cross_entropy", loss=loss, alpha=0.0,
                                          vocab_size=vocab_size,
                                          token_chunk_size=token_chunk_size))
    baseline_args = dict(stage_args, make_train_iterator=_train_iterator_factory(
        packing.PackedSource(data.train, name=data.name), config["data"]))
    baseline = loop.run_stage("baseline", model=student_copy(), step_fn=baseline_step,
                              **baseline_args)
    timings["baseline_train_seconds"] = baseline.train_seconds

  stage_start = time.perf_counter()
  report = lm_report.build_report(config, data, teacher, teacher_config, validation,
                                  distilled, baseline, loss, mode)
  timings["report_seconds"] = time.perf_counter() - stage_start
  timings["this_invocation_seconds"] = time.perf_counter() - started
  report["timings"] = timings
  if cache is not None:
    report["distillation"]["teacher_cache_bytes_per_token"] = cache.spec.bytes_per_token

  if jax.process_index() == 0:
    evaluation.write_report(workdir, report)
    lm_report.plot(workdir, distilled, baseline)
  logging.info("report written to %s", os.path.join(workdir, "report.md"))
  return report
