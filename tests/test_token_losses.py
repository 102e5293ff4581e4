"""Tests of the chunked token-level losses in `distill_jax.losses.token_level`.

The unchunked references are the full-logit divergences of
`distill_jax.losses.divergences`, applied to `hidden @ embedding.T`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from distill_jax.errors import ConfigError
from distill_jax.losses import token_level

TOKENS, VOCAB, D_STUDENT, D_TEACHER = 12, 1000, 16, 24
# 1000 is not a multiple of 128, so the last chunk is padded.
CHUNK = 128


def _inputs(seed: int = 0, vocab: int = VOCAB):
  keys = jax.random.split(jax.random.key(seed), 4)
  return dict(
      student_hidden=jax.random.normal(keys[0], (TOKENS, D_STUDENT)),
      student_embedding=jax.random.normal(keys[1], (vocab, D_STUDENT)) * 0.5,
      teacher_hidden=jax.random.normal(keys[2], (TOKENS, D_TEACHER)),
      teacher_embedding=jax.random.normal(keys[3], (vocab, D_TEACHER)) * 0.5,
  )


def _reference(inputs, loss, where=None, student_softcap=None, teacher_softcap=None):
  """The same divergence from full `[tokens, vocab]` logits."""
  student_logits = token_level.soft_cap(
      inputs["student_hidden"] @ inputs["student_embedding"].T, student_softcap)
  teacher_logits = token_level.soft_cap(
      inputs["teacher_hidden"] @ inputs["teacher_embedding"].T, teacher_softcap)
  args = (student_logits, teacher_logits)
  if loss.divergence == "forward_kl":
    return losses.forward_kl(*args, loss.temperature, where)
  if loss.divergence == "reverse_kl":
    return losses.reverse_kl(*args, loss.temperature, where)
  if loss.divergence == "jsd":
    return losses.generalized_jsd(*args, loss.beta, loss.temperature, where)
  if loss.divergence == "tvd":
    return losses.total_variation(*args, loss.temperature, where)
  return losses.skew_kl(*args, loss.beta, loss.temperature, where)


LOSS_CASES = [
    token_level.TokenDistillationLoss("forward_kl", temperature=1.0, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("forward_kl", temperature=2.0, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("reverse_kl", temperature=1.5, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("jsd", temperature=1.0, beta=0.5, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("jsd", temperature=2.0, beta=0.1, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("jsd", beta=0.0, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("jsd", beta=1.0, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("tvd", temperature=2.0, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("skew_kl", beta=0.1, vocab_chunk_size=CHUNK),
    token_level.TokenDistillationLoss("skew_kl", temperature=2.0, beta=0.5,
                                      vocab_chunk_size=CHUNK),
]


@pytest.mark.parametrize("loss", LOSS_CASES, ids=lambda l: f"{l.divergence}-T{l.temperature}-"
                         f"b{l.beta}")
def test_chunked_equals_unchunked(loss):
  inputs = _inputs()
  chunked = jax.jit(functools.partial(token_level.chunked_divergence, loss=loss))(**inputs)
  expected = _reference(inputs, loss)
  np.testing.assert_allclose(chunked, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", LOSS_CASES[:4] + LOSS_CASES[7:9],
                         ids=lambda l: f"{l.divergence}-T{l.temperature}-b{l.beta}")
def test_chunked_gradient_equals_unchunked(loss):
  inputs = _inputs(1)

  def chunked_total(student_hidden, student_embedding):
    return token_level.chunked_divergence(
        student_hidden, student_embedding, inputs["teacher_hidden"],
        inputs["teacher_embedding"], loss).sum()

  def reference_total(student_hidden, student_embedding):
    return _reference(dict(inputs, student_hidden=student_hidden,
                           student_embedding=student_embedding), loss).sum()

  argnums = (0, 1)
  got = jax.jit(jax.grad(chunked_total, argnums))(inputs["student_hidden"],
                                                  inputs["student_embedding"])
  want = jax.grad(reference_total, argnums)(inputs["student_hidden"],
                                            inputs["student_embedding"])
  for got_part, want_part in zip(got, want):
    np.testing.assert_allclose(got_part, want_part, atol=1e-5, rtol=1e-4)


def test_chunked_with_softcap_equals_unchunked():
  inputs = _inputs(2)
  loss = LOSS_CASES[1]
  chunked = token_level.chunked_divergence(**inputs, loss=loss, student_softcap=5.0,
                                           teacher_softcap=3.0)
  expected = _reference(inputs, loss, student_softcap=5.0, teacher_softcap=3.0)
  np.testing.assert_allclose(chunked, expected, atol=1e-5, rtol=1e-5)


def test_chunk_size_does_not_change_result():
  inputs = _inputs(3)
  values = [
      token_level.chunked_divergence(
          **inputs, loss=token_level.TokenDistillationLoss("jsd", vocab_chunk_size=size))
      for size in (7, 250, 1000, 4096)
  ]
  for other in values[1:]:
    np.testing.assert_allclose(other, values[0], atol=1e-5, rtol=1e-5)


def test_masked_tokens_never_change_loss():
  inputs = _inputs(4)
  where = jnp.arange(TOKENS) % 3 != 0
  loss = LOSS_CASES[0]

  def total(student_hidden, teacher_hidden):
    values = token_level.chunked_divergence(
        student_hidden, inputs["student_embedding"], teacher_hidden,
        inputs["teacher_embedding"], loss, where=where)
    return values.sum(), values

  (clean_total, clean_values), clean_grad = jax.value_and_grad(total, has_aux=True)(
      inputs["student_hidden"], inputs["teacher_hidden"])
  poisoned_student = jnp.where(where[:, None], inputs["student_hidden"], jnp.nan)
  poisoned_teacher = jnp.where(where[:, None], inputs["teacher_hidden"], 1e6)
  (dirty_total, dirty_values), dirty_grad = jax.value_and_grad(total, has_aux=True)(
      poisoned_student, poisoned_teacher)

  assert float(clean_total) == float(dirty_total)
  np.testing.assert_array_equal(clean_values, dirty_values)
  np.testing.assert_array_equal(clean_grad, dirty_grad)
  assert not np.any(np.asarray(clean_values)[~np.asarray(where)])
  assert not np.any(np.asarray(clean_grad)[~np.asarray(where)])


def test_masked_mean_equals_mean_over_kept_tokens():
  inputs = _inputs(5)
  where = jnp.arange(TOKENS) >= 4
  loss = LOSS_CASES[2]
  masked = losses.masked_mean(token_level.chunked_divergence(**inputs, loss=loss, where=where),
                              where)
  kept = {name: value[4:] if "hidden" in name else value for name, value in inputs.items()}
  sliced = jnp.mean(_reference(kept, loss))
  np.testing.assert_allclose(masked, sliced, atol=1e-6, rtol=1e-5)


def test_chunked_top_k_equals_full_top_k():
  inputs = _inputs(6)
  ids, log_probs = token_level.chunked_top_k(inputs["teacher_hidden"],
                                             inputs["teacher_embedding"], 10, temperature=2.0,
                                             chunk_size=CHUNK)
  full = jax.nn.log_softmax(inputs["teacher_hidden"] @ inputs["teacher_embedding"].T / 2.0)
  want_log_probs, want_ids = jax.lax.top_k(full, 10)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(log_probs, want_log_probs, atol=1e-5)


def test_tail_bucket_holds_remaining_mass():
  log_probs = jnp.log(jnp.array([[0.5, 0.2, 0.1], [0.7, 0.2, 0.1], [0.9, 0.05, 1e-9]]))
  buckets = token_level.with_tail_bucket(log_probs)
  probs = np.exp(np.asarray(buckets, np.float64))
  assert buckets.shape == (3, 4)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(probs[0, 3], 0.2, rtol=1e-5)
  np.testing.assert_allclose(probs[2, 3], 0.05 - 1e-9, rtol=1e-4)
  assert probs[1, 3] < 1e-6


def test_top_k_of_whole_vocab_equals_full_divergence():
  vocab = 64
  inputs = _inputs(7, vocab=vocab)
  for divergence in token_level.TOKEN_DIVERGENCES:
    loss = token_level.TokenDistillationLoss(divergence, temperature=2.0, beta=0.3, top_k=vocab,
                                             vocab_chunk_size=16)
    ids, log_probs = token_level.chunked_top_k(inputs["teacher_hidden"],
                                               inputs["teacher_embedding"], vocab,
                                               temperature=2.0, chunk_size=16)
    top_k = token_level.top_k_divergence(inputs["student_hidden"], inputs["student_embedding"],
                                         ids, log_probs, loss)
    np.testing.assert_allclose(top_k, _reference(inputs, loss), atol=2e-5, rtol=1e-4,
                               err_msg=divergence)


def test_top_k_divergence_matches_bucket_formula():
  inputs = _inputs(8)
  k, temperature = 5, 1.5
  loss = token_level.TokenDistillationLoss("forward_kl", temperature=temperature, top_k=k,
                                           vocab_chunk_size=CHUNK)
  ids, log_probs = token_level.chunked_top_k(inputs["teacher_hidden"],
                                             inputs["teacher_embedding"], k,
                                             temperature=temperature, chunk_size=CHUNK)
  values = token_level.top_k_divergence(inputs["student_hidden"], inputs["student_embedding"],
                                        ids, log_probs, loss)

  p = np.exp(np.asarray(log_probs, np.float64))
  p = np.concatenate([p, 1 - p.sum(-1, keepdims=True)], -1)
  student = np.asarray(inputs["student_hidden"] @ inputs["student_embedding"].T,
                       np.float64) / temperature
  q_full = np.exp(student - student.max(-1, keepdims=True))
  q_full /= q_full.sum(-1, keepdims=True)
  q = np.take_along_axis(q_full, np.asarray(ids), -1)
  q = np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)
  expected = temperature**2 * (p * (np.log(p) - np.log(q))).sum(-1)
  np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)


def test_student_log_probs_at_equals_gather():
  inputs = _inputs(9)
  ids = jax.random.randint(jax.random.key(0), (TOKENS, 7), 0, VOCAB)
  got = token_level.student_log_probs_at(inputs["student_hidden"],
                                         inputs["student_embedding"], ids, temperature=1.0,
                                         chunk_size=CHUNK, softcap=None)
  full = jax.nn.log_softmax(inputs["student_hidden"] @ inputs["student_embedding"].T)
  np.testing.assert_allclose(got, jnp.take_along_axis(full, ids, -1), atol=1e-5)


def test_chunked_cross_entropy_equals_full():
  inputs = _inputs(10)
  labels = jax.random.randint(jax.random.key(1), (TOKENS,), 0, VOCAB)
  where = jnp.arange(TOKENS) < 9
  got = token_level.chunked_cross_entropy(inputs["student_hidden"], inputs["student_embedding"],
                                          labels, where=where, chunk_size=CHUNK)
  logits = inputs["student_hidden"] @ inputs["student_embedding"].T
  want = losses.softmax_cross_entropy_with_integer_labels(logits, labels, where)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("divergence", "kl", "divergence must be one of"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("temperature", -1.0, "temperature must be a finite number > 0"),
    ("beta", 1.5, "beta must be a number in [0, 1]"),
    ("top_k", -1, "top_k must be 0"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("vocab_chunk_size", 0, "vocab_chunk_size must be >= 1"),
])
def test_loss_config_rejects_invalid(field, value, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    token_level.TokenDistillationLoss(**{field: value})


def test_top_k_larger_than_vocab_rejected():
  loss = token_level.TokenDistillationLoss(top_k=300)
  with pytest.raises(ConfigError, match="top_k is 300, larger than the vocabulary of 256"):
    loss.check_vocab_size(256)


def test_vocab_summary_equals_full_softmax():
  inputs = _inputs(11)
  summary = token_level.vocab_summary(inputs["student_hidden"], inputs["student_embedding"],
                                      chunk_size=CHUNK, softcap=4.0)
  logits = token_level.soft_cap(inputs["student_hidden"] @ inputs["student_embedding"].T, 4.0)
  np.testing.assert_allclose(summary.log_partition, jax.nn.logsumexp(logits, -1), atol=1e-5)
  np.testing.assert_allclose(summary.max_logit, logits.max(-1), atol=1e-6)
  np.testing.assert_array_equal(summary.argmax, jnp.argmax(logits, -1))


FUSED_CASES = [
    ("none", "forward_kl", 1.0, 0, 0.0),
    ("full", "forward_kl", 2.0, 0, 1.0),
    ("full", "jsd", 1.0, 0, 0.6),
    ("full", "tvd", 1.5, 0, 0.5),
    ("full", "reverse_kl", 1.0, 16, 0.8),
    ("top_k", "forward_kl", 2.0, 16, 0.7),
    ("top_k", "skew_kl", 1.0, 8, 1.0),
]


@pytest.mark.parametrize("teacher, divergence, temperature, top_k, alpha", FUSED_CASES)
def test_fused_loss_and_gradients_equal_reference(teacher, divergence, temperature, top_k,
                                                  alpha):
  inputs = _inputs(12)
  targets = jax.random.randint(jax.random.key(2), (TOKENS,), 0, VOCAB)
  where = jnp.arange(TOKENS) % 4 != 1
  weights = where / jnp.sum(where)
  loss = token_level.TokenDistillationLoss(divergence, temperature=temperature, beta=0.3,
                                           top_k=top_k, vocab_chunk_size=CHUNK)
  spec = token_level.FusedLossSpec(loss=loss, alpha=alpha, teacher=teacher, token_chunk_size=5,
                                   student_softcap=6.0, teacher_softcap=4.0)
  teacher_args = {}
  if teacher == "full":
    teacher_args = dict(teacher_hidden=inputs["teacher_hidden"],
                        teacher_embedding=inputs["teacher_embedding"])
  elif teacher == "top_k":
    ids, log_probs = token_level.chunked_top_k(inputs["teacher_hidden"],
                                               inputs["teacher_embedding"], top_k,
                                               temperature=temperature, chunk_size=CHUNK,
                                               softcap=4.0)
    teacher_args = dict(teacher_top_ids=ids, teacher_top_log_probs=log_probs)

  def fused(student_hidden, student_embedding):
    return token_level.fused_token_loss(student_hidden, student_embedding, targets, weights,
                                        spec, **teacher_args)[0]

  def reference(student_hidden, student_embedding):
    cross_entropy = token_level.chunked_cross_entropy(
        student_hidden, student_embedding, targets, where=where, chunk_size=CHUNK, softcap=6.0)
    if teacher == "none":
      divergence_values = jnp.zeros_like(cross_entropy)
    elif teacher == "full" and not top_k:
      divergence_values = token_level.chunked_divergence(
          student_hidden, student_embedding, inputs["teacher_hidden"],
          inputs["teacher_embedding"], loss, where=where, student_softcap=6.0,
          teacher_softcap=4.0)
    else:
      ids, log_probs = teacher_args.get("teacher_top_ids"), teacher_args.get(
          "teacher_top_log_probs")
      if ids is None:
        ids, log_probs = token_level.chunked_top_k(
            inputs["teacher_hidden"], inputs["teacher_embedding"], top_k,
            temperature=temperature, chunk_size=CHUNK, softcap=4.0)
      divergence_values = token_level.top_k_divergence(student_hidden, student_embedding, ids,
                                                       log_probs, loss, where=where,
                                                       student_softcap=6.0)
    total = alpha * divergence_values + (1 - alpha) * cross_entropy
    return jnp.sum(jnp.where(where, weights * total, 0.0))

  args = (inputs["student_hidden"], inputs["student_embedding"])
  got_value, got_grads = jax.jit(jax.value_and_grad(fused, (0, 1)))(*args)
  want_value, want_grads = jax.value_and_grad(reference, (0, 1))(*args)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-6)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fused_loss_ignores_masked_positions():
  inputs = _inputs(13)
  targets = jnp.zeros((TOKENS,), jnp.int32)
  weights = jnp.where(jnp.arange(TOKENS) < 6, 1.0 / 6, 0.0)
  spec = token_level.FusedLossSpec(loss=token_level.TokenDistillationLoss(), alpha=0.5,
                                   teacher="full", token_chunk_size=4)
  poisoned = jnp.where((weights > 0)[:, None], inputs["student_hidden"], jnp.nan)

  def total(student_hidden):
    return token_level.fused_token_loss(student_hidden, inputs["student_embedding"], targets,
                                        weights, spec, teacher_hidden=inputs["teacher_hidden"],
                                        teacher_embedding=inputs["teacher_embedding"])[0]

  clean_value, clean_grad = jax.value_and_grad(total)(inputs["student_hidden"])
  dirty_value, dirty_grad = jax.value_and_grad(total)(poisoned)
  assert float(clean_value) == float(dirty_value)
  np.testing.assert_array_equal(clean_grad, dirty_grad)
  assert not np.any(np.asarray(clean_grad)[6:])
