"""Per-example distillation losses between student and teacher logits.

Every function takes logits whose last axis is the class (or vocabulary) axis
and returns one value per example, with shape `logits.shape[:-1]`. Inputs are
upcast to at least float32 before any computation, so bfloat16 logits are
reduced in float32 and float64 logits stay float64.

In the formulas, `p` is the teacher distribution and `q` the student
distribution, both taken as a softmax over the last axis. With a temperature
`T`, `p_T = softmax(teacher_logits / T)` and `q_T = softmax(student_logits / T)`.

Each function accepts an optional boolean `where` mask of shape
`logits.shape[:-1]`, or one that broadcasts to it. Masked-out examples return
exactly 0, with zero gradient, even when their logits are NaN or infinite,
because their logits are replaced by zeros before the computation and their
results by zeros after it. Reduce the per-example values with `masked_mean`
to average over the kept examples only.
"""

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distill_jax.errors import ConfigError

# Valid values of `DistillationLoss.divergence`, in the order of the
# functions below: forward KL, reverse KL, generalized Jensen-Shannon,
# total variation distance, skew KL and mean squared error of the raw logits.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "logit_mse")


def _check_temperature(temperature) -> None:
  """Raise `ConfigError` unless a Python or NumPy scalar temperature is valid.

  JAX arrays are not checked, because a traced value has no concrete value to
  compare.
  """
  if isinstance(temperature, jax.Array):
    return

  if isinstance(temperature, bool) or not isinstance(
      temperature, numbers.Real
  ):
    raise ConfigError(
        f"temperature must be a finite number > 0, got {temperature!r}"
    )

  if not math.isfinite(temperature) or temperature <= 0:
    raise ConfigError(
        f"temperature must be a finite number > 0, got {temperature!r}"
    )


def _check_unit_interval(name: str, value) -> None:
  """Raise `ConfigError` unless `value` is a real number in [0, 1]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")

  if not 0.0 <= value <= 1.0:
    raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """Return the result type of `arrays`, promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _prepare_mask(where, batch_shape: tuple[int, ...]) -> jax.Array | None:
  """Broadcast `where` to `batch_shape` as a boolean array, or return None."""
  if where is None:
    return None

  return jnp.broadcast_to(jnp.asarray(where, dtype=bool), batch_shape)


def _mask_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Replace the logits of masked-out examples by zeros."""
  if mask is None:
    return logits

  return jnp.where(mask[..., None], logits, jnp.zeros_like(logits))


def _mask_values(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Replace the values of masked-out examples by zeros."""
  if mask is None:
    return values

  return jnp.where(mask, values, jnp.zeros_like(values))


def _prepare_pair(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    where,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Upcast both logits, check their shapes and mask out excluded examples."""
  student_logits = jnp.asarray(student_logits)
  teacher_logits = jnp.asarray(teacher_logits)

  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        "student_logits and teacher_logits must have the same shape, got "
        f"{student_logits.shape} and {teacher_logits.shape}"
    )

  if student_logits.ndim < 1:
    raise ValueError(
        "logits must have a class axis as their last axis, got a scalar"
    )

  dtype = _compute_dtype(student_logits, teacher_logits)
  student_logits = student_logits.astype(dtype)
  teacher_logits = teacher_logits.astype(dtype)

  mask = _prepare_mask(where, student_logits.shape[:-1])
  student_logits = _mask_logits(student_logits, mask)
  teacher_logits = _mask_logits(teacher_logits, mask)
  return student_logits, teacher_logits, mask


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Compute KL(p || q) = sum_i p_i (log p_i - log q_i) over the last axis.

  Classes with p_i == 0 contribute exactly 0, following the convention
  0 * log 0 = 0. A probability that underflows to 0, or a log-probability of
  -inf from a -inf logit, would otherwise give 0 * inf = NaN. Both
  log-probabilities are set to 0 at those classes, which makes the term
  exp(0) * (0 - 0) = 0 and stops the gradient from flowing into them.
  """
  support = jnp.exp(log_p) > 0
  safe_log_p = jnp.where(support, log_p, 0.0)
  safe_log_q = jnp.where(support, log_q, 0.0)

  terms = jnp.exp(safe_log_p) * (safe_log_p - safe_log_q)
  return jnp.sum(terms, axis=-1)


def _tempered_log_probs(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature,
) -> tuple[jax.Array, jax.Array]:
  """Return log q_T and log p_T, the log-softmax of the logits over T."""
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  return log_q, log_p


def forward_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the forward KL divergence KL(teacher || student) per example.

  This is the soft-target loss of Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network":

  .. math::
    T^2 \cdot \mathrm{KL}(p_T \| q_T)
      = T^2 \sum_i p_{T,i} (\log p_{T,i} - \log q_{T,i}),

  where :math:`p_T = \mathrm{softmax}(\text{teacher\_logits} / T)` and
  :math:`q_T = \mathrm{softmax}(\text{student\_logits} / T)`. The gradient
  of the soft-target term scales as :math:`1 / T^2`, so Hinton et al. multiply
  it by :math:`T^2` to keep its weight against the hard-label term when `T`
  changes. Forward KL is mean-seeking: the student is
  penalised wherever the teacher has mass and the student has none. Classes
  where the teacher probability is 0 (or underflows to 0) contribute 0.

  Args:
    student_logits: Unnormalized student log-probabilities, with shape
      `[batch, num_classes]` or `[batch, length, vocab]`, or any shape whose
      last axis is the class axis.
    teacher_logits: Unnormalized teacher log-probabilities, with the same
      shape as `student_logits`.
    temperature: Softmax temperature `T > 0`. Larger values soften both
      distributions.
    where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The divergence per example, with shape `student_logits.shape[:-1]`, for
    example `[batch]` or `[batch, length]`.

  Raises:
    ConfigError: If `temperature` is a Python number that is not finite and
      > 0.
    ValueError: If the two logits arrays differ in shape.
  """
  _check_temperature(temperature)
  student_logits, teacher_logits, mask = _prepare_pair(
      student_logits, teacher_logits, where
  )

  log_q, log_p = _tempered_log_probs(
      student_logits, teacher_logits, temperature
  )
  values = _kl_from_log_probs(log_p, log_q) * temperature**2
  return _mask_values(values, mask)


def reverse_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the reverse KL divergence KL(student || teacher) per example.

  .. math::
    T^2 \cdot \mathrm{KL}(q_T \| p_T)
      = T^2 \sum_i q_{T,i} (\log q_{T,i} - \log p_{T,i}),

  with :math:`p_T` and :math:`q_T` the tempered teacher and student softmax
  distributions, as in `forward_kl`. Reverse KL is mode-seeking: the student
  is penalised for putting mass where the teacher has little, so it tends to
  concentrate on the teacher's main modes. Agarwal et al. 2024, "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes",
  use it as the `beta = 1` end of the generalized JSD (see
  `generalized_jsd`). Classes where the student probability is 0 contribute
  0.

  Args:
    student_logits: Unnormalized student log-probabilities, with shape
      `[batch, num_classes]` or `[batch, length, vocab]`.
    teacher_logits: Unnormalized teacher log-probabilities, with the same
      shape as `student_logits`.
    temperature: Softmax temperature `T > 0`.
    where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The divergence per example, with shape `student_logits.shape[:-1]`.

  Raises:
    ConfigError: If `temperature` is a Python number that is not finite and
      > 0.
    ValueError: If the two logits arrays differ in shape.
  """
  _check_temperature(temperature)
  student_logits, teacher_logits, mask = _prepare_pair(
      student_logits, teacher_logits, where
  )

  log_q, log_p = _tempered_log_probs(
      student_logits, teacher_logits, temperature
  )
  values = _kl_from_log_probs(log_q, log_p) * temperature**2
  return _mask_values(values, mask)


def generalized_jsd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    beta: float = 0.5,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the generalized Jensen-Shannon divergence JSD(beta) per example.

  From Agarwal et al. 2024, "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes" (GKD). With the mixture
  :math:`m = \beta p_T + (1 - \beta) q_T`,

  .. math::
    T^2 \cdot \mathrm{JSD}(\beta)
      = T^2 \left[\beta\, \mathrm{KL}(p_T \| m)
        + (1 - \beta)\, \mathrm{KL}(q_T \| m)\right],

  for :math:`0 < \beta < 1`. The endpoints follow the GKD paper and
  Hugging Face TRL's `GKDTrainer`: beta = 0 is forward KL(teacher || student)
  and beta = 1 is reverse KL(student || teacher). This function returns
  exactly `forward_kl` at beta == 0 and exactly `reverse_kl` at beta == 1.
  The formula above tends to 0 at both ends, but
  :math:`\mathrm{JSD}(\beta) / \beta \to \mathrm{KL}(p \| q)` as
  :math:`\beta \to 0` and
  :math:`\mathrm{JSD}(\beta) / (1 - \beta) \to \mathrm{KL}(q \| p)` as
  :math:`\beta \to 1`, so the endpoint values are the limits of the
  normalised divergence. Near the endpoints the returned value is therefore
  much smaller than at them. At beta = 0.5 and T = 1 the divergence is the
  symmetric Jensen-Shannon divergence, bounded by log 2.

  The mixture is computed in log space,
  :math:`\log m = \mathrm{logsumexp}(\log p + \log\beta,\ \log q + \log(1-\beta))`,
  so it never underflows where either distribution has mass.

  Args:
    student_logits: Unnormalized student log-probabilities, with shape
      `[batch, num_classes]` or `[batch, length, vocab]`.
    teacher_logits: Unnormalized teacher log-probabilities, with the same
      shape as `student_logits`.
    beta: Weight of the teacher in the mixture, a Python float in [0, 1].
    temperature: Softmax temperature `T > 0`.
    where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The divergence per example, with shape `student_logits.shape[:-1]`.

  Raises:
    ConfigError: If `beta` is not in [0, 1], or `temperature` is a Python
      number that is not finite and > 0.
    ValueError: If the two logits arrays differ in shape.
  """
  _check_unit_interval("beta", beta)
  beta = float(beta)

  if beta == 0.0:
    return forward_kl(student_logits, teacher_logits, temperature, where)
  if beta == 1.0:
    return reverse_kl(student_logits, teacher_logits, temperature, where)

  _check_temperature(temperature)
  student_logits, teacher_logits, mask = _prepare_pair(
      student_logits, teacher_logits, where
  )

  log_q, log_p = _tempered_log_probs(
      student_logits, teacher_logits, temperature
  )
  log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))

  values = beta * _kl_from_log_probs(log_p, log_m)
  values += (1.0 - beta) * _kl_from_log_probs(log_q, log_m)
  values *= temperature**2
  return _mask_values(values, mask)


def total_variation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the total variation distance between teacher and student.

  .. math::
    \mathrm{TVD}(p_T, q_T) = \frac{1}{2} \sum_i |p_{T,i} - q_{T,i}|,

  with :math:`p_T` and :math:`q_T` the tempered teacher and student softmax
  distributions, as in `forward_kl`. Unlike the KL-based losses, the result
  is not multiplied by :math:`T^2`, because the distance is bounded in [0, 1]
  at every temperature and keeping that bound makes values comparable across
  temperatures. Float32 rounding can exceed the bound by about 1e-7.
  Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge
  Distillation", use it as a distillation loss.

  Args:
    student_logits: Unnormalized student log-probabilities, with shape
      `[batch, num_classes]` or `[batch, length, vocab]`.
    teacher_logits: Unnormalized teacher log-probabilities, with the same
      shape as `student_logits`.
    temperature: Softmax temperature `T > 0`.
    where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The distance per example, in [0, 1] up to rounding, with shape
    `student_logits.shape[:-1]`.

  Raises:
    ConfigError: If `temperature` is a Python number that is not finite and
      > 0.
    ValueError: If the two logits arrays differ in shape.
  """
  _check_temperature(temperature)
  student_logits, teacher_logits, mask = _prepare_pair(
      student_logits, teacher_logits, where
  )

  log_q, log_p = _tempered_log_probs(
      student_logits, teacher_logits, temperature
  )
  values = 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)
  return _mask_values(values, mask)


def skew_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    alpha: float = 0.1,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the skew KL divergence KL(teacher || mixture) per example.

  From Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
  Language Models". With the mixture
  :math:`m = \alpha p_T + (1 - \alpha) q_T`,

  .. math::
    T^2 \cdot \mathrm{SKL}(\alpha) = T^2\, \mathrm{KL}(p_T \| m).

  Mixing some of the teacher into the student distribution keeps the
  divergence finite, with bounded gradients, where the student puts almost
  no mass. At alpha == 0 it is `forward_kl`, and at alpha == 1 it is 0.

  Args:
    student_logits: Unnormalized student log-probabilities, with shape
      `[batch, num_classes]` or `[batch, length, vocab]`.
    teacher_logits: Unnormalized teacher log-probabilities, with the same
      shape as `student_logits`.
    alpha: Weight of the teacher in the mixture, a Python float in [0, 1].
    temperature: Softmax temperature `T > 0`.
    where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The divergence per example, with shape `student_logits.shape[:-1]`.

  Raises:
    ConfigError: If `alpha` is not in [0, 1], or `temperature` is a Python
      number that is not finite and > 0.
    ValueError: If the two logits arrays differ in shape.
  """
  _check_unit_interval("alpha", alpha)
  alpha = float(alpha)
  if alpha == 0.0:
    return forward_kl(student_logits, teacher_logits, temperature, where)

  _check_temperature(temperature)
  student_logits, teacher_logits, mask = _prepare_pair(
      student_logits, teacher_logits, where
  )

  log_q, log_p = _tempered_log_probs(
      student_logits, teacher_logits, temperature
  )
  if alpha == 1.0:
    log_m = log_p
  else:
    log_m = jnp.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
  values = _kl_from_log_probs(log_p, log_m) * temperature**2
  return _mask_values(values, mask)


def logit_mse(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the mean squared error between raw student and teacher logits.

  From Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?", which
  trains the student to regress the teacher's logits:

  .. math::
    \frac{1}{C} \sum_{i=1}^{C} (s_i - t_i)^2,

  where :math:`s` and :math:`t` are the student and teacher logits and
  :math:`C` is the number of classes. No softmax and no temperature is
  applied, so the loss depends on the logits' offset as well as their
  differences.

  Args:
    student_logits: Student logits, with shape `[batch, num_classes]` or
      `[batch, length, vocab]`.
    teacher_logits: Teacher logits, with the same shape as `student_logits`.
    where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The mean squared error per example, with shape
    `student_logits.shape[:-1]`.

  Raises:
    ValueError: If the two logits arrays differ in shape.
  """
  student_logits, teacher_logits, mask = _prepare_pair(
      student_logits, teacher_logits, where
  )

  values = jnp.mean(jnp.square(student_logits - teacher_logits), axis=-1)
  return _mask_values(values, mask)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array | None = None,
) -> jax.Array:
  r"""Compute the cross-entropy between logits and hard integer labels.

  .. math::
    -\log q_y = -\log \mathrm{softmax}(\text{logits})_y,

  where :math:`y` is the label of the example. This is the hard-label term
  of the distillation loss of Hinton et al. 2015, "Distilling the Knowledge
  in a Neural Network", computed without temperature.

  Args:
    logits: Unnormalized log-probabilities, with shape `[batch, num_classes]`
      or `[batch, length, vocab]`.
    labels: Integer class indices in `[0, num_classes)`, with shape
      `logits.shape[:-1]`. Labels of masked-out examples are ignored, so
      padding may use any value such as -1. An out-of-range label of a kept
      example gives NaN, and a negative one counts from the end of the class
      axis, following `jnp.take_along_axis`.
    where: Optional boolean mask of shape `logits.shape[:-1]` (or
      broadcastable to it). Masked-out examples return 0.

  Returns:
    The cross-entropy per example, with shape `logits.shape[:-1]`.

  Raises:
    ValueError: If `labels` does not have shape `logits.shape[:-1]`.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)

  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]}, "
        f"got {labels.shape}"
    )

  logits = logits.astype(_compute_dtype(logits))
  mask = _prepare_mask(where, logits.shape[:-1])
  logits = _mask_logits(logits, mask)
  if mask is not None:
    labels = jnp.where(mask, labels, jnp.zeros_like(labels))

  log_probs = jax.nn.log_softmax(logits, axis=-1)
  label_log_probs = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)
  values = -label_log_probs[..., 0]
  return _mask_values(values, mask)


def masked_mean(
    values: jax.Array,
    where: jax.Array | None = None,
) -> jax.Array:
  """Average `values` over the entries where `where` is True.

  Computes `sum(values[where]) / max(count(where), 1)`, so an all-False mask
  gives 0 instead of NaN. Masked-out entries are replaced by zeros before the
  sum, so NaN or inf in them does not reach the result. With a mask, the
  result equals the plain mean over the kept entries alone.

  Args:
    values: Values of any shape, for example per-example losses of shape
      `[batch]` or `[batch, length]`.
    where: Optional boolean mask of the shape of `values` (or broadcastable
      to it). None averages over all entries.

  Returns:
    A scalar of the dtype of `values`, promoted to at least float32.
  """
  values = jnp.asarray(values)
  values = values.astype(_compute_dtype(values))

  if where is None:
    return jnp.mean(values)

  mask = jnp.broadcast_to(jnp.asarray(where, dtype=bool), values.shape)
  total = jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)))
  count = jnp.sum(mask, dtype=values.dtype)
  return total / jnp.maximum(count, 1.0)


class LossTerms(NamedTuple):
  """Per-example distillation loss and the two terms it combines.

  Attributes:
    total: `alpha * divergence + (1 - alpha) * cross_entropy`.
    divergence: The unweighted divergence between teacher and student.
    cross_entropy: The unweighted hard-label cross-entropy of the student, or
      zeros when `alpha == 1`.
  """

  total: jax.Array
  divergence: jax.Array
  cross_entropy: jax.Array


@dataclasses.dataclass(frozen=True)
class DistillationLoss:
  """Distillation loss: a weighted sum of a divergence and a hard-label loss.

  Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", combine
  a soft-target term computed against the teacher with the ordinary
  cross-entropy against the true labels:

    total = alpha * divergence + (1 - alpha) * cross_entropy

  The fields are checked once, when the object is created. The object is
  frozen and hashable, so it can be closed over by, or passed as a static
  argument to, a `jax.jit`-compiled function.

  Attributes:
    divergence: Name of the teacher-student divergence, one of
      `DIVERGENCES`: "forward_kl" (`forward_kl`), "reverse_kl"
      (`reverse_kl`), "jsd" (`generalized_jsd`), "tvd" (`total_variation`),
      "skew_kl" (`skew_kl`) or "logit_mse" (`logit_mse`).
    temperature: Softmax temperature `T > 0` of the divergence. "logit_mse"
      ignores it.
    alpha: Weight of the divergence term in [0, 1]. The cross-entropy term
      gets `1 - alpha`, and `alpha == 1` needs no labels.
    beta: Teacher weight of the "jsd" and "skew_kl" mixtures in [0, 1]. For
      "jsd", 0 is forward KL(teacher || student) and 1 is reverse
      KL(student || teacher); for "skew_kl", 0 is forward KL. The other
      divergences ignore it.
  """

  divergence: str = "forward_kl"
  temperature: float = 1.0
  alpha: float = 0.5
  beta: float = 0.5

  def __post_init__(self):
    if self.divergence not in DIVERGENCES:
      raise ConfigError(
          f"divergence must be one of {', '.join(DIVERGENCES)}, "
          f"got {self.divergence!r}"
      )

    _check_temperature(self.temperature)
    if isinstance(self.temperature, jax.Array):
      raise ConfigError(
          "temperature must be a Python number > 0, got a JAX array "
          f"{self.temperature!r}"
      )

    _check_unit_interval("alpha", self.alpha)
    _check_unit_interval("beta", self.beta)

  def compute_divergence(
      self,
      student_logits: jax.Array,
      teacher_logits: jax.Array,
      where: jax.Array | None = None,
  ) -> jax.Array:
    """Compute the configured divergence per example, without weighting."""
    if self.divergence == "forward_kl":
      return forward_kl(
          student_logits, teacher_logits, self.temperature, where
      )
    if self.divergence == "reverse_kl":
      return reverse_kl(
          student_logits, teacher_logits, self.temperature, where
      )
    if self.divergence == "jsd":
      return generalized_jsd(
          student_logits, teacher_logits, self.beta, self.temperature, where
      )
    if self.divergence == "tvd":
      return total_variation(
          student_logits, teacher_logits, self.temperature, where
      )
    if self.divergence == "skew_kl":
      return skew_kl(
          student_logits, teacher_logits, self.beta, self.temperature, where
      )
    return logit_mse(student_logits, teacher_logits, where)

  def __call__(
      self,
      student_logits: jax.Array,
      teacher_logits: jax.Array,
      labels: jax.Array | None = None,
      where: jax.Array | None = None,
  ) -> LossTerms:
    """Compute the distillation loss per example.

    Args:
      student_logits: Unnormalized student log-probabilities, with shape
        `[batch, num_classes]` or `[batch, length, vocab]`.
      teacher_logits: Unnormalized teacher log-probabilities, with the same
        shape as `student_logits`.
      labels: Integer class indices of shape `student_logits.shape[:-1]`.
        Required when `alpha < 1`. Ignored when `alpha == 1`.
      where: Optional boolean mask of shape `student_logits.shape[:-1]` (or
        broadcastable to it). Masked-out examples get 0 in every term.

    Returns:
      `LossTerms` whose three fields have shape `student_logits.shape[:-1]`.

    Raises:
      ValueError: If `labels` is None while `alpha < 1`, or if a shape is
        invalid.
    """
    divergence = self.compute_divergence(
        student_logits, teacher_logits, where
    )

    if self.alpha == 1.0:
      cross_entropy = jnp.zeros_like(divergence)
    elif labels is None:
      raise ValueError(
          f"labels are missing, but alpha={self.alpha} is < 1 so the "
          "cross-entropy term needs them. Pass labels, or set alpha=1.0 to "
          "train on the teacher alone."
      )
    else:
      cross_entropy = softmax_cross_entropy_with_integer_labels(
          student_logits, labels, where
      )

    # The endpoints skip the zero-weighted term, so a NaN or inf in it does
    # not turn the total into NaN through 0 * inf.
    if self.alpha == 1.0:
      total = divergence
    elif self.alpha == 0.0:
      total = cross_entropy
    else:
      total = self.alpha * divergence + (1.0 - self.alpha) * cross_entropy

    return LossTerms(
        total=total, divergence=divergence, cross_entropy=cross_entropy
    )
