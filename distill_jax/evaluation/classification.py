"""Classification metrics for a student and its teacher, as per-batch sums.

`classification_sums` is pure and jittable. It returns sums rather than means,
so an evaluation loop can add the sums of every batch (padded batches included,
through the mask) and call `finalize_sums` once at the end of the split:

  totals = None
  for batch in test_batches:
    sums = jitted_sums(student(batch), teacher(batch), batch["label"],
                       batch["mask"])
    totals = add_sums(totals, sums)
  metrics = finalize_sums(totals)

Counts are int32, so they stay exact, and the KL sum is float32.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def _check_shapes(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    labels: jax.Array,
    mask: jax.Array | None,
) -> None:
  """Raise ValueError unless the static shapes of the inputs agree."""
  if student_logits.ndim != 2:
    raise ValueError(
        "student_logits must have shape [batch, num_classes], got shape "
        f"{student_logits.shape}."
    )

  batch_size = student_logits.shape[0]
  if labels.shape != (batch_size,):
    raise ValueError(
        f"labels must have shape ({batch_size},) to match student_logits "
        f"{student_logits.shape}, got shape {labels.shape}."
    )
  if mask is not None and mask.shape != (batch_size,):
    raise ValueError(
        f"mask must have shape ({batch_size},) to match student_logits "
        f"{student_logits.shape}, got shape {mask.shape}."
    )
  if (
      teacher_logits is not None
      and teacher_logits.shape != student_logits.shape
  ):
    raise ValueError(
        f"teacher_logits shape {teacher_logits.shape} must equal "
        f"student_logits shape {student_logits.shape}."
    )


def _kl_per_example(
    teacher_logits: jax.Array, student_logits: jax.Array
) -> jax.Array:
  """Return KL(softmax(teacher) || softmax(student)) per row, in nats."""
  teacher_log_probs = jax.nn.log_softmax(teacher_logits, axis=-1)
  student_log_probs = jax.nn.log_softmax(student_logits, axis=-1)
  teacher_probs = jnp.exp(teacher_log_probs)

  # A class with teacher probability 0 contributes 0 (0 * log 0 = 0). Without
  # the `where`, a -inf teacher logit would give 0 * (-inf) = NaN.
  terms = jnp.where(
      teacher_probs > 0,
      teacher_probs * (teacher_log_probs - student_log_probs),
      0.0,
  )
  return jnp.sum(terms, axis=-1)


def classification_sums(
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    labels: jax.Array,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Compute the metric sums of one batch over its real (unmasked) examples.

  Args:
    student_logits: Student logits, shape [batch, num_classes].
    teacher_logits: Teacher logits with the same shape, or None to compute
      the student's sums only.
    labels: Integer class labels, shape [batch].
    mask: Boolean, shape [batch]. True marks a real example and False a
      padding row. Padding rows contribute exactly 0 to every sum, even when
      their logits are NaN or infinite. None means every row is real.

  Returns:
    Scalar sums: `count` (int32, real examples) and `student_correct` (int32).
    With teacher logits, also `teacher_correct` and `agreement` (int32, student
    argmax equals teacher argmax) and `kl_teacher_student` (float32, sum of
    KL(softmax(teacher) || softmax(student)) at temperature 1, in nats).

  Raises:
    ValueError: if the shapes of the inputs do not agree.
  """
  _check_shapes(student_logits, teacher_logits, labels, mask)

  if mask is None:
    mask = jnp.ones(labels.shape, dtype=jnp.bool_)
  mask = mask.astype(jnp.bool_)

  # Padding rows are replaced by zeros before any arithmetic, so garbage in
  # them can reach neither the argmax nor the KL sum.
  student_logits = jnp.where(
      mask[:, None], student_logits.astype(jnp.float32), 0.0
  )
  student_predictions = jnp.argmax(student_logits, axis=-1)
  sums = {
      "count": jnp.sum(mask, dtype=jnp.int32),
      "student_correct": jnp.sum(
          mask & (student_predictions == labels), dtype=jnp.int32
      ),
  }
  if teacher_logits is None:
    return sums

  teacher_logits = jnp.where(
      mask[:, None], teacher_logits.astype(jnp.float32), 0.0
  )
  teacher_predictions = jnp.argmax(teacher_logits, axis=-1)
  sums["teacher_correct"] = jnp.sum(
      mask & (teacher_predictions == labels), dtype=jnp.int32
  )
  sums["agreement"] = jnp.sum(
      mask & (student_predictions == teacher_predictions), dtype=jnp.int32
  )

  kl = _kl_per_example(teacher_logits, student_logits)
  sums["kl_teacher_student"] = jnp.sum(jnp.where(mask, kl, 0.0))
  return sums


def add_sums(
    totals: Mapping[str, jax.Array] | None, sums: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Add one batch's sums to the running totals, or start them from None.

  Raises:
    ValueError: if `totals` and `sums` have different keys.
  """
  if totals is None:
    return dict(sums)
  if set(totals) != set(sums):
    raise ValueError(
        f"Cannot add sums with keys {sorted(sums)} to totals with keys "
        f"{sorted(totals)}; compute every batch with the same teacher setting."
    )
  return {key: totals[key] + sums[key] for key in totals}


def finalize_sums(sums: Mapping[str, jax.Array]) -> dict[str, float | int]:
  """Convert accumulated sums into means over the real examples.

  Args:
    sums: Totals from `classification_sums`, added over batches.

  Returns:
    `num_examples` (int) and, for each sum present, a Python float:
    `student_accuracy`, `teacher_accuracy`, `top1_agreement` and
    `kl_teacher_student` (mean KL per example, in nats).

  Raises:
    ValueError: if `count` is missing or zero, because means over no examples
      are undefined.
  """
  if "count" not in sums:
    raise ValueError(
        f"sums is missing 'count' (keys: {sorted(sums)}). Pass the output of "
        "classification_sums."
    )
  count = int(sums["count"])
  if count <= 0:
    raise ValueError(
        f"sums['count'] is {count}, so there are no examples to average. "
        "Check that the evaluation split is not empty and the mask is not all "
        "False."
    )

  output_names = {
      "student_correct": "student_accuracy",
      "teacher_correct": "teacher_accuracy",
      "agreement": "top1_agreement",
      "kl_teacher_student": "kl_teacher_student",
  }
  metrics: dict[str, float | int] = {"num_examples": count}
  for sum_name, metric_name in output_names.items():
    if sum_name in sums:
      metrics[metric_name] = float(sums[sum_name]) / count
  return metrics
