"""Time one token-level distillation step against its parts, side by side in one run.

Measures, with the pretrained Gemma 3 270M as teacher and a student built
from the arguments (same 262144-token vocabulary):

- teacher forward: the teacher's logits for one batch (reduced chunk by
  chunk to their maximum, so they are computed but never stored);
- student step: one cross-entropy train step of the student alone;
- distillation steps: the teacher forward plus the student update with the
  chunked full-vocabulary KL ("online, full"), with the teacher's top-k
  computed in the step ("online, top-k"), and from cached top-k ("cached").

Each step is jitted, warmed up, then timed as the median of `--repeats`
calls. Peak memory is XLA's compiled memory analysis of each step. Because
machines are shared, compare the ratios within one run.

  JAX_PLATFORMS=cpu python scripts/benchmark_lm_step.py --batch 4 --seq-len 256
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from distill_jax.checkpoints import gemma3_import
from distill_jax.losses import token_level
from distill_jax.models import gemma3
from distill_jax.training import lm_steps
from distill_jax.training import state as state_lib

_GIB = 1024**3


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def _memory_gib(fn, *args) -> float:
  stats = fn.lower(*args).compile().memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  return total / _GIB


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--student-layers", type=int, default=4)
  parser.add_argument("--student-width", type=int, default=384)
  parser.add_argument("--temperature", type=float, default=2.0)
  parser.add_argument("--top-k", type=int, default=64)
  parser.add_argument("--chunk", type=int, default=16384, help="vocabulary chunk size")
  parser.add_argument("--token-chunk", type=int, default=128,
                      help="positions per chunk of full-vocabulary logits; 0 chunks the "
                           "vocabulary instead")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--modes", default="teacher,student,online_full,online_top_k,cached")
  args = parser.parse_args()

  teacher_config, teacher = gemma3_import.load_gemma3_gguf(
      gemma3_import.default_gemma3_270m_gguf())
  student_config = gemma3.Gemma3Config(
      vocab_size=teacher_config.vocab_size, d_model=args.student_width,
      num_layers=args.student_layers, num_heads=4, num_kv_heads=1,
      head_dim=args.student_width // 4, mlp_dim=4 * args.student_width)
  student = gemma3.Gemma3Decoder(student_config, rngs=nnx.Rngs(0))
  teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
  student_graphdef, student_params = nnx.split(student, nnx.Param)

  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq_len)
  batch = {
      "tokens": jnp.asarray(rng.integers(0, 256_000, shape), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, 256_000, shape), jnp.int32),
      "segment_ids": jnp.ones(shape, jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), shape),
      "loss_mask": jnp.ones(shape, bool),
  }
  tokens = args.batch * args.seq_len
  train_config = {"steps": 100, "learning_rate": 1e-4, "warmup_steps": 1, "optimizer": "adamw",
                  "weight_decay": 0.0, "grad_clip_norm": 1.0}
  optimizer = state_lib.make_optimizer(train_config)
  schedule = state_lib.make_learning_rate_schedule(train_config)
  state = state_lib.create_train_state(student_params, optimizer)
  print(f"teacher {gemma3.count_parameters(teacher):,} parameters, student "
        f"{gemma3.count_parameters(student):,}; batch {args.batch} x {args.seq_len} tokens, "
        f"T={args.temperature}, token chunk {args.token_chunk}, vocabulary chunk {args.chunk}, "
        f"backend {jax.default_backend()}")

  def step_fn(mode: str, top_k: int):
    loss = token_level.TokenDistillationLoss("forward_kl", temperature=args.temperature,
                                             top_k=top_k, vocab_chunk_size=args.chunk)
    step_config = lm_steps.LMStepConfig(mode=mode, loss=loss, alpha=1.0,
                                        vocab_size=teacher_config.vocab_size,
                                        token_chunk_size=args.token_chunk)
    return jax.jit(functools.partial(
        lm_steps.lm_train_step, student_graphdef=student_graphdef,
        teacher_graphdef=teacher_graphdef if mode == "online" else None, optimizer=optimizer,
        schedule=schedule, step_config=step_config))

  results = {}
  modes = args.modes.split(",")
  if "teacher" in modes:
    # The teacher's logits are part of its forward pass, as in a framework's
    # forward call; their maximum keeps XLA from dropping them.
    def teacher_logits_max(params, batch):
      hidden, embedding, _ = lm_steps.final_hidden(teacher_graphdef, params, batch)
      return jnp.max(token_level.vocab_summary(hidden, embedding,
                                               chunk_size=args.chunk).max_logit)

    forward = jax.jit(teacher_logits_max)
    results["teacher forward"] = (_time(forward, teacher_params, batch, repeats=args.repeats),
                                  _memory_gib(forward, teacher_params, batch))
  if "student" in modes:
    fn = step_fn("cross_entropy", 0)
    results["student step (cross-entropy)"] = (
        _time(fn, state, None, batch, jax.random.key(0), repeats=args.repeats),
        _memory_gib(fn, state, None, batch, jax.random.key(0)))
  for mode, top_k, name in (("online", 0, "online_full"), ("online", args.top_k, "online_top_k")):
    if name in modes:
      fn = step_fn(mode, top_k)
      results[f"KD step, {name.replace('_', ' ')}"] = (
          _time(fn, state, teacher_params, batch, jax.random.key(0), repeats=args.repeats),
          _memory_gib(fn, state, teacher_params, batch, jax.random.key(0)))
  if "cached" in modes:
    cached_batch = dict(batch,
                        teacher_top_ids=jnp.asarray(rng.integers(0, 256_000, shape + (args.top_k,)),
                                                    jnp.int32),
                        teacher_top_log_probs=jnp.full(shape + (args.top_k,),
                                                       np.log(0.5 / args.top_k), jnp.float32))
    fn = step_fn("cached", args.top_k)
    results[f"KD step, cached top-{args.top_k}"] = (
        _time(fn, state, None, cached_batch, jax.random.key(0), repeats=args.repeats),
        _memory_gib(fn, state, None, cached_batch, jax.random.key(0)))

  for name, (seconds, memory) in results.items():
    print(f"{name:>34}: {seconds:7.3f} s, {tokens / seconds:8.1f} tokens/s, {memory:6.2f} GiB")
  parts = [results.get("teacher forward"), results.get("student step (cross-entropy)")]
  if all(parts):
    print(f"{'teacher forward + student step':>34}: {parts[0][0] + parts[1][0]:7.3f} s")


if __name__ == "__main__":
  main()
