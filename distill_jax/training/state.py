"""The student's train state and the optimizer built from config."""

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "sgd")


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes for the model being trained.

  Attributes:
    step: number of updates applied so far, int32 scalar.
    params: the trained model's `nnx.Param` state.
    opt_state: optimizer state over `params` only.
    nonfinite_step: the first step whose loss or gradient was NaN or Inf, or -1.
      Such a step applies no update, so `params` stay finite.
  """
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  nonfinite_step: jax.Array


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
  )


def apply_gradients(state: TrainState, grads: nnx.State, loss: jax.Array,
                    optimizer: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
  """Apply one optimizer update unless the loss or gradient is NaN or Inf.

  A non-finite step leaves parameters and optimizer state unchanged and
  records its number in `nonfinite_step` (the first such step only).

  Returns:
    The new state, with `step` advanced either way, and the gradient norm.
  """
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step,
                             state.nonfinite_step)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_new(new_params, state.params),
      opt_state=keep_new(new_opt_state, state.opt_state),
      nonfinite_step=nonfinite_step,
  )
  return new_state, grad_norm
