"""Pure train and eval steps of token-level language-model distillation.

One `lm_train_step` serves three modes, chosen by `LMStepConfig.mode`:

- "online": the frozen teacher runs on the batch inside the step, and the
  loss compares full vocabularies chunk by chunk, or the teacher's top-k
  when `loss.top_k > 0`;
- "cached": the teacher's top-k ids and log-probabilities come with the
  batch, read from the offline cache;
- "cross_entropy": no teacher, next-token cross-entropy only (the baseline).

Losses average over target tokens (`loss_mask`), so prompt and padding
positions never contribute. The teacher is frozen as in the classification
step: gradients are taken for the student's parameters only, teacher outputs
pass through `stop_gradient`, and the optimizer covers the student only.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics
from flax import nnx

from distill_jax.losses import masked_mean
from distill_jax.losses import token_level
from distill_jax.training.state import TrainState
from distill_jax.training.state import apply_gradients

LM_MODES = ("online", "cached", "cross_entropy")
# Confidence bins of the expected calibration error.
CALIBRATION_BINS = 10


@dataclasses.dataclass(frozen=True)
class LMStepConfig:
  """Static settings of the language-model train step.

  Attributes:
    mode: one of `LM_MODES`.
    loss: the token divergence; unused in "cross_entropy" mode.
    alpha: weight of the divergence; `1 - alpha` weighs the cross-entropy
      on the data's next tokens.
    vocab_size: vocabulary rows the teacher and student share; logits past it
      are padding rows and are left out.
    token_chunk_size: positions per chunk of full-vocabulary logits for
      `token_level.fused_token_loss`, or 0 for the vocabulary-chunked losses.
  """

  mode: str
  loss: token_level.TokenDistillationLoss
  alpha: float
  vocab_size: int
  token_chunk_size: int = 0


@flax.struct.dataclass
class LMMetrics(metrics.Collection):
  """Metrics of one language-model train step."""
  loss: metrics.Average.from_output("loss")
  cross_entropy: metrics.Average.from_output("cross_entropy")
  divergence: metrics.Average.from_output("divergence")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  target_tokens: metrics.Average.from_output("target_tokens")


def _flat(array: jax.Array) -> jax.Array:
  """Merge the batch and length axes: `[batch, length, ...]` to `[batch * length, ...]`."""
  return array.reshape((-1,) + array.shape[2:])


def final_hidden(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, Any]:
  """Run a decoder on a packed batch; return `[tokens, d_model]` hidden states, embedding, config."""
  model = nnx.merge(graphdef, params)
  output = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_logits=False)
  return _flat(output.hidden), model.embedding[...], model.config


def lm_train_step(state: TrainState, teacher_params: nnx.State | None,
                  batch: dict[str, jax.Array], rng: jax.Array, *,
                  student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None,
                  optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  step_config: LMStepConfig) -> tuple[TrainState, LMMetrics]:
  """Apply one update to the student; return the new state and its metrics.

  Args:
    state: the student's state; donated by the jitted caller.
    teacher_params: the frozen teacher's parameters in "online" mode, else None.
    batch: `tokens`, `targets`, `segment_ids`, `positions` (int32 `[batch,
      length]`) and `loss_mask` (bool), plus `teacher_top_ids` and
      `teacher_top_log_probs` (`[batch, length, k]`) in "cached" mode.
    rng: unused; kept so every stage's step has one signature.
    student_graphdef: structure of the student.
    teacher_graphdef: structure of the teacher in "online" mode.
    optimizer: transformation whose state is `state.opt_state`.
    schedule: the learning-rate schedule inside `optimizer`, for logging.
    step_config: mode, loss and shared vocabulary size.
  """
  del rng
  loss_config, vocab = step_config.loss, step_config.vocab_size
  where = _flat(batch["loss_mask"])
  targets = _flat(batch["targets"])

  teacher_hidden = teacher_embedding = teacher_softcap = None
  top_ids = top_log_probs = None
  if step_config.mode == "online":
    teacher_hidden, teacher_embedding, teacher_model_config = final_hidden(
        teacher_graphdef, teacher_params, batch)
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_embedding = jax.lax.stop_gradient(teacher_embedding[:vocab])
    teacher_softcap = teacher_model_config.final_logit_softcap
    if loss_config.top_k and not step_config.token_chunk_size:
      top_ids, top_log_probs = token_level.chunked_top_k(
          teacher_hidden, teacher_embedding, loss_config.top_k,
          temperature=loss_config.temperature, chunk_size=loss_config.vocab_chunk_size,
          softcap=teacher_softcap)
  elif step_config.mode == "cached":
    top_ids = _flat(batch["teacher_top_ids"])
    top_log_probs = _flat(batch["teacher_top_log_probs"])

  def loss_fn(student_params):
    hidden, embedding, model_config = final_hidden(student_graphdef, student_params, batch)
    embedding = embedding[:vocab]
    softcap = model_config.final_logit_softcap
    if step_config.token_chunk_size:
      return _fused_loss(hidden, embedding, softcap)
    if top_ids is not None and loss_config.temperature == 1.0:
      # One chunked pass gives the student's log-probabilities at the
      # teacher's top-k and at the target token, whose negative is the
      # cross-entropy.
      picked = token_level.student_log_probs_at(
          hidden, embedding, jnp.concatenate([top_ids, targets[:, None]], axis=-1),
          temperature=1.0, chunk_size=loss_config.vocab_chunk_size, softcap=softcap)
      cross_entropy = jnp.where(where, -picked[:, -1], 0.0)
      divergence = token_level.bucket_divergence(picked[:, :-1], top_log_probs, loss_config,
                                                 where=where)
      total = step_config.alpha * divergence + (1.0 - step_config.alpha) * cross_entropy
      return masked_mean(total, where), (cross_entropy, divergence)

    cross_entropy = token_level.chunked_cross_entropy(
        hidden, embedding, targets, where=where, chunk_size=loss_config.vocab_chunk_size,
        softcap=softcap)
    if step_config.mode == "cross_entropy":
      return masked_mean(cross_entropy, where), (cross_entropy, jnp.zeros_like(cross_entropy))

    if top_ids is not None:
      divergence = token_level.top_k_divergence(hidden, embedding, top_ids, top_log_probs,
                                                loss_config, where=where,
                                                student_softcap=softcap)
    else:
      divergence = token_level.chunked_divergence(
          hidden, embedding, teacher_hidden, teacher_embedding, loss_config, where=where,
          student_softcap=softcap, teacher_softcap=teacher_softcap)
    total = step_config.alpha * divergence + (1.0 - step_config.alpha) * cross_entropy
    return masked_mean(total, where), (cross_entropy, divergence)

  def _fused_loss(hidden, embedding, softcap):
    teacher_kind = {"online": "full", "cached": "top_k", "cross_entropy": "none"}[
        step_config.mode]
    spec = token_level.FusedLossSpec(
        loss=loss_config, alpha=step_config.alpha if teacher_kind != "none" else 0.0,
        teacher=teacher_kind, token_chunk_size=step_config.token_chunk_size,
        student_softcap=softcap, teacher_softcap=teacher_softcap)
    weights = where.astype(jnp.float32) / jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)
    cached = step_config.mode == "cached"
    objective, divergence, cross_entropy = token_level.fused_token_loss(
        hidden, embedding, targets, weights, spec,
        teacher_hidden=teacher_hidden if teacher_kind == "full" else None,
        teacher_embedding=teacher_embedding if teacher_kind == "full" else None,
        teacher_top_ids=top_ids if cached else None,
        teacher_top_log_probs=top_log_probs if cached else None)
    return objective, (cross_entropy, divergence)

  (loss, (cross_entropy, divergence)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state, grad_norm = apply_gradients(state, grads, loss, optimizer)

  return new_state, LMMetrics.single_from_model_output(
      loss=loss,
      cross_entropy=masked_mean(cross_entropy, where),
      divergence=masked_mean(divergence, where),
      grad_norm=grad_norm,
      learning_rate=schedule(state.step),
      target_tokens=jnp.sum(where).astype(jnp.float32),
  )


def _calibration_sums(confidence: jax.Array, correct: jax.Array, where: jax.Array
                      ) -> dict[str, jax.Array]:
  """Sum count, confidence and accuracy of the kept tokens per confidence bin."""
  bins = jnp.clip((confidence * CALIBRATION_BINS).astype(jnp.int32), 0, CALIBRATION_BINS - 1)
  one_hot = jax.nn.one_hot(bins, CALIBRATION_BINS) * where[:, None]
  return {
      "bin_count": one_hot.sum(0),
      "bin_confidence": (one_hot * confidence[:, None]).sum(0),
      "bin_correct": (one_hot * correct[:, None]).sum(0),
  }


def model_eval_sums(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                    where: jax.Array, *, chunk_size: int, softcap: float | None
                    ) -> tuple[dict[str, jax.Array], jax.Array]:
  """Return one model's sums over kept tokens and its greedy predictions `[tokens]`."""
  summary = token_level.vocab_summary(hidden, embedding, chunk_size=chunk_size, softcap=softcap)
  target_logits = token_level.soft_cap(
      jnp.einsum("nd,nd->n", hidden, jnp.take(embedding, targets, axis=0),
                 preferred_element_type=jnp.float32), softcap)
  nll = summary.log_partition - target_logits
  correct = (summary.argmax == targets).astype(jnp.float32)
  confidence = jnp.exp(summary.max_logit - summary.log_partition)
  sums = {
      "nll": jnp.sum(jnp.where(where, nll, 0.0)),
      "correct": jnp.sum(jnp.where(where, correct, 0.0)),
      **_calibration_sums(confidence, correct, where),
  }
  return sums, summary.argmax


def lm_eval_sums(student_params: nnx.State, teacher_hidden: jax.Array | None,
                 teacher_params: nnx.State | None, batch: dict[str, jax.Array], *,
                 student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None,
                 vocab_size: int, chunk_size: int) -> dict[str, Any]:
  """Return sums over the target tokens of one batch for the student and the teacher.

  `teacher_hidden` (`[tokens, d_teacher]`, computed once per validation
  batch and reused) and `teacher_params` (for the embedding) give the
  teacher's side; with `teacher_graphdef=None` only the student is measured.
  The keys are those `finalize_lm_sums` reads.
  """
  where = _flat(batch["loss_mask"])
  targets = _flat(batch["targets"])
  hidden, embedding, model_config = final_hidden(student_graphdef, student_params, batch)
  embedding = embedding[:vocab_size]
  student_sums, student_argmax = model_eval_sums(
      hidden, embedding, targets, where, chunk_size=chunk_size,
      softcap=model_config.final_logit_softcap)
  sums = {"tokens": jnp.sum(where).astype(jnp.float32),
          "student": student_sums}
  if teacher_graphdef is None:
    return sums

  teacher = nnx.merge(teacher_graphdef, teacher_params)
  teacher_embedding = teacher.embedding[...][:vocab_size]
  teacher_softcap = teacher.config.final_logit_softcap
  teacher_sums, teacher_argmax = model_eval_sums(
      teacher_hidden, teacher_embedding, targets, where, chunk_size=chunk_size,
      softcap=teacher_softcap)
  kl = token_level.chunked_divergence(
      hidden, embedding, teacher_hidden, teacher_embedding,
      token_level.TokenDistillationLoss("forward_kl", vocab_chunk_size=chunk_size),
      where=where, student_softcap=model_config.final_logit_softcap,
      teacher_softcap=teacher_softcap)
  sums["teacher"] = teacher_sums
  sums["kl"] = jnp.sum(kl)
  sums["agreement"] = jnp.sum(jnp.where(where, student_argmax == teacher_argmax, False)
                              ).astype(jnp.float32)
  return sums


def _model_results(sums: dict[str, Any], tokens: float) -> dict[str, float]:
  count = sums["bin_count"]
  calibration_gap = abs(sums["bin_confidence"] - sums["bin_correct"]).sum()
  mean_nll = float(sums["nll"]) / tokens
  return {
      "nll": mean_nll,
      "perplexity": float(jnp.exp(mean_nll)),
      "next_token_accuracy": float(sums["correct"]) / tokens,
      "ece": float(calibration_gap) / max(float(count.sum()), 1.0),
  }


def finalize_lm_sums(sums: dict[str, Any]) -> dict[str, float]:
  """Turn summed eval statistics into per-token results, flat with `student_` and `teacher_` keys.

  ECE is the expected calibration error over `CALIBRATION_BINS` equal-width
  bins of the greedy token's probability (Guo et al. 2017, "On Calibration
  of Modern Neural Networks").
  """
  tokens = max(float(sums["tokens"]), 1.0)
  results = {"target_tokens": float(sums["tokens"])}
  for side in ("student", "teacher"):
    if side in sums:
      results.update({f"{side}_{key}": value
                      for key, value in _model_results(sums[side], tokens).items()})
  if "kl" in sums:
    results["kl_teacher_student"] = float(sums["kl"]) / tokens
    results["teacher_agreement"] = float(sums["agreement"]) / tokens
  return results
