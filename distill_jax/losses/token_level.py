"""Token-level distillation losses computed one vocabulary chunk at a time.

A language model's logits are `hidden @ embedding.T`, `[tokens, vocab]`. At a
vocabulary of 262144 and 4096 tokens, one float32 copy is 4 GiB, and a naive
KL between teacher and student keeps several such arrays at once (both
logits, both log-softmaxes and their gradients). The functions here take the
final hidden states and the output embedding tables instead and never build
more than a `[tokens, chunk]` slice of logits:

1. a first `lax.scan` over vocabulary chunks accumulates each model's
   log-partition function with the streaming log-sum-exp;
2. a second scan recomputes each chunk's logits, turns them into
   log-probabilities and sums the divergence terms of that chunk.

Each scan body is wrapped in `jax.checkpoint`, so the backward pass also
recomputes chunk logits instead of storing them. The divergence formulas and
their `T**2` scaling are those of `distill_jax.losses.divergences`, which the
tests use as the unchunked reference.

With a top-k teacher, the teacher distribution is kept as its k largest
probabilities plus one tail bucket holding the remaining mass, and the
student distribution is collapsed onto the same k + 1 buckets. The top-k may
come from a cache written earlier (`distill_jax.data.teacher_cache`) or be
computed here, chunk by chunk, with `chunked_top_k`.

Shapes use `tokens` for the flattened `[batch * length]` positions.
"""

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distill_jax.errors import ConfigError
from distill_jax.models.gemma3 import soft_cap

TOKEN_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")

# Log-probabilities are floored here so that `exp` gives exactly 0 and
# differences stay finite where a probability is 0.
_LOG_FLOOR = -1e30


@dataclasses.dataclass(frozen=True)
class TokenDistillationLoss:
  """Settings of a token-level divergence, checked once at construction.

  Attributes:
    divergence: one of `TOKEN_DIVERGENCES`.
    temperature: softmax temperature `T > 0` of both models.
    beta: teacher weight in [0, 1] of the "jsd" and "skew_kl" mixtures.
    top_k: 0 for the full vocabulary, else the number of teacher
      probabilities kept, the rest going to one tail bucket.
    vocab_chunk_size: vocabulary entries per chunk of logits.
  """

  divergence: str = "forward_kl"
  temperature: float = 1.0
  beta: float = 0.5
  top_k: int = 0
  vocab_chunk_size: int = 8192

  def __post_init__(self):
    if self.divergence not in TOKEN_DIVERGENCES:
      raise ConfigError(f"divergence must be one of {', '.join(TOKEN_DIVERGENCES)}, "
                        f"got {self.divergence!r}")
    if (isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real)
        or not math.isfinite(self.temperature) or self.temperature <= 0):
      raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}")
    if (isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real)
        or not 0.0 <= self.beta <= 1.0):
      raise ConfigError(f"beta must be a number in [0, 1], got {self.beta!r}")
    for name in ("top_k", "vocab_chunk_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if self.top_k < 0:
      raise ConfigError(f"top_k must be 0 (full vocabulary) or >= 1, got {self.top_k}")
    if self.vocab_chunk_size < 1:
      raise ConfigError(f"vocab_chunk_size must be >= 1, got {self.vocab_chunk_size}")

  @property
  def scale(self) -> float:
    """`T**2` for the KL-based divergences, 1 for total variation."""
    return 1.0 if self.divergence == "tvd" else float(self.temperature) ** 2

  def check_vocab_size(self, vocab_size: int) -> None:
    """Raise `ConfigError` when `top_k` exceeds the vocabulary."""
    if self.top_k > vocab_size:
      raise ConfigError(f"top_k is {self.top_k}, larger than the vocabulary of {vocab_size}; "
                        f"set top_k to at most {vocab_size}, or 0 for the full vocabulary")


def _kl_terms(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
  """Return the elementwise terms `a * (log a - log b)`, 0 where `a` is 0."""
  support = log_a > _LOG_FLOOR / 2
  safe_log_a = jnp.where(support, log_a, 0.0)
  safe_log_b = jnp.where(support, log_b, 0.0)
  return jnp.where(support, jnp.exp(safe_log_a) * (safe_log_a - safe_log_b), 0.0)


def divergence_terms(log_p: jax.Array, log_q: jax.Array, divergence: str,
                     beta: float) -> jax.Array:
  """Return the elementwise terms whose sum over the last axis is the divergence.

  `log_p` and `log_q` are teacher and student log-probabilities. The terms
  are additive over the vocabulary, so summing them chunk by chunk gives the
  full divergence. No `T**2` scaling is applied here.
  """
  if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0) or (
      divergence == "skew_kl" and beta == 0.0):
    return _kl_terms(log_p, log_q)
  if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
    return _kl_terms(log_q, log_p)
  if divergence == "tvd":
    return 0.5 * jnp.abs(jnp.exp(log_p) - jnp.exp(log_q))
  if divergence == "skew_kl" and beta == 1.0:
    return jnp.zeros_like(log_p)

  log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
  if divergence == "skew_kl":
    return _kl_terms(log_p, log_m)
  return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)


class VocabChunks(NamedTuple):
  """Chunks of equal row count of an embedding table.

  Attributes:
    embedding: `[num_chunks, chunk, d_model]`, zero-padded at the end.
    valid: `[num_chunks, chunk]`, False on padding rows.
    offsets: `[num_chunks]` vocabulary id of each chunk's first row.
  """

  embedding: jax.Array
  valid: jax.Array
  offsets: jax.Array


def split_vocab(embedding: jax.Array, chunk_size: int) -> VocabChunks:
  """Split `embedding` `[vocab, d_model]` into chunks of `chunk_size` rows."""
  vocab, d_model = embedding.shape
  chunk_size = min(chunk_size, vocab)
  num_chunks = -(-vocab // chunk_size)
  padding = num_chunks * chunk_size - vocab
  if padding:
    embedding = jnp.pad(embedding, ((0, padding), (0, 0)))
  valid = (jnp.arange(num_chunks * chunk_size) < vocab).reshape(num_chunks, chunk_size)
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  return VocabChunks(embedding.reshape(num_chunks, chunk_size, d_model), valid, offsets)


def _chunk_logits(hidden: jax.Array, chunk: jax.Array, valid: jax.Array,
                  softcap: float | None, temperature: float) -> jax.Array:
  """Return float32 logits `[tokens, chunk]` over `temperature`, padding at the floor."""
  logits = jnp.einsum("nd,cd->nc", hidden, chunk, preferred_element_type=jnp.float32)
  logits = soft_cap(logits, softcap) / temperature
  return jnp.where(valid[None, :], logits, _LOG_FLOOR)


def _streaming_logsumexp(carry, logits):
  """Fold a `[tokens, chunk]` slice into a running (max, sum of exp) pair."""
  running_max, running_sum = carry
  chunk_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  new_max = jnp.maximum(running_max, chunk_max)
  running_sum = (running_sum * jnp.exp(running_max - new_max)
                 + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1))
  return new_max, running_sum


def _initial_logsumexp(tokens: int):
  return jnp.full((tokens,), _LOG_FLOOR, jnp.float32), jnp.zeros((tokens,), jnp.float32)


def vocab_logsumexp(hidden: jax.Array, embedding: jax.Array, *, temperature: float = 1.0,
                    chunk_size: int = 8192, softcap: float | None = None) -> jax.Array:
  """Return `logsumexp(soft_cap(hidden @ embedding.T) / temperature)` per token, `[tokens]`."""
  chunks = split_vocab(embedding, chunk_size)

  @jax.checkpoint
  def body(carry, chunk):
    chunk_embedding, valid = chunk
    return _streaming_logsumexp(carry, _chunk_logits(hidden, chunk_embedding, valid,
                                                     softcap, temperature)), None

  (running_max, running_sum), _ = jax.lax.scan(
      body, _initial_logsumexp(hidden.shape[0]), (chunks.embedding, chunks.valid))
  return running_max + jnp.log(running_sum)


def _mask_hidden(hidden: jax.Array, where: jax.Array | None) -> jax.Array:
  """Zero the hidden states of masked positions so they cannot produce NaN."""
  if where is None:
    return hidden
  return jnp.where(where[:, None], hidden, jnp.zeros_like(hidden))


def _mask_values(values: jax.Array, where: jax.Array | None) -> jax.Array:
  if where is None:
    return values
  return jnp.where(where, values, jnp.zeros_like(values))


def chunked_divergence(student_hidden: jax.Array, student_embedding: jax.Array,
                       teacher_hidden: jax.Array, teacher_embedding: jax.Array,
                       loss: TokenDistillationLoss, *, where: jax.Array | None = None,
                       student_softcap: float | None = None,
                       teacher_softcap: float | None = None) -> jax.Array:
  """Return the full-vocabulary divergence per token, `[tokens]`, in two chunked passes.

  Args:
    student_hidden: `[tokens, d_student]` final student hidden states.
    student_embedding: `[vocab, d_student]` student output embedding.
    teacher_hidden: `[tokens, d_teacher]` final teacher hidden states; no
      gradient flows into them.
    teacher_embedding: `[vocab, d_teacher]` teacher output embedding, with
      the same number of rows as the student's.
    loss: the divergence, temperature and chunk size.
    where: `[tokens]` boolean mask; masked positions return 0 with zero
      gradient.
    student_softcap: final-logit soft cap of the student, or None.
    teacher_softcap: final-logit soft cap of the teacher, or None.
  """
  if student_embedding.shape[0] != teacher_embedding.shape[0]:
    raise ValueError(f"student and teacher embeddings differ in vocabulary size: "
                     f"{student_embedding.shape[0]} and {teacher_embedding.shape[0]}")
  temperature = float(loss.temperature)
  student_hidden = _mask_hidden(student_hidden, where)
  teacher_hidden = jax.lax.stop_gradient(_mask_hidden(teacher_hidden, where))
  teacher_embedding = jax.lax.stop_gradient(teacher_embedding)

  student_lse = vocab_logsumexp(student_hidden, student_embedding, temperature=temperature,
                                chunk_size=loss.vocab_chunk_size, softcap=student_softcap)
  teacher_lse = vocab_logsumexp(teacher_hidden, teacher_embedding, temperature=temperature,
                                chunk_size=loss.vocab_chunk_size, softcap=teacher_softcap)

  student_chunks = split_vocab(student_embedding, loss.vocab_chunk_size)
  teacher_chunks = split_vocab(teacher_embedding, loss.vocab_chunk_size)

  @jax.checkpoint
  def body(total, chunk):
    student_chunk, teacher_chunk, valid = chunk
    log_q = _chunk_logits(student_hidden, student_chunk, valid, student_softcap,
                          temperature) - student_lse[:, None]
    log_p = _chunk_logits(teacher_hidden, teacher_chunk, valid, teacher_softcap,
                          temperature) - teacher_lse[:, None]
    log_q = jnp.where(valid[None, :], log_q, _LOG_FLOOR)
    log_p = jnp.where(valid[None, :], log_p, _LOG_FLOOR)
    terms = divergence_terms(log_p, log_q, loss.divergence, loss.beta)
    return total + jnp.sum(terms, axis=-1), None

  total, _ = jax.lax.scan(
      body, jnp.zeros(student_hidden.shape[:1], jnp.float32),
      (student_chunks.embedding, teacher_chunks.embedding, student_chunks.valid))
  return _mask_values(total * loss.scale, where)


def chunked_top_k(hidden: jax.Array, embedding: jax.Array, k: int, *,
                  temperature: float = 1.0, chunk_size: int = 8192,
                  softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Return the `k` most likely token ids and their log-probabilities at `temperature`.

  Runs one chunked pass that keeps a running top-k and a running
  log-sum-exp, so the full logits are never built. Intended for the frozen
  teacher, so no gradient flows.

  Returns:
    `(ids, log_probs)`, each `[tokens, k]`, sorted by decreasing probability.
  """
  hidden = jax.lax.stop_gradient(hidden)
  embedding = jax.lax.stop_gradient(embedding)
  chunks = split_vocab(embedding, chunk_size)
  chunk_k = min(k, chunks.embedding.shape[1])
  tokens = hidden.shape[0]

  def body(carry, chunk):
    lse_carry, top_values, top_ids = carry
    chunk_embedding, valid, offset = chunk
    logits = _chunk_logits(hidden, chunk_embedding, valid, softcap, temperature)
    lse_carry = _streaming_logsumexp(lse_carry, logits)

    chunk_values, chunk_positions = jax.lax.top_k(logits, chunk_k)
    values = jnp.concatenate([top_values, chunk_values], axis=-1)
    ids = jnp.concatenate([top_ids, chunk_positions.astype(jnp.int32) + offset], axis=-1)
    top_values, order = jax.lax.top_k(values, k)
    return (lse_carry, top_values, jnp.take_along_axis(ids, order, axis=-1)), None

  initial = (_initial_logsumexp(tokens), jnp.full((tokens, k), _LOG_FLOOR, jnp.float32),
             jnp.zeros((tokens, k), jnp.int32))
  ((running_max, running_sum), top_values, top_ids), _ = jax.lax.scan(
      body, initial, (chunks.embedding, chunks.valid, chunks.offsets))
  log_partition = running_max + jnp.log(running_sum)
  return top_ids, top_values - log_partition[:, None]


def log1mexp(x: jax.Array) -> jax.Array:
  """Return `log(1 - exp(x))` for `x <= 0`, accurately at both ends (Maechler 2012)."""
  x = jnp.minimum(x, -1e-30)
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def with_tail_bucket(top_log_probs: jax.Array) -> jax.Array:
  """Append the log of the remaining mass to top-k log-probabilities, `[..., k + 1]`.

  The tail is `log(1 - sum(exp(top_log_probs)))`, floored so that a tail of
  zero mass (the top-k contains all of it) contributes nothing.
  """
  tail = log1mexp(jax.nn.logsumexp(top_log_probs, axis=-1))
  tail = jnp.maximum(tail, _LOG_FLOOR)
  return jnp.concatenate([top_log_probs, tail[..., None]], axis=-1)


def student_log_probs_at(student_hidden: jax.Array, student_embedding: jax.Array,
                         ids: jax.Array, *, temperature: float, chunk_size: int,
                         softcap: float | None) -> jax.Array:
  """Return the student's log-probabilities `[tokens, k]` at the token ids `ids`.

  The chunked pass that computes the student's log-partition function also
  picks out the logits at `ids`, so no `[tokens, k, d_model]` gather of
  embedding rows is needed.
  """
  chunks = split_vocab(student_embedding, chunk_size)
  chunk_size = chunks.embedding.shape[1]

  @jax.checkpoint
  def body(carry, chunk):
    lse_carry, picked = carry
    chunk_embedding, valid, offset = chunk
    logits = _chunk_logits(student_hidden, chunk_embedding, valid, softcap, temperature)
    local = ids - offset
    inside = (local >= 0) & (local < chunk_size)
    values = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk_size - 1), axis=-1)
    picked = picked + jnp.where(inside, values, 0.0)
    return (_streaming_logsumexp(lse_carry, logits), picked), None

  initial = (_initial_logsumexp(student_hidden.shape[0]), jnp.zeros(ids.shape, jnp.float32))
  ((running_max, running_sum), picked), _ = jax.lax.scan(
      body, initial, (chunks.embedding, chunks.valid, chunks.offsets))
  return picked - (running_max + jnp.log(running_sum))[:, None]


def top_k_divergence(student_hidden: jax.Array, student_embedding: jax.Array,
                     teacher_top_ids: jax.Array, teacher_top_log_probs: jax.Array,
                     loss: TokenDistillationLoss, *, where: jax.Array | None = None,
                     student_softcap: float | None = None) -> jax.Array:
  """Return the divergence per token, `[tokens]`, over the teacher's top-k plus a tail bucket.

  Args:
    student_hidden: `[tokens, d_student]` final student hidden states.
    student_embedding: `[vocab, d_student]` student output embedding.
    teacher_top_ids: `[tokens, k]` the teacher's most likely token ids.
    teacher_top_log_probs: `[tokens, k]` their log-probabilities at
      `loss.temperature`, over the full teacher vocabulary.
    loss: the divergence, temperature and chunk size.
    where: `[tokens]` boolean mask; masked positions return 0 with zero
      gradient.
    student_softcap: final-logit soft cap of the student, or None.
  """
  student_hidden = _mask_hidden(student_hidden, where)
  teacher_top_log_probs = jax.lax.stop_gradient(teacher_top_log_probs.astype(jnp.float32))
  if where is not None:
    teacher_top_log_probs = jnp.where(where[:, None], teacher_top_log_probs, 0.0)

  student_top = student_log_probs_at(student_hidden, student_embedding, teacher_top_ids,
                                     temperature=float(loss.temperature),
                                     chunk_size=loss.vocab_chunk_size, softcap=student_softcap)
  return bucket_divergence(student_top, teacher_top_log_probs, loss, where=where)


def bucket_divergence(student_top_log_probs: jax.Array, teacher_top_log_probs: jax.Array,
                      loss: TokenDistillationLoss, *, where: jax.Array | None = None
                      ) -> jax.Array:
  """Return the divergence per token over k top-k buckets plus one tail bucket.

  Args:
    student_top_log_probs: `[tokens, k]` student log-probabilities at the
      teacher's top-k ids, at `loss.temperature`.
    teacher_top_log_probs: `[tokens, k]` the teacher's top-k log-probabilities.
    loss: the divergence and temperature.
    where: `[tokens]` boolean mask; masked positions return 0.
  """
  teacher_top_log_probs = jax.lax.stop_gradient(teacher_top_log_probs.astype(jnp.float32))
  if where is not None:
    teacher_top_log_probs = jnp.where(where[:, None], teacher_top_log_probs, 0.0)
    student_top_log_probs = jnp.where(where[:, None], student_top_log_probs, 0.0)
  log_p = with_tail_bucket(teacher_top_log_probs)
  log_q = with_tail_bucket(student_top_log_probs)
  terms = divergence_terms(log_p, log_q, loss.divergence, loss.beta)
  return _mask_values(jnp.sum(terms, axis=-1) * loss.scale, where)


def chunked_cross_entropy(hidden: jax.Array, embedding: jax.Array, labels: jax.Array, *,
                          where: jax.Array | None = None, chunk_size: int = 8192,
                          softcap: float | None = None) -> jax.Array:
  """Return `-log softmax(logits)[label]` per token, `[tokens]`, without full logits."""
  hidden = _mask_hidden(hidden, where)
  if where is not None:
    labels = jnp.where(where, labels, 0)
  log_partition = vocab_logsumexp(hidden, embedding, chunk_size=chunk_size, softcap=softcap)
  label_logits = jnp.einsum("nd,nd->n", hidden, jnp.take(embedding, labels, axis=0),
                            preferred_element_type=jnp.float32)
  label_logits = soft_cap(label_logits, softcap)
  return _mask_values(log_partition - label_logits, where)


class VocabSummary(NamedTuple):
  """Per-token statistics of a softmax over the vocabulary, each `[tokens]`.

  Attributes:
    log_partition: `logsumexp` of the logits.
    max_logit: the largest logit.
    argmax: the id of the largest logit (the lowest id on ties).
  """

  log_partition: jax.Array
  max_logit: jax.Array
  argmax: jax.Array


def vocab_summary(hidden: jax.Array, embedding: jax.Array, *, chunk_size: int = 8192,
                  softcap: float | None = None) -> VocabSummary:
  """Return the log-partition function, max logit and argmax per token in one chunked pass.

  Meant for evaluation: the greedy prediction is `argmax` and its probability
  is `exp(max_logit - log_partition)`. No gradient is defined through `argmax`.
  """
  chunks = split_vocab(embedding, chunk_size)
  tokens = hidden.shape[0]

  def body(carry, chunk):
    lse_carry, best_logit, best_id = carry
    chunk_embedding, valid, offset = chunk
    logits = _chunk_logits(hidden, chunk_embedding, valid, softcap, 1.0)
    lse_carry = _streaming_logsumexp(lse_carry, logits)
    chunk_best = jnp.max(logits, axis=-1)
    chunk_id = jnp.argmax(logits, axis=-1).astype(jnp.int32) + offset
    better = chunk_best > best_logit
    return (lse_carry, jnp.where(better, chunk_best, best_logit),
            jnp.where(better, chunk_id, best_id)), None

  initial = (_initial_logsumexp(tokens), jnp.full((tokens,), -jnp.inf, jnp.float32),
             jnp.zeros((tokens,), jnp.int32))
  ((running_max, running_sum), best_logit, best_id), _ = jax.lax.scan(
      body, initial, (chunks.embedding, chunks.valid, chunks.offsets))
  return VocabSummary(running_max + jnp.log(running_sum), best_logit, best_id)


# --- Token-chunked loss with its gradient computed in the forward pass --------


@dataclasses.dataclass(frozen=True)
class FusedLossSpec:
  """Static settings of `fused_token_loss`.

  Attributes:
    loss: the divergence, temperature and top-k.
    alpha: weight of the divergence; `1 - alpha` weighs the cross-entropy.
    teacher: "full" (teacher hidden states and embedding given), "top_k"
      (teacher top-k ids and log-probabilities given) or "none".
    token_chunk_size: token positions per chunk of full-vocabulary logits.
    student_softcap: final-logit soft cap of the student, or None.
    teacher_softcap: final-logit soft cap of the teacher, or None.
  """

  loss: TokenDistillationLoss
  alpha: float
  teacher: str
  token_chunk_size: int = 128
  student_softcap: float | None = None
  teacher_softcap: float | None = None


def _chunk_objective(student_logits: jax.Array, chunk: dict[str, jax.Array],
                     teacher_embedding: jax.Array | None, spec: FusedLossSpec):
  """Return the weighted objective of one token chunk and its per-token (divergence, CE)."""
  loss = spec.loss
  temperature = float(loss.temperature)
  logits = soft_cap(student_logits, spec.student_softcap)
  log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
  log_q_unit = log_q if temperature == 1.0 else jax.nn.log_softmax(logits, axis=-1)
  cross_entropy = -jnp.take_along_axis(log_q_unit, chunk["targets"][:, None], axis=-1)[:, 0]

  divergence = jnp.zeros_like(cross_entropy)
  if spec.teacher == "full":
    teacher_logits = jnp.einsum("nd,vd->nv", chunk["teacher_hidden"], teacher_embedding,
                                preferred_element_type=jnp.float32)
    log_p = jax.nn.log_softmax(soft_cap(teacher_logits, spec.teacher_softcap) / temperature,
                               axis=-1)
    if loss.top_k:
      top_log_p, top_ids = jax.lax.top_k(log_p, loss.top_k)
      student_top = jnp.take_along_axis(log_q, top_ids, axis=-1)
      terms = divergence_terms(with_tail_bucket(top_log_p), with_tail_bucket(student_top),
                               loss.divergence, loss.beta)
    else:
      terms = divergence_terms(log_p, log_q, loss.divergence, loss.beta)
    divergence = jnp.sum(terms, axis=-1) * loss.scale
  elif spec.teacher == "top_k":
    student_top = jnp.take_along_axis(log_q, chunk["teacher_top_ids"], axis=-1)
    terms = divergence_terms(with_tail_bucket(chunk["teacher_top_log_probs"]),
                             with_tail_bucket(student_top), loss.divergence, loss.beta)
    divergence = jnp.sum(terms, axis=-1) * loss.scale

  per_token = spec.alpha * divergence + (1.0 - spec.alpha) * cross_entropy
  weights = chunk["weights"]
  objective = jnp.sum(jnp.where(weights != 0, weights * per_token, 0.0))
  return objective, (divergence, cross_entropy)


def _fused_forward(spec: FusedLossSpec, student_hidden, student_embedding, targets, weights,
                   teacher_hidden, teacher_embedding, teacher_top_ids, teacher_top_log_probs):
  """Scan over token chunks; return the objective, per-token terms and both gradients."""
  tokens, d_student = student_hidden.shape
  chunk_size = min(spec.token_chunk_size, tokens)
  num_chunks = -(-tokens // chunk_size)
  padding = num_chunks * chunk_size - tokens

  kept = weights != 0
  inputs = {"hidden": jnp.where(kept[:, None], student_hidden, 0.0), "targets": targets,
            "weights": weights}
  if spec.teacher == "full":
    inputs["teacher_hidden"] = jax.lax.stop_gradient(
        jnp.where(kept[:, None], teacher_hidden, 0.0))
  elif spec.teacher == "top_k":
    inputs["teacher_top_ids"] = teacher_top_ids
    inputs["teacher_top_log_probs"] = jax.lax.stop_gradient(
        jnp.where(kept[:, None], teacher_top_log_probs.astype(jnp.float32), 0.0))
  chunks = {name: jnp.pad(value, [(0, padding)] + [(0, 0)] * (value.ndim - 1)).reshape(
      (num_chunks, chunk_size) + value.shape[1:]) for name, value in inputs.items()}
  if teacher_embedding is not None:
    teacher_embedding = jax.lax.stop_gradient(teacher_embedding)

  def body(embedding_grad, chunk):
    hidden = chunk["hidden"]
    logits = jnp.einsum("nd,vd->nv", hidden, student_embedding,
                        preferred_element_type=jnp.float32)
    objective, vjp_fn, (divergence, cross_entropy) = jax.vjp(
        lambda z: _chunk_objective(z, chunk, teacher_embedding, spec), logits, has_aux=True)
    (logits_grad,) = vjp_fn(jnp.ones_like(objective))
    logits_grad = logits_grad.astype(student_embedding.dtype)
    hidden_grad = logits_grad @ student_embedding
    embedding_grad = embedding_grad + jnp.einsum("nv,nd->vd", logits_grad, hidden)
    return embedding_grad, (objective, hidden_grad, divergence, cross_entropy)

  embedding_grad, (objectives, hidden_grad, divergence, cross_entropy) = jax.lax.scan(
      body, jnp.zeros_like(student_embedding), chunks)
  unpad = lambda x: x.reshape((num_chunks * chunk_size,) + x.shape[2:])[:tokens]
  hidden_grad = jnp.where(kept[:, None], unpad(hidden_grad), 0.0).reshape(tokens, d_student)
  return (jnp.sum(objectives), unpad(divergence), unpad(cross_entropy)), (hidden_grad,
                                                                           embedding_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, student_hidden, student_embedding, targets, weights, teacher_hidden,
           teacher_embedding, teacher_top_ids, teacher_top_log_probs):
  outputs, _ = _fused_forward(spec, student_hidden, student_embedding, targets, weights,
                              teacher_hidden, teacher_embedding, teacher_top_ids,
                              teacher_top_log_probs)
  return outputs


def _fused_fwd(spec, *args):
  outputs, grads = _fused_forward(spec, *args)
  return outputs, grads


def _fused_bwd(spec, grads, cotangents):
  del spec
  hidden_grad, embedding_grad = grads
  objective_cotangent = cotangents[0]
  return (hidden_grad * objective_cotangent, embedding_grad * objective_cotangent,
          None, None, None, None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_loss(student_hidden: jax.Array, student_embedding: jax.Array,
                     targets: jax.Array, weights: jax.Array, spec: FusedLossSpec, *,
                     teacher_hidden: jax.Array | None = None,
                     teacher_embedding: jax.Array | None = None,
                     teacher_top_ids: jax.Array | None = None,
                     teacher_top_log_probs: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Return `sum(weights * (alpha * divergence + (1 - alpha) * CE))` and the per-token terms.

  The positions are split into chunks of `spec.token_chunk_size`, and each
  chunk's full-vocabulary logits `[chunk, vocab]` are built once. The
  forward pass also computes the gradient with respect to those logits and
  turns it into the gradients of `student_hidden` and `student_embedding`,
  which the backward pass only scales. The student's output projection so
  costs three matrix products per chunk (logits and two gradients) and the
  teacher's one, against four and two for the vocabulary-chunked losses,
  whose backward pass recomputes logits. Memory grows with
  `token_chunk_size * vocab` instead of `tokens * vocab`.

  Only the objective is differentiable; the per-token divergence and
  cross-entropy `[tokens]` are for metrics. Positions with weight 0 give 0
  and no gradient.

  Args:
    student_hidden: `[tokens, d_student]` final student hidden states.
    student_embedding: `[vocab, d_student]` student output embedding.
    targets: `[tokens]` next-token ids for the cross-entropy.
    weights: `[tokens]` weight of each position, for example the loss mask
      divided by the number of target tokens.
    spec: the static settings.
    teacher_hidden: `[tokens, d_teacher]`, with `spec.teacher == "full"`.
    teacher_embedding: `[vocab, d_teacher]`, with `spec.teacher == "full"`.
    teacher_top_ids: `[tokens, k]`, with `spec.teacher == "top_k"`.
    teacher_top_log_probs: `[tokens, k]`, with `spec.teacher == "top_k"`.
  """
  return _fused(spec, student_hidden, student_embedding, targets, weights, teacher_hidden,
                teacher_embedding, teacher_top_ids, teacher_top_log_probs)
