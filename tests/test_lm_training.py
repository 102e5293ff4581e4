"""Tests of the language-model train and eval steps on tiny Gemma 3 models."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_jax import losses
from distill_jax.losses import token_level
from distill_jax.models import gemma3
from distill_jax.training import lm_steps
from distill_jax.training import state as state_lib

VOCAB = 128
TEACHER = gemma3.Gemma3Config(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=64, final_logit_softcap=20.0)
STUDENT = gemma3.Gemma3Config(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                              num_kv_heads=1, head_dim=8, mlp_dim=32)
TRAIN = {"steps": 50, "learning_rate": 3e-3, "warmup_steps": 1, "optimizer": "adamw",
         "weight_decay": 0.0, "grad_clip_norm": 1.0}
BATCH, LENGTH = 4, 12


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  """Two packed records per row, a masked prompt in the second, padding at the end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  targets = np.roll(tokens, -1, axis=1)
  segment_ids = np.array([[1] * 5 + [2] * 5 + [0] * 2] * BATCH, np.int32)
  positions = np.array([list(range(5)) * 2 + [0, 0]] * BATCH, np.int32)
  loss_mask = np.array([[True] * 5 + [False, False, True, True, True] + [False] * 2] * BATCH)
  return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets),
          "segment_ids": jnp.asarray(segment_ids), "positions": jnp.asarray(positions),
          "loss_mask": jnp.asarray(loss_mask)}


def _models():
  teacher = gemma3.Gemma3Decoder(TEACHER, rngs=nnx.Rngs(0))
  student = gemma3.Gemma3Decoder(STUDENT, rngs=nnx.Rngs(1))
  return nnx.split(teacher, nnx.Param), nnx.split(student, nnx.Param)


def _step(mode: str, student_graphdef, teacher_graphdef, *, top_k: int = 0,
          temperature: float = 1.0, divergence: str = "forward_kl", alpha: float = 1.0):
  loss = token_level.TokenDistillationLoss(divergence, temperature=temperature, top_k=top_k,
                                           vocab_chunk_size=48)
  return functools.partial(
      lm_steps.lm_train_step, student_graphdef=student_graphdef,
      teacher_graphdef=teacher_graphdef if mode == "online" else None,
      optimizer=state_lib.make_optimizer(TRAIN), schedule=state_lib.make_learning_rate_schedule(
          TRAIN),
      step_config=lm_steps.LMStepConfig(mode=mode, loss=loss, alpha=alpha, vocab_size=VOCAB))


def _state(student_params):
  return state_lib.create_train_state(student_params, state_lib.make_optimizer(TRAIN))


def _full_logits(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  return model(batch["tokens"], batch["positions"], batch["segment_ids"]).logits


def test_online_loss_equals_full_logit_kl():
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()
  batch = _batch()
  step = _step("online", student_graphdef, teacher_graphdef, temperature=2.0)
  _, step_metrics = step(_state(student_params), teacher_params, batch, jax.random.key(0))

  teacher_logits = _full_logits(teacher_graphdef, teacher_params, batch)
  student_logits = _full_logits(student_graphdef, student_params, batch)
  expected = losses.masked_mean(losses.forward_kl(student_logits, teacher_logits, 2.0),
                                batch["loss_mask"])
  np.testing.assert_allclose(step_metrics.compute()["loss"], expected, rtol=1e-5)


def test_cross_entropy_step_equals_full_logit_loss():
  (_, _), (student_graphdef, student_params) = _models()
  batch = _batch(1)
  step = _step("cross_entropy", student_graphdef, None)
  _, step_metrics = step(_state(student_params), None, batch, jax.random.key(0))
  logits = _full_logits(student_graphdef, student_params, batch)
  expected = losses.masked_mean(
      losses.softmax_cross_entropy_with_integer_labels(logits, batch["targets"],
                                                       batch["loss_mask"]),
      batch["loss_mask"])
  np.testing.assert_allclose(step_metrics.compute()["loss"], expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_cached_top_k_equals_online_top_k(temperature):
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()
  batch = _batch(2)
  k = 10
  hidden, embedding, config = lm_steps.final_hidden(teacher_graphdef, teacher_params, batch)
  ids, log_probs = token_level.chunked_top_k(hidden, embedding, k, temperature=temperature,
                                             chunk_size=48, softcap=config.final_logit_softcap)
  cached_batch = dict(batch, teacher_top_ids=ids.reshape(BATCH, LENGTH, k),
                      teacher_top_log_probs=log_probs.reshape(BATCH, LENGTH, k))

  online = _step("online", student_graphdef, teacher_graphdef, top_k=k, temperature=temperature,
                 alpha=0.7)
  cached = _step("cached", student_graphdef, None, top_k=k, temperature=temperature, alpha=0.7)
  online_state, online_metrics = online(_state(student_params), teacher_params, batch,
                                        jax.random.key(0))
  cached_state, cached_metrics = cached(_state(student_params), None, cached_batch,
                                        jax.random.key(0))
  for name in ("loss", "divergence", "cross_entropy"):
    np.testing.assert_allclose(online_metrics.compute()[name], cached_metrics.compute()[name],
                               rtol=1e-5, err_msg=name)
  for online_leaf, cached_leaf in zip(jax.tree.leaves(online_state.params),
                                      jax.tree.leaves(cached_state.params)):
    np.testing.assert_allclose(online_leaf, cached_leaf, atol=1e-6)


def test_padding_and_masked_targets_never_change_loss():
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()
  batch = _batch(3)
  changed = dict(batch)
  padding = batch["segment_ids"] == 0
  changed["tokens"] = jnp.where(padding, 7, batch["tokens"])
  changed["targets"] = jnp.where(batch["loss_mask"], batch["targets"], 9)
  step = jax.jit(_step("online", student_graphdef, teacher_graphdef))

  state, first = step(_state(student_params), teacher_params, batch, jax.random.key(0))
  changed_state, second = step(_state(student_params), teacher_params, changed,
                               jax.random.key(0))
  assert float(first.compute()["loss"]) == float(second.compute()["loss"])
  for leaf, changed_leaf in zip(jax.tree.leaves(state.params),
                                jax.tree.leaves(changed_state.params)):
    np.testing.assert_array_equal(leaf, changed_leaf)


def test_teacher_unchanged_and_loss_decreases():
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()
  teacher_before = jax.tree.map(np.array, teacher_params)
  step = jax.jit(_step("online", student_graphdef, teacher_graphdef, top_k=16))
  state = _state(student_params)
  batch = _batch(4)
  first_loss = None
  for _ in range(15):
    state, step_metrics = step(state, teacher_params, batch, jax.random.key(0))
    first_loss = first_loss or float(step_metrics.compute()["loss"])
  last_loss = float(step_metrics.compute()["loss"])

  assert last_loss < 0.7 * first_loss
  for before, after in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(before, after)


def test_train_step_compiles_once():
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, teacher_params, batch):
    return _step("online", student_graphdef, teacher_graphdef, top_k=8)(
        state, teacher_params, batch, jax.random.key(0))

  state = _state(student_params)
  for seed in range(3):
    state, _ = step(state, teacher_params, _batch(seed))


def test_eval_sums_match_full_logits():
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()
  batch = _batch(5)
  teacher_hidden = lm_steps.final_hidden(teacher_graphdef, teacher_params, batch)[0]
  sums = lm_steps.lm_eval_sums(student_params, teacher_hidden, teacher_params, batch,
                               student_graphdef=student_graphdef,
                               teacher_graphdef=teacher_graphdef, vocab_size=VOCAB,
                               chunk_size=48)
  results = lm_steps.finalize_lm_sums(jax.device_get(sums))

  mask = np.asarray(batch["loss_mask"])
  teacher_logits = np.asarray(_full_logits(teacher_graphdef, teacher_params, batch), np.float64)
  student_logits = np.asarray(_full_logits(student_graphdef, student_params, batch), np.float64)
  targets = np.asarray(batch["targets"])

  def nll(logits):
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0][mask].mean()

  kl = losses.forward_kl(student_logits.astype(np.float32), teacher_logits.astype(np.float32))
  agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1))[mask].mean()
  assert results["target_tokens"] == mask.sum()
  np.testing.assert_allclose(results["student_nll"], nll(student_logits), rtol=1e-5)
  np.testing.assert_allclose(results["teacher_perplexity"], np.exp(nll(teacher_logits)),
                             rtol=1e-4)
  np.testing.assert_allclose(results["kl_teacher_student"], np.asarray(kl)[mask].mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(results["teacher_agreement"], agreement)
  assert 0.0 <= results["student_ece"] <= 1.0
  assert 0.0 <= results["teacher_next_token_accuracy"] <= 1.0


@pytest.mark.parametrize("mode, top_k, temperature", [
    ("online", 0, 2.0), ("online", 10, 1.0), ("cached", 10, 2.0), ("cross_entropy", 0, 1.0)])
def test_token_chunked_step_equals_vocab_chunked(mode, top_k, temperature):
  (teacher_graphdef, teacher_params), (student_graphdef, student_params) = _models()
  batch = _batch(6)
  if mode == "cached":
    hidden, embedding, config = lm_steps.final_hidden(teacher_graphdef, teacher_params, batch)
    ids, log_probs = token_level.chunked_top_k(hidden, embedding, top_k,
                                               temperature=temperature, chunk_size=48,
                                               softcap=config.final_logit_softcap)
    batch = dict(batch, teacher_top_ids=ids.reshape(BATCH, LENGTH, top_k),
                 teacher_top_log_probs=log_probs.reshape(BATCH, LENGTH, top_k))
  loss = token_level.TokenDistillationLoss("forward_kl", temperature=temperature, top_k=top_k,
                                           vocab_chunk_size=48)
  results = []
  for token_chunk_size in (0, 7):
    step = functools.partial(
        lm_steps.lm_train_step, student_graphdef=student_graphdef,
        teacher_graphdef=teacher_graphdef if mode == "online" else None,
        optimizer=state_lib.make_optimizer(TRAIN),
        schedule=state_lib.make_learning_rate_schedule(TRAIN),
        step_config=lm_steps.LMStepConfig(mode=mode, loss=loss, alpha=0.6, vocab_size=VOCAB,
                                          token_chunk_size=token_chunk_size))
    results.append(jax.jit(step)(_state(student_params),
                                 teacher_params if mode == "online" else None, batch,
                                 jax.random.key(0)))
  (vocab_state, vocab_metrics), (token_state, token_metrics) = results
  for name in ("loss", "divergence", "cross_entropy", "grad_norm"):
    np.testing.assert_allclose(token_metrics.compute()[name], vocab_metrics.compute()[name],
                               rtol=1e-4, err_msg=name)
  for vocab_leaf, token_leaf in zip(jax.tree.leaves(vocab_state.params),
                                    jax.tree.leaves(token_state.params)):
    np.testing.assert_allclose(token_leaf, vocab_leaf, atol=2e-6)
