"""Compare the memory of the chunked token loss with the unchunked one.

For one forward and backward pass of a token-level distillation loss with
respect to the student's final hidden states and output embedding, this
prints the device memory XLA assigns to the compiled step (arguments,
outputs and temporaries, from `memory_analysis()`), for:

- the unchunked loss: full `[tokens, vocab]` float32 logits of both models,
  then `distill_jax.losses.forward_kl`;
- the vocabulary-chunked loss, `token_level.chunked_divergence`;
- the top-k loss with the teacher's top-k computed chunk by chunk;
- the position-chunked loss, `token_level.fused_token_loss`, which the
  language-model recipe uses by default.

Nothing is executed, so the unchunked case can be measured at sizes that do
not fit in memory. Run it on the CPU:

  JAX_PLATFORMS=cpu python scripts/benchmark_token_loss_memory.py \
      --vocab 262144 --tokens 4096
"""

import argparse

import jax
import jax.numpy as jnp

from distill_jax import losses
from distill_jax.evaluation.profiling import forward_peak_memory_bytes
from distill_jax.losses import token_level

_GIB = 1024**3


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab", type=int, default=262_144, help="vocabulary size")
  parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
  parser.add_argument("--d-student", type=int, default=384, help="student width")
  parser.add_argument("--d-teacher", type=int, default=640, help="teacher width")
  parser.add_argument("--chunk", type=int, default=8192, help="vocabulary chunk size")
  parser.add_argument("--top-k", type=int, default=64, help="k of the top-k loss")
  parser.add_argument("--token-chunk", type=int, default=128,
                      help="positions per chunk of the position-chunked loss")
  parser.add_argument("--temperature", type=float, default=2.0)
  args = parser.parse_args()

  shapes = dict(
      student_hidden=jax.ShapeDtypeStruct((args.tokens, args.d_student), jnp.float32),
      student_embedding=jax.ShapeDtypeStruct((args.vocab, args.d_student), jnp.float32),
      teacher_hidden=jax.ShapeDtypeStruct((args.tokens, args.d_teacher), jnp.float32),
      teacher_embedding=jax.ShapeDtypeStruct((args.vocab, args.d_teacher), jnp.float32),
  )
  loss = token_level.TokenDistillationLoss("forward_kl", temperature=args.temperature,
                                           vocab_chunk_size=args.chunk)
  top_k_loss = token_level.TokenDistillationLoss("forward_kl", temperature=args.temperature,
                                                 top_k=args.top_k, vocab_chunk_size=args.chunk)

  def unchunked(student, teacher):
    student_logits = student["student_hidden"] @ student["student_embedding"].T
    teacher_logits = jax.lax.stop_gradient(
        teacher["teacher_hidden"] @ teacher["teacher_embedding"].T)
    return jnp.mean(losses.forward_kl(student_logits, teacher_logits, args.temperature))

  def chunked(student, teacher):
    return jnp.mean(token_level.chunked_divergence(
        student["student_hidden"], student["student_embedding"], teacher["teacher_hidden"],
        teacher["teacher_embedding"], loss))

  def top_k(student, teacher):
    ids, log_probs = token_level.chunked_top_k(
        teacher["teacher_hidden"], teacher["teacher_embedding"], args.top_k,
        temperature=args.temperature, chunk_size=args.chunk)
    return jnp.mean(token_level.top_k_divergence(
        student["student_hidden"], student["student_embedding"], ids, log_probs, top_k_loss))

  fused_spec = token_level.FusedLossSpec(loss=loss, alpha=1.0, teacher="full",
                                         token_chunk_size=args.token_chunk)

  def fused(student, teacher):
    tokens = student["student_hidden"].shape[0]
    return token_level.fused_token_loss(
        student["student_hidden"], student["student_embedding"],
        jnp.zeros((tokens,), jnp.int32), jnp.full((tokens,), 1.0 / tokens), fused_spec,
        teacher_hidden=teacher["teacher_hidden"],
        teacher_embedding=teacher["teacher_embedding"])[0]

  student = {name: shapes[name] for name in ("student_hidden", "student_embedding")}
  teacher = {name: shapes[name] for name in ("teacher_hidden", "teacher_embedding")}
  print(f"vocab {args.vocab}, {args.tokens} tokens, student width {args.d_student}, teacher "
        f"width {args.d_teacher}, chunk {args.chunk}, backend {jax.default_backend()}")

  results = {}
  for name, fn in (("unchunked", unchunked), ("vocabulary chunks", chunked),
                   (f"top-{args.top_k}", top_k), ("position chunks", fused)):
    results[name] = forward_peak_memory_bytes(jax.value_and_grad(fn), student, teacher)
    ratio = results[name] / results["unchunked"]
    print(f"{name:>17}: {results[name] / _GIB:7.2f} GiB  ({ratio:.1%} of unchunked)")


if __name__ == "__main__":
  main()
