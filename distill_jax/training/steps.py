"""Pure train and eval steps, bound to their config with `functools.partial`.

`train_step` serves all three stages: with `teacher_params=None` it trains on
hard labels (the teacher and the from-scratch baseline); with a teacher it
distills. The teacher is frozen three ways: gradients are taken with respect
to the student's parameters only, the teacher's logits pass through
`stop_gradient`, and the optimizer state covers the student only.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from distill_jax.evaluation import classification_sums
from distill_jax.losses import DistillationLoss
from distill_jax.training.metrics import DistillMetrics, SupervisedMetrics
from distill_jax.training.state import TrainState
from distill_jax.training.state import apply_gradients

Batch = dict[str, jax.Array]


def random_horizontal_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Flip each image `[batch, height, width, channels]` left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def apply_model(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
  """Run the model given by `graphdef` and `params` on images; returns logits."""
  return nnx.merge(graphdef, params)(images)


def train_step(
    state: TrainState,
    teacher_params: nnx.State | None,
    batch: Batch,
    rng: jax.Array,
    *,
    student_graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef | None,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    distillation_loss: DistillationLoss | None,
    augment: bool,
) -> tuple[TrainState, Any]:
  """Apply one update to the student and return the new state and its metrics.

  Args:
    state: the student's state; donated by the jitted caller.
    teacher_params: the frozen teacher's parameters, or None to train on labels.
    batch: `image` [batch, height, width, channels] float32 and `label` [batch] int32.
    rng: key for this step's augmentation; callers fold in the step number.
    student_graphdef: structure of the model being trained.
    teacher_graphdef: structure of the teacher, or None with `teacher_params=None`.
    optimizer: transformation whose state is `state.opt_state`.
    schedule: the learning-rate schedule inside `optimizer`, for logging.
    distillation_loss: loss mixing the teacher term and hard labels; unused
      without a teacher.
    augment: whether to flip images at random.

  Returns:
    The updated state and a `SupervisedMetrics` or `DistillMetrics` collection.
    A step whose loss or gradient norm is not finite leaves parameters and
    optimizer state unchanged and records its number in `nonfinite_step`.
  """
  images, labels = batch["image"], batch["label"]
  if augment:
    images = random_horizontal_flip(images, rng)

  teacher_logits = None
  if teacher_params is not None:
    teacher_logits = jax.lax.stop_gradient(apply_model(teacher_graphdef, teacher_params, images))

  def loss_fn(student_params):
    logits = apply_model(student_graphdef, student_params, images)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    if teacher_logits is None:
      return cross_entropy.mean(), (logits, cross_entropy, None)
    terms = distillation_loss(logits, teacher_logits, labels)
    return terms.total.mean(), (logits, cross_entropy, terms.divergence)

  (loss, (logits, cross_entropy, divergence)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state, grad_norm = apply_gradients(state, grads, loss, optimizer)

  outputs = dict(
      loss=loss,
      cross_entropy=cross_entropy,
      accuracy=(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
      grad_norm=grad_norm,
      learning_rate=schedule(state.step),
  )
  if teacher_logits is None:
    return new_state, SupervisedMetrics.single_from_model_output(**outputs)
  outputs["divergence"] = divergence
  outputs["teacher_agreement"] = (
      jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)).astype(jnp.float32)
  return new_state, DistillMetrics.single_from_model_output(**outputs)


def eval_step(
    student_params: nnx.State,
    teacher_params: nnx.State | None,
    batch: Batch,
    *,
    student_graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef | None,
) -> dict[str, jax.Array]:
  """Return metric sums over the real (unmasked) examples of one test batch."""
  student_logits = apply_model(student_graphdef, student_params, batch["image"])
  teacher_logits = None
  if teacher_params is not None:
    teacher_logits = apply_model(teacher_graphdef, teacher_params, batch["image"])
  return classification_sums(student_logits, teacher_logits, batch["label"], batch["mask"])
