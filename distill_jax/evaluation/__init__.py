"""Evaluation: classification metrics, model profiling and run reports.

This package imports no other distill_jax subpackage. It works on logits,
pytrees of parameters and pure `apply_fn(params, inputs)` functions.
"""

from distill_jax.evaluation.classification import add_sums
from distill_jax.evaluation.classification import classification_sums
from distill_jax.evaluation.classification import finalize_sums
from distill_jax.evaluation.profiling import count_parameters
from distill_jax.evaluation.profiling import forward_peak_memory_bytes
from distill_jax.evaluation.profiling import measure_latency
from distill_jax.evaluation.profiling import profile_model
from distill_jax.evaluation.report import compare_models
from distill_jax.evaluation.report import plot_learning_curve_panels
from distill_jax.evaluation.report import plot_learning_curves
from distill_jax.evaluation.report import render_markdown
from distill_jax.evaluation.report import to_json_compatible
from distill_jax.evaluation.report import write_report

__all__ = [
    "add_sums",
    "classification_sums",
    "compare_models",
    "count_parameters",
    "finalize_sums",
    "forward_peak_memory_bytes",
    "measure_latency",
    "plot_learning_curve_panels",
    "plot_learning_curves",
    "profile_model",
    "render_markdown",
    "to_json_compatible",
    "write_report",
]
