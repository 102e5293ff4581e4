"""The report of the language-model recipe: quality kept, and speed, memory and size saved.

The report has the shape of the classification report (`models`,
`distillation`, `comparison`, `measurement`, `environment`, `timings`), with
language-model metrics in each model entry and a `continuations` section of
greedy completions of fixed prompts.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax import evaluation
from distill_jax.generation import greedy_continuation
from distill_jax.training import loop

# Validation metrics shown per model, renamed from `finalize_lm_sums` keys.
_QUALITY_KEYS = ("perplexity", "nll", "next_token_accuracy", "ece")


def _prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
  """Run the decoder over `tokens` and return the last position's logits, as in generation."""
  model = nnx.merge(graphdef, params)
  hidden = model(tokens, return_logits=False).hidden
  return model.logits_from_hidden(hidden[:, -1])


def profile(graphdef: nnx.GraphDef, params: nnx.State, seq_len: int, batch_size: int,
            repeats: int) -> dict[str, Any]:
  """Measure parameters, latency, tokens per second and peak memory of a prefill pass."""
  apply_fn = functools.partial(_prefill, graphdef)
  params = jax.device_get(params)
  batch1 = jnp.zeros((1, seq_len), jnp.int32)
  batch_n = jnp.zeros((batch_size, seq_len), jnp.int32)
  result = evaluation.profile_model(apply_fn, params, batch1, batch_n, warmup=1,
                                    repeats=repeats)
  return {
      "parameters": result["parameters"],
      "latency_batch1_ms": result["latency_batch1_ms"],
      "tokens_per_second_batch1": seq_len / (result["latency_batch1_ms"] / 1000.0),
      "latency_batchN_ms": result["latency_batchN_ms"],
      "batch_size_N": batch_size,
      "peak_memory_batch1_mib": result["peak_memory_batch1_mib"],
      "peak_memory_batchN_mib": result["peak_memory_batchN_mib"],
  }


def _quality(results: dict[str, float], side: str) -> dict[str, float]:
  return {key: results[f"{side}_{key}"] for key in _QUALITY_KEYS}


def _continuations(config, tokenizer, models: dict[str, tuple[nnx.GraphDef, nnx.State]]
                   ) -> tuple[dict[str, dict[str, str]], dict[str, float]]:
  """Return greedy continuations of each report prompt and each model's seconds per token."""
  report_config = config["report"]
  continuations, seconds = {}, {name: [] for name in models}
  for number, prompt in enumerate(report_config["prompts"], 1):
    prompt_ids = tokenizer.encode(prompt)
    continuations[f"prompt {number}"] = entry = {"prompt": prompt}
    for name, (graphdef, params) in models.items():
      new_ids, per_token = greedy_continuation(
          graphdef, jax.device_get(params), prompt_ids,
          max_new_tokens=int(report_config["max_new_tokens"]),
          buffer_length=int(report_config["generation_buffer"]), eos_id=tokenizer.eos_id)
      entry[name] = tokenizer.decode(
          [i for i in new_ids if i != tokenizer.eos_id])
      seconds[name].append(per_token)
  return continuations, {name: 1000.0 * sum(s) / len(s) for name, s in seconds.items() if s}


def build_report(config, data, teacher: loop.Teacher, teacher_config, validation,
                 distilled: loop.StageResult, baseline: loop.StageResult | None, loss,
                 mode: str) -> dict[str, Any]:
  """Evaluate the final models and assemble the report dict."""
  report_config = config["report"]
  seq_len = data.train.seq_len
  repeats = int(report_config["latency_repeats"])
  batch_size = int(config["student"]["train"]["batch_size"])

  students = [("distilled_student", distilled)]
  if baseline is not None:
    students.append(("baseline_student", baseline))

  models, teacher_quality = {}, None
  for key, result in students:
    results = validation.evaluate(result.graphdef, result.params)
    teacher_quality = _quality(results, "teacher")
    models[key] = {
        **_quality(results, "student"),
        "kl_teacher_student": results["kl_teacher_student"],
        "top1_agreement_with_teacher": results["teacher_agreement"],
        "train_steps": result.steps,
        **profile(result.graphdef, result.params, seq_len, batch_size, repeats),
    }
  models = {"teacher": {**teacher_quality,
                        **profile(teacher.graphdef, teacher.params, seq_len, batch_size,
                                  repeats)}, **models}

  generation_models = {"teacher": (teacher.graphdef, teacher.params)}
  generation_models.update({key: (result.graphdef, result.params) for key, result in students})
  continuations, per_token_ms = _continuations(config, data.tokenizer, generation_models)
  for name, milliseconds in per_token_ms.items():
    models[name]["greedy_ms_per_token"] = milliseconds

  comparison = evaluation.compare_models(models)
  if baseline is not None:
    comparison["baseline_minus_distilled_kl"] = (
        models["baseline_student"]["kl_teacher_student"]
        - models["distilled_student"]["kl_teacher_student"])
    comparison["baseline_minus_distilled_perplexity"] = (
        models["baseline_student"]["perplexity"] - models["distilled_student"]["perplexity"])
  comparison["distilled_to_teacher_perplexity"] = (
      models["distilled_student"]["perplexity"] / models["teacher"]["perplexity"])

  distill_config = config["distill"]
  train_config = config["student"]["train"]
  return {
      "recipe": config["recipe"],
      "dataset": data.name,
      "models": models,
      "distillation": {
          "teacher": f"Gemma 3, {teacher_config.num_layers} layers, d_model "
                     f"{teacher_config.d_model}",
          "student_init": config["student"]["init"],
          "teacher_outputs": mode,
          "divergence": loss.divergence,
          "temperature": loss.temperature,
          "alpha": float(distill_config["alpha"]),
          "beta": loss.beta,
          "top_k": loss.top_k,
          "student_steps": int(train_config["steps"]),
          "student_batch_size": batch_size,
          "seq_len": seq_len,
          "train_rows": len(data.train),
          "train_target_tokens": data.train.target_tokens(),
          "validation_target_tokens": data.validation.target_tokens(),
      },
      "comparison": comparison,
      "continuations": continuations,
      "measurement": {
          "quality": "validation split, target tokens only; perplexity is exp of the mean "
                     "next-token negative log-likelihood; ece uses 10 equal-width bins of "
                     "the greedy token's probability",
          "latency": f"median of {repeats} jitted prefill passes of {seq_len} tokens (decoder "
                     "plus the last position's logits) after warm-up",
          "greedy_ms_per_token": "median milliseconds per greedy token over a "
                                 f"{int(report_config['generation_buffer'])}-token buffer, "
                                 "without a key-value cache",
          "peak_memory": "XLA's compiled memory analysis of one prefill pass: arguments, "
                         "outputs and temporaries",
      },
      "environment": {
          "backend": jax.default_backend(),
          "devices": jax.device_count(),
          "processes": jax.process_count(),
      },
  }


def plot(workdir: str, distilled: loop.StageResult, baseline: loop.StageResult | None) -> None:
  """Draw validation perplexity and KL to the teacher against training steps."""
  results = [("distilled", distilled)] + ([("baseline", baseline)] if baseline else [])

  def curves(key):
    return {label: [(r["step"], r[key]) for r in result.eval_history if key in r]
            for label, result in results}

  panels = {"validation perplexity": curves("eval/student_perplexity"),
            "KL(teacher || student), nats per token": curves("eval/kl_teacher_student")}
  evaluation.plot_learning_curve_panels(panels, os.path.join(workdir, "learning_curves.png"),
                                        title="Student learning curves")
