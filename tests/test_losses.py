"""Tests of the per-example distillation losses in `distill_jax.losses`.

Golden values come from independent float64 NumPy and SciPy formulas written
in this file, not from the code under test.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from scipy import special

from distill_jax import losses
from distill_jax.errors import ConfigError

TEMPERATURES = (0.5, 1.0, 4.0)
SHAPE_2D = (8, 10)
SHAPE_3D = (2, 5, 17)
# Few distinct shapes keep the suite fast, because eager JAX compiles every
# operation once per input shape.
SHAPES = (SHAPE_2D, SHAPE_3D, (16, 3))


# Float64 reference formulas. `s` and `t` are student and teacher logits, and
# the last axis is the class axis.


def _ref_log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
  return special.log_softmax(np.asarray(logits, np.float64) / temperature, -1)


def _ref_kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  """KL(p || q) with 0 * log 0 = 0."""
  p = np.exp(log_p)
  with np.errstate(invalid="ignore"):
    terms = np.where(p > 0, p * (log_p - log_q), 0.0)
  return terms.sum(-1)


def ref_forward_kl(s, t, temperature=1.0):
  log_p = _ref_log_probs(t, temperature)
  log_q = _ref_log_probs(s, temperature)
  return _ref_kl(log_p, log_q) * temperature**2


def ref_reverse_kl(s, t, temperature=1.0):
  log_p = _ref_log_probs(t, temperature)
  log_q = _ref_log_probs(s, temperature)
  return _ref_kl(log_q, log_p) * temperature**2


def ref_jsd(s, t, beta, temperature=1.0):
  p = np.exp(_ref_log_probs(t, temperature))
  q = np.exp(_ref_log_probs(s, temperature))
  m = beta * p + (1.0 - beta) * q

  kl_p_m = np.sum(special.rel_entr(p, m), -1)
  kl_q_m = np.sum(special.rel_entr(q, m), -1)
  return (beta * kl_p_m + (1.0 - beta) * kl_q_m) * temperature**2


def ref_tvd(s, t, temperature=1.0):
  p = np.exp(_ref_log_probs(t, temperature))
  q = np.exp(_ref_log_probs(s, temperature))
  return 0.5 * np.abs(p - q).sum(-1)


def ref_logit_mse(s, t):
  diff = np.asarray(s, np.float64) - np.asarray(t, np.float64)
  return np.mean(diff**2, -1)


def ref_cross_entropy(logits, labels):
  log_probs = _ref_log_probs(logits, 1.0)
  return -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]


def _random_logits(seed: int, shape, scale: float = 3.0) -> np.ndarray:
  return (np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32)


def _random_pair(seed: int, shape, scale: float = 3.0):
  return _random_logits(seed, shape, scale), _random_logits(
      seed + 1000, shape, scale
  )


def _random_labels(seed: int, shape) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, shape[-1], size=shape[:-1])


# Divergences that take (student_logits, teacher_logits, where=...), each with
# its keyword arguments, used by the tests that apply to all of them.
DIVERGENCE_CASES = {
    "forward_kl": functools.partial(losses.forward_kl, temperature=2.0),
    "reverse_kl": functools.partial(losses.reverse_kl, temperature=2.0),
    "jsd_0.3": functools.partial(
        losses.generalized_jsd, beta=0.3, temperature=2.0
    ),
    "jsd_0": functools.partial(losses.generalized_jsd, beta=0.0),
    "jsd_1": functools.partial(losses.generalized_jsd, beta=1.0),
    "tvd": functools.partial(losses.total_variation, temperature=2.0),
    "logit_mse": losses.logit_mse,
}


# Golden values.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_forward_kl_golden(shape, temperature):
  s, t = _random_pair(0, shape)

  actual = losses.forward_kl(s, t, temperature=temperature)

  chex.assert_shape(actual, shape[:-1])
  np.testing.assert_allclose(
      actual, ref_forward_kl(s, t, temperature), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_reverse_kl_golden(shape, temperature):
  s, t = _random_pair(1, shape)

  actual = losses.reverse_kl(s, t, temperature=temperature)

  chex.assert_shape(actual, shape[:-1])
  np.testing.assert_allclose(
      actual, ref_reverse_kl(s, t, temperature), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", (0.1, 0.5, 0.9))
def test_generalized_jsd_golden(shape, temperature, beta):
  s, t = _random_pair(2, shape)

  actual = losses.generalized_jsd(s, t, beta=beta, temperature=temperature)

  chex.assert_shape(actual, shape[:-1])
  np.testing.assert_allclose(
      actual, ref_jsd(s, t, beta, temperature), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_total_variation_golden(shape, temperature):
  s, t = _random_pair(3, shape)

  actual = losses.total_variation(s, t, temperature=temperature)

  chex.assert_shape(actual, shape[:-1])
  np.testing.assert_allclose(
      actual, ref_tvd(s, t, temperature), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_mse_golden(shape):
  s, t = _random_pair(4, shape)

  actual = losses.logit_mse(s, t)

  chex.assert_shape(actual, shape[:-1])
  np.testing.assert_allclose(actual, ref_logit_mse(s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_golden(shape):
  logits = _random_logits(5, shape)
  labels = _random_labels(6, shape)

  actual = losses.softmax_cross_entropy_with_integer_labels(logits, labels)

  chex.assert_shape(actual, shape[:-1])
  np.testing.assert_allclose(
      actual, ref_cross_entropy(logits, labels), rtol=1e-5, atol=1e-6
  )


def test_forward_kl_zero_teacher_probs():
  # Teacher classes with probability 0, either from -inf or from underflow
  # in float32, contribute 0 and must not give NaN.
  s = np.array([[1.0, 2.0, 0.5, -1.0]], np.float32)
  t = np.array([[3.0, -1e4, -np.inf, 0.0]], np.float32)

  actual = losses.forward_kl(s, t)
  grad = jax.jit(jax.grad(lambda x: losses.forward_kl(x, t).sum()))(s)

  np.testing.assert_allclose(actual, ref_forward_kl(s, t), rtol=1e-5)
  chex.assert_tree_all_finite(actual)
  chex.assert_tree_all_finite(grad)


def test_bfloat16_inputs_upcast():
  s, t = _random_pair(7, SHAPE_2D)
  s16 = jnp.asarray(s, jnp.bfloat16)
  t16 = jnp.asarray(t, jnp.bfloat16)

  for name, fn in DIVERGENCE_CASES.items():
    assert fn(s16, t16).dtype == jnp.float32, name


def test_shape_mismatch_raises():
  s, t = _random_pair(8, SHAPE_2D)

  with pytest.raises(ValueError, match="same shape"):
    losses.forward_kl(s, t[:, :5])
  with pytest.raises(ValueError, match="labels must have shape"):
    losses.softmax_cross_entropy_with_integer_labels(s, np.zeros((3,), int))


@pytest.mark.parametrize("temperature", (0.0, -1.0, math.nan, math.inf))
def test_functions_reject_invalid_temperature(temperature):
  s, t = _random_pair(9, SHAPE_2D)

  for fn in (
      losses.forward_kl,
      losses.reverse_kl,
      losses.generalized_jsd,
      losses.total_variation,
  ):
    with pytest.raises(ConfigError, match="temperature"):
      fn(s, t, temperature=temperature)


@pytest.mark.parametrize("beta", (-0.5, 1.5))
def test_generalized_jsd_rejects_invalid_beta(beta):
  s, t = _random_pair(10, SHAPE_2D)

  with pytest.raises(ConfigError, match="beta"):
    losses.generalized_jsd(s, t, beta=beta)


# jit.


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_divergence_jit_matches_eager(name):
  fn = DIVERGENCE_CASES[name]
  s, t = _random_pair(11, SHAPE_3D)
  mask = np.random.RandomState(12).rand(*SHAPE_3D[:-1]) > 0.3

  for where in (None, mask):
    eager = fn(s, t, where=where)
    jitted = jax.jit(fn)(s, t, where=where)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_cross_entropy_and_masked_mean_jit_matches_eager():
  logits = _random_logits(13, SHAPE_3D)
  labels = _random_labels(14, SHAPE_3D)
  mask = np.random.RandomState(15).rand(*SHAPE_3D[:-1]) > 0.3
  cross_entropy = losses.softmax_cross_entropy_with_integer_labels

  eager = cross_entropy(logits, labels, where=mask)
  jitted = jax.jit(cross_entropy)(logits, labels, where=mask)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-6)

  eager_mean = losses.masked_mean(eager, mask)
  jitted_mean = jax.jit(losses.masked_mean)(eager, mask)
  chex.assert_trees_all_close(jitted_mean, eager_mean, rtol=1e-6, atol=1e-6)


# Gradients.


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_divergence_grads_float64(name):
  fn = DIVERGENCE_CASES[name]
  s, t = _random_pair(16, SHAPE_2D, scale=1.5)
  mask = np.arange(SHAPE_2D[0]) % 3 != 1

  # The context manager restores the float32 default on exit, so float64
  # does not leak into other tests.
  with jax.enable_x64(True):
    s64 = jnp.asarray(s, jnp.float64)
    t64 = jnp.asarray(t, jnp.float64)
    assert fn(s64, t64).dtype == jnp.float64

    jax.test_util.check_grads(
        lambda x: fn(x, t64), (s64,), order=2, modes=["rev"]
    )
    jax.test_util.check_grads(
        lambda x: fn(x, t64, where=mask), (s64,), order=1, modes=["rev"]
    )

  assert jnp.asarray(1.0).dtype == jnp.float32


def test_cross_entropy_grads_float64():
  logits = _random_logits(17, SHAPE_2D, scale=1.5)
  labels = _random_labels(18, SHAPE_2D)

  with jax.enable_x64(True):
    logits64 = jnp.asarray(logits, jnp.float64)
    jax.test_util.check_grads(
        lambda x: losses.softmax_cross_entropy_with_integer_labels(x, labels),
        (logits64,),
        order=2,
        modes=["rev"],
    )


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_divergence_extreme_logits_finite(name):
  fn = DIVERGENCE_CASES[name]
  s, t = _random_pair(19, SHAPE_2D, scale=1e4)

  values = fn(s, t)
  grad = jax.jit(jax.grad(lambda x: fn(x, t).sum()))(s)

  chex.assert_tree_all_finite(values)
  chex.assert_tree_all_finite(grad)


def test_cross_entropy_extreme_logits_finite():
  logits = _random_logits(20, SHAPE_2D, scale=1e4)
  labels = _random_labels(21, SHAPE_2D)
  cross_entropy = losses.softmax_cross_entropy_with_integer_labels

  values = cross_entropy(logits, labels)
  grad = jax.jit(jax.grad(lambda x: cross_entropy(x, labels).sum()))(logits)

  chex.assert_tree_all_finite(values)
  chex.assert_tree_all_finite(grad)


# Masking.


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_masked_mean_equals_sliced_2d(name):
  fn = DIVERGENCE_CASES[name]
  s, t = _random_pair(22, SHAPE_2D)
  mask = np.array([True, False, True, True, False, True, False, True])

  masked = losses.masked_mean(fn(s, t, where=mask), mask)
  sliced = jnp.mean(fn(s[mask], t[mask]))

  np.testing.assert_allclose(masked, sliced, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_masked_mean_equals_sliced_3d(name):
  fn = DIVERGENCE_CASES[name]
  s, t = _random_pair(23, SHAPE_3D)
  mask = np.random.RandomState(24).rand(*SHAPE_3D[:-1]) > 0.4

  masked = losses.masked_mean(fn(s, t, where=mask), mask)
  sliced = jnp.mean(fn(s[mask], t[mask]))

  np.testing.assert_allclose(masked, sliced, rtol=1e-6, atol=1e-7)


def test_cross_entropy_masked_equals_sliced():
  logits = _random_logits(25, SHAPE_3D)
  labels = _random_labels(26, SHAPE_3D)
  mask = np.random.RandomState(27).rand(*SHAPE_3D[:-1]) > 0.4
  cross_entropy = losses.softmax_cross_entropy_with_integer_labels

  masked = losses.masked_mean(cross_entropy(logits, labels, where=mask), mask)
  sliced = jnp.mean(cross_entropy(logits[mask], labels[mask]))

  np.testing.assert_allclose(masked, sliced, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_broadcast_mask_matches_full_mask(name):
  fn = DIVERGENCE_CASES[name]
  s, t = _random_pair(28, SHAPE_3D)
  row_mask = np.array([[True], [False]])

  broadcast = fn(s, t, where=row_mask)
  full = fn(s, t, where=np.broadcast_to(row_mask, SHAPE_3D[:-1]))

  np.testing.assert_array_equal(broadcast, full)


def _garbage_batch(seed: int):
  """Return logits whose masked-out rows contain NaN and +-inf."""
  s, t = _random_pair(seed, SHAPE_2D)
  mask = np.array([True, False, True, False, True, True, False, True])

  s[1] = np.nan
  t[1] = np.inf
  s[3, :3] = np.inf
  t[3, :3] = -np.inf
  return s, t, mask


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_masked_garbage_rows_zero_and_finite(name):
  fn = DIVERGENCE_CASES[name]
  s, t, mask = _garbage_batch(29)

  values = fn(s, t, where=mask)
  grad = jax.jit(
      jax.grad(lambda x: losses.masked_mean(fn(x, t, where=mask), mask))
  )(s)

  chex.assert_tree_all_finite(values)
  np.testing.assert_array_equal(values[~mask], 0.0)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[~mask], 0.0)
  assert np.any(grad[mask] != 0.0)


def test_cross_entropy_masked_garbage_rows():
  s, _, mask = _garbage_batch(30)
  labels = np.array([0, -1, 2, 99, 5, 1, -7, 9])
  cross_entropy = losses.softmax_cross_entropy_with_integer_labels

  values = cross_entropy(s, labels, where=mask)
  grad = jax.jit(
      jax.grad(
          lambda x: losses.masked_mean(
              cross_entropy(x, labels, where=mask), mask
          )
      )
  )(s)

  chex.assert_tree_all_finite(values)
  np.testing.assert_array_equal(values[~mask], 0.0)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[~mask], 0.0)


def test_masked_mean_edge_cases():
  values = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
  mask = np.array([True, False, True, False])

  assert float(losses.masked_mean(values, mask)) == 2.0
  assert float(losses.masked_mean(values, np.zeros(4, bool))) == 0.0
  assert float(losses.masked_mean(np.array([1.0, 2.0, 6.0]))) == 3.0


# Properties.


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_divergence_nonnegative(name):
  fn = DIVERGENCE_CASES[name]

  for seed in range(3):
    s, t = _random_pair(31 + seed, SHAPE_3D, scale=4.0)
    assert np.all(np.asarray(fn(s, t)) >= 0.0)


@pytest.mark.parametrize("name", DIVERGENCE_CASES)
def test_divergence_zero_for_identical(name):
  fn = DIVERGENCE_CASES[name]
  logits = _random_logits(34, SHAPE_3D)

  np.testing.assert_allclose(fn(logits, logits), 0.0, atol=1e-6)


def test_kl_asymmetric():
  # The teacher is peaked and the student is uniform over three classes.
  s = np.zeros((1, 3), np.float32)
  t = np.array([[2.0, 0.0, 0.0]], np.float32)

  forward = float(losses.forward_kl(s, t)[0])
  reverse = float(losses.reverse_kl(s, t)[0])

  assert forward == pytest.approx(ref_forward_kl(s, t)[0], rel=1e-5)
  assert reverse == pytest.approx(ref_reverse_kl(s, t)[0], rel=1e-5)
  assert abs(forward - reverse) > 1e-2


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_jsd_endpoints_match_kl_exactly(temperature):
  s, t = _random_pair(35, SHAPE_3D)
  mask = np.random.RandomState(36).rand(*SHAPE_3D[:-1]) > 0.5

  for where in (None, mask):
    at_zero = losses.generalized_jsd(s, t, 0.0, temperature, where)
    at_one = losses.generalized_jsd(s, t, 1.0, temperature, where)

    np.testing.assert_array_equal(
        at_zero, losses.forward_kl(s, t, temperature, where)
    )
    np.testing.assert_array_equal(
        at_one, losses.reverse_kl(s, t, temperature, where)
    )


def test_jsd_half_symmetric():
  s, t = _random_pair(37, SHAPE_2D)

  np.testing.assert_allclose(
      losses.generalized_jsd(s, t, beta=0.5),
      losses.generalized_jsd(t, s, beta=0.5),
      rtol=1e-5,
      atol=1e-7,
  )


def test_jsd_normalised_limits_match_kl():
  s, t = _random_pair(38, SHAPE_2D, scale=1.0)
  small = 1e-4

  near_zero = losses.generalized_jsd(s, t, beta=small) / small
  near_one = losses.generalized_jsd(s, t, beta=1.0 - small) / small

  np.testing.assert_allclose(near_zero, ref_forward_kl(s, t), rtol=1e-2)
  np.testing.assert_allclose(near_one, ref_reverse_kl(s, t), rtol=1e-2)


def test_jsd_half_bounded_by_log2():
  s, t = _random_pair(39, SHAPE_2D, scale=10.0)
  disjoint_s = np.array([[50.0, -50.0]], np.float32)
  disjoint_t = np.array([[-50.0, 50.0]], np.float32)

  random_values = losses.generalized_jsd(s, t, beta=0.5)
  disjoint_value = losses.generalized_jsd(disjoint_s, disjoint_t, beta=0.5)

  assert np.all(np.asarray(random_values) <= math.log(2.0) + 1e-6)
  np.testing.assert_allclose(disjoint_value, math.log(2.0), rtol=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_total_variation_in_unit_interval(temperature):
  s, t = _random_pair(40, SHAPE_2D, scale=10.0)
  disjoint_s = np.array([[50.0, -50.0]], np.float32)
  disjoint_t = np.array([[-50.0, 50.0]], np.float32)

  values = np.asarray(losses.total_variation(s, t, temperature))

  # Float32 rounding can put a distance at 1 + 1 ulp.
  assert np.all(values >= 0.0)
  assert np.all(values <= 1.0 + 1e-6)
  np.testing.assert_allclose(
      losses.total_variation(disjoint_s, disjoint_t), 1.0, rtol=1e-6
  )


@pytest.mark.parametrize("temperature", (0.5, 4.0))
def test_forward_kl_temperature_scaling(temperature):
  s, t = _random_pair(41, SHAPE_2D)
  p = special.softmax(t.astype(np.float64) / temperature, -1)
  q = special.softmax(s.astype(np.float64) / temperature, -1)
  expected = temperature**2 * np.sum(special.rel_entr(p, q), -1)

  actual = losses.forward_kl(s, t, temperature=temperature)
  unit = losses.forward_kl(s / temperature, t / temperature, temperature=1.0)

  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(actual, temperature**2 * unit, rtol=1e-5)


# DistillationLoss.


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_distillation_loss_total(divergence):
  s, t = _random_pair(42, SHAPE_3D)
  labels = _random_labels(43, SHAPE_3D)
  loss = losses.DistillationLoss(
      divergence=divergence, temperature=2.0, alpha=0.3, beta=0.2
  )

  terms = loss(s, t, labels)
  expected_divergence = {
      "forward_kl": losses.forward_kl(s, t, 2.0),
      "reverse_kl": losses.reverse_kl(s, t, 2.0),
      "jsd": losses.generalized_jsd(s, t, 0.2, 2.0),
      "tvd": losses.total_variation(s, t, 2.0),
      "skew_kl": losses.skew_kl(s, t, 0.2, 2.0),
      "logit_mse": losses.logit_mse(s, t),
  }[divergence]
  expected_cross_entropy = ref_cross_entropy(s, labels)

  assert isinstance(terms, losses.LossTerms)
  chex.assert_shape(terms, SHAPE_3D[:-1])
  np.testing.assert_array_equal(terms.divergence, expected_divergence)
  np.testing.assert_allclose(
      terms.cross_entropy, expected_cross_entropy, rtol=1e-5
  )
  np.testing.assert_allclose(
      terms.total,
      0.3 * terms.divergence + 0.7 * terms.cross_entropy,
      rtol=1e-6,
  )


def test_distillation_loss_alpha_one_ignores_labels():
  s, t = _random_pair(44, SHAPE_2D)
  loss = losses.DistillationLoss(alpha=1.0, temperature=3.0)

  without_labels = loss(s, t)
  out_of_range_labels = loss(s, t, np.full(SHAPE_2D[:-1], 99))

  np.testing.assert_array_equal(without_labels.cross_entropy, 0.0)
  np.testing.assert_array_equal(
      without_labels.total, losses.forward_kl(s, t, 3.0)
  )
  chex.assert_trees_all_equal(out_of_range_labels, without_labels)


def test_distillation_loss_alpha_zero_is_cross_entropy():
  s, t = _random_pair(45, SHAPE_2D)
  labels = _random_labels(46, SHAPE_2D)

  terms = losses.DistillationLoss(alpha=0.0)(s, t, labels)

  np.testing.assert_array_equal(terms.total, terms.cross_entropy)


def test_distillation_loss_missing_labels_raises():
  s, t = _random_pair(47, SHAPE_2D)

  with pytest.raises(ValueError, match="labels are missing"):
    losses.DistillationLoss(alpha=0.5)(s, t)


def test_distillation_loss_masked_garbage_rows():
  s, t, mask = _garbage_batch(48)
  labels = np.array([0, -1, 2, 99, 5, 1, -7, 9])
  loss = losses.DistillationLoss("jsd", temperature=2.0, alpha=0.4, beta=0.7)

  terms = loss(s, t, labels, where=mask)
  grad = jax.jit(
      jax.grad(
          lambda x: losses.masked_mean(loss(x, t, labels, mask).total, mask)
      )
  )(s)

  chex.assert_tree_all_finite(terms)
  np.testing.assert_array_equal(terms.total[~mask], 0.0)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[~mask], 0.0)


def test_distillation_loss_under_jit():
  s, t = _random_pair(49, SHAPE_2D)
  labels = _random_labels(50, SHAPE_2D)
  loss = losses.DistillationLoss("reverse_kl", temperature=4.0, alpha=0.6)

  @functools.partial(jax.jit, static_argnums=0)
  def apply(loss_fn, student, teacher, targets):
    return loss_fn(student, teacher, targets)

  eager = loss(s, t, labels)

  assert hash(loss) == hash(dataclasses.replace(loss))
  chex.assert_trees_all_close(apply(loss, s, t, labels), eager, rtol=1e-6)
  chex.assert_trees_all_close(jax.jit(loss)(s, t, labels), eager, rtol=1e-6)


def test_distillation_loss_frozen():
  loss = losses.DistillationLoss()

  with pytest.raises(dataclasses.FrozenInstanceError):
    loss.alpha = 0.1  # pytype: disable=attribute-error


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "2"),
        ("alpha", -0.1),
        ("alpha", 1.5),
        ("beta", -0.5),
        ("beta", 2.0),
        ("divergence", "kl2"),
    ],
)
def test_distillation_loss_invalid_config(field, value):
  with pytest.raises(ConfigError) as raised:
    losses.DistillationLoss(**{field: value})

  message = str(raised.value)
  assert field in message
  assert repr(value) in message
  assert "\n" not in message
  assert isinstance(raised.value, ValueError)


def ref_skew_kl(s, t, alpha, temperature=1.0):
  p = np.exp(_ref_log_probs(t, temperature))
  q = np.exp(_ref_log_probs(s, temperature))
  m = alpha * p + (1.0 - alpha) * q
  return np.sum(special.rel_entr(p, m), -1) * temperature**2


@pytest.mark.parametrize("alpha", (0.1, 0.5, 0.9))
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_skew_kl_matches_reference(alpha, temperature):
  s, t = _random_pair(40, SHAPE_3D)
  np.testing.assert_allclose(losses.skew_kl(s, t, alpha, temperature),
                             ref_skew_kl(s, t, alpha, temperature), rtol=1e-5, atol=1e-6)


def test_skew_kl_endpoints():
  s, t = _random_pair(41, SHAPE_2D)
  np.testing.assert_array_equal(losses.skew_kl(s, t, 0.0), losses.forward_kl(s, t))
  np.testing.assert_array_equal(losses.skew_kl(s, t, 1.0), np.zeros(SHAPE_2D[0]))


def test_skew_kl_bounded_where_student_has_no_mass():
  s = np.array([[60.0, -60.0]], np.float32)
  t = np.array([[-60.0, 60.0]], np.float32)
  assert float(losses.skew_kl(s, t, 0.1)[0]) == pytest.approx(-math.log(0.1), rel=1e-4)


def test_skew_kl_rejects_alpha_outside_unit_interval():
  s, t = _random_pair(42, SHAPE_2D)
  with pytest.raises(ConfigError, match="alpha must be in"):
    losses.skew_kl(s, t, 1.5)
