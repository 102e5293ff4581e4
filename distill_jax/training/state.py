"""The student's train state and the optimizer built from config."""

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "sgd")

# Bits of `TrainState.nonfinite_cause`.
CAUSE_LOSS = 1
CAUSE_GRADIENT = 2
CAUSE_PARAMS = 4
CAUSE_NAMES = {CAUSE_LOSS: "loss", CAUSE_GRADIENT: "gradient", CAUSE_PARAMS: "updated parameters"}


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes for the model being trained.

  Attributes:
    step: number of updates applied so far, int32 scalar.
    params: the trained model's `nnx.Param` state.
    opt_state: optimizer state over `params` only.
    nonfinite_step: the 0-based index of the first update whose loss,
      gradient or new parameters held NaN or Inf, or -1. Such an update is
      not applied, so `params` stay finite.
    nonfinite_cause: which values of that first update were not finite, a
      bit mask of `CAUSE_LOSS`, `CAUSE_GRADIENT` and `CAUSE_PARAMS`; 0 if none.
    skipped_steps: the number of updates not applied for that reason.
  """
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  nonfinite_step: jax.Array
  nonfinite_cause: jax.Array
  skipped_steps: jax.Array


def make_learning_rate_schedule(train_config: Mapping[str, Any]) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine decay to zero at `steps`."""
  steps = int(train_config["steps"])
  warmup_steps = min(int(train_config["warmup_steps"]), steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=float(train_config["learning_rate"]),
      warmup_steps=warmup_steps,
      decay_steps=max(steps, warmup_steps + 1),
  )


def make_optimizer(train_config: Mapping[str, Any]) -> optax.GradientTransformation:
  """Build the optimizer named by `train_config["optimizer"]`, with gradient clipping."""
  schedule = make_learning_rate_schedule(train_config)
  name = train_config["optimizer"]
  if name == "adamw":
    optimizer = optax.adamw(schedule, weight_decay=float(train_config["weight_decay"]))
  elif name == "sgd":
    optimizer = optax.chain(optax.add_decayed_weights(float(train_config["weight_decay"])),
                            optax.sgd(schedule, momentum=0.9, nesterov=True))
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")

  clip_norm = float(train_config["grad_clip_norm"])
  if clip_norm > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
  return optimizer


def create_train_state(params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
  """Create the state at step 0; jit it with `out_shardings` to create it sharded."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      nonfinite_step=jnp.full((), -1, jnp.int32),
      nonfinite_cause=jnp.zeros((), jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32),
  )


def apply_gradients(state: TrainState, grads: nnx.State, loss: jax.Array,
                    optimizer: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
  """Apply one optimizer update unless the loss, gradient or new parameters hold NaN or Inf.

  A non-finite step leaves parameters and optimizer state unchanged, counts
  itself in `skipped_steps` and records its index in `nonfinite_step` (the
  first such step only).

  Returns:
    The new state, with `step` advanced either way, and the gradient norm.
  """
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  # An update can overflow to Inf even when the gradient is finite, for
  # instance with a huge learning rate.
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                     for p in jax.tree.leaves(new_params)]))
  cause = (jnp.where(jnp.isfinite(loss), 0, CAUSE_LOSS)
           | jnp.where(jnp.isfinite(grad_norm), 0, CAUSE_GRADIENT)
           | jnp.where(params_finite, 0, CAUSE_PARAMS))
  finite = cause == 0
  keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  first = (state.nonfinite_step < 0) & ~finite
  new_state = state.replace(
      step=state.step + 1,
      params=keep_new(new_params, state.params),
      opt_state=keep_new(new_opt_state, state.opt_state),
      nonfinite_step=jnp.where(first, state.step, state.nonfinite_step),
      nonfinite_cause=jnp.where(first, cause, state.nonfinite_cause),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
  )
  return new_state, grad_norm
