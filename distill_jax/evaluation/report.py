"""Report files of a distillation run: report.json, report.md and curve plots.

`write_report` takes one dict and writes it as JSON and as Markdown. Layout:

  {
    "recipe": str,            # e.g. "mnist_mlp"
    "dataset": str,           # e.g. "mnist"
    "models": {               # one entry per model, in this order if present
      "teacher": {...},
      "distilled_student": {...},
      "baseline_student": {...},
    },
    "distillation": {...},    # hyperparameters: temperature, alpha, steps, ...
    "comparison": {...},      # derived numbers, e.g. from `compare_models`
    "timings": {...},         # wall-clock seconds per stage
  }

Each model entry may contain `test_accuracy` (fraction in [0, 1]),
`top1_agreement_with_teacher` (fraction), `kl_teacher_student` (nats per
example), `parameters`, `latency_batch1_ms`, `latency_batchN_ms`,
`batch_size_N`, `peak_memory_batch1_mib`, `peak_memory_batchN_mib` and
`train_steps`. `profile_model` in `profiling.py` returns the profiling keys
under these names.

report.md contains a title, one table with a row per model and a column per
metric, then bullet lists for the other sections. Rendering is generic:
  * Unknown keys of a model entry become extra columns after the known ones.
    A column appears when at least one model has the key, and a model without
    it shows "–" there.
  * Values are formatted by key name. Keys ending in `accuracy` or containing
    `agreement` are fractions shown as percentages, keys ending in `_pp` are
    percentage points, and keys containing `ratio` or `speedup` are factors.
  * Top-level scalars other than the title's recipe and dataset are listed
    under the title. Every other top-level dict, known or not, becomes a
    section with a nested bullet list.

Both writers replace their files atomically: the content goes to a temporary
file in the same directory, which `os.replace` then renames over the target, so
a crash leaves either the old file or the new one, never part of one.
"""

from collections.abc import Mapping, Sequence
import io
import json
import math
import os
import tempfile
from typing import Any

from absl import logging
from matplotlib.backends import backend_agg
from matplotlib import figure as mpl_figure
import numpy as np

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"

# Shown in a table cell or bullet for a missing value.
MISSING_VALUE = "–"

_MODEL_ORDER = ("teacher", "distilled_student", "baseline_student")

# Known model metrics in column order, with their table headers.
_MODEL_COLUMNS = {
    "test_accuracy": "Test accuracy",
    "top1_agreement_with_teacher": "Top-1 agreement with teacher",
    "kl_teacher_student": "KL(teacher ‖ student) (nats)",
    "parameters": "Parameters",
    "latency_batch1_ms": "Latency batch 1 (ms)",
    "latency_batch1_p90_ms": "Latency batch 1 p90 (ms)",
    "latency_batchN_ms": "Latency batch N (ms)",
    "latency_batchN_p90_ms": "Latency batch N p90 (ms)",
    "batch_size_N": "N",
    "peak_memory_batch1_mib": "Peak memory batch 1 (MiB)",
    "peak_memory_batchN_mib": "Peak memory batch N (MiB)",
    "train_steps": "Train steps",
    "perplexity": "Perplexity",
    "nll": "NLL (nats/token)",
    "next_token_accuracy": "Next-token accuracy",
    "ece": "ECE",
    "tokens_per_second_batch1": "Tokens/s batch 1",
    "greedy_ms_per_token": "Greedy ms/token",
}

_SECTION_TITLES = {
    "comparison": "Comparison",
    "distillation": "Distillation hyperparameters",
    "timings": "Timings",
}

_TITLE_KEYS = ("recipe", "dataset")

# File mode of written reports. Temporary files are created with mode 0o600,
# and the rename would keep that mode.
_FILE_MODE = 0o644


def to_json_compatible(value: Any, path: str = "report") -> Any:
  """Convert a nested value into types that `json.dumps` writes as valid JSON.

  NumPy scalars become Python scalars, and arrays (NumPy, JAX or anything with
  `__array__`) become nested lists. Tuples become lists, dict keys become
  strings and path-like objects become strings. NaN and infinite floats become
  None, because JSON has no literal for them.

  Args:
    value: The value to convert.
    path: Location of `value` inside the report, used in error messages.

  Returns:
    The converted value.

  Raises:
    TypeError: for a value of any other type, naming its location.
  """
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, np.generic) or (
      hasattr(value, "__array__") and not isinstance(value, np.ndarray)
  ):
    value = np.asarray(value)
  if isinstance(value, np.ndarray):
    value = value.tolist()
    if not isinstance(value, list):
      return to_json_compatible(value, path)

  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  if isinstance(value, Mapping):
    return {
        _json_key(key): to_json_compatible(item, f"{path}[{key!r}]")
        for key, item in value.items()
    }
  if isinstance(value, (list, tuple)):
    return [
        to_json_compatible(item, f"{path}[{index}]")
        for index, item in enumerate(value)
    ]

  raise TypeError(
      f"{path} has type {type(value).__name__}, which cannot be written to "
      "JSON. Convert it to a number, string, list or dict first."
  )


def _json_key(key: Any) -> str:
  """Return a dict key as a string, using the Python value of NumPy scalars."""
  if isinstance(key, np.generic):
    key = key.item()
  return key if isinstance(key, str) else str(key)


def _atomic_write_bytes(path: str, data: bytes) -> None:
  """Write `data` to `path` through a temporary file and `os.replace`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)

  file_descriptor, temp_path = tempfile.mkstemp(
      dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    with os.fdopen(file_descriptor, "wb") as temp_file:
      temp_file.write(data)
      temp_file.flush()
      os.fsync(temp_file.fileno())
    os.chmod(temp_path, _FILE_MODE)
    os.replace(temp_path, path)
  except BaseException:
    # The temporary file is removed on any failure, including
    # KeyboardInterrupt, and the error is re-raised.
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not (
      isinstance(value, (bool, np.bool_))
  )


def _format_number(value: float | int) -> str:
  """Format an int with thousands separators and a float with 4 digits."""
  if isinstance(value, (int, np.integer)):
    return f"{int(value):,}"
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if abs(value) >= 1000:
    return f"{value:,.1f}"
  return f"{value:.4g}"


def format_value(key: str, value: Any) -> str:
  """Format one report value for Markdown, choosing the unit by key name."""
  if value is None:
    return MISSING_VALUE
  if hasattr(value, "__array__") and np.ndim(value) == 0:
    # NumPy and JAX scalars are formatted as the Python scalar they hold.
    value = np.asarray(value).item()

  if _is_number(value) and math.isfinite(float(value)):
    if key.endswith("accuracy") or "agreement" in key:
      return f"{100.0 * float(value):.2f}%"
    if key.endswith("_pp"):
      return f"{float(value):+.2f} pp"
    if "ratio" in key or "speedup" in key:
      return f"{float(value):.2f}×"
  if _is_number(value):
    return _format_number(value)
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return str(value).lower()
  return json.dumps(to_json_compatible(value, key))


def _escape_cell(text: str) -> str:
  """Escape the characters that would break a Markdown table row."""
  return text.replace("|", "\\|").replace("\n", " ")


def _ordered_models(models: Mapping[str, Any]) -> list[str]:
  """Return model names: the known ones in fixed order, then the others."""
  known = [name for name in _MODEL_ORDER if name in models]
  others = [name for name in models if name not in _MODEL_ORDER]
  return known + others


def _model_columns(
    models: Mapping[str, Any], model_names: Sequence[str]
) -> list[str]:
  """Return the metric keys that at least one model has, in column order."""
  present = []
  for name in model_names:
    entry = models[name]
    if isinstance(entry, Mapping):
      for key in entry:
        if key not in present:
          present.append(key)

  known = [key for key in _MODEL_COLUMNS if key in present]
  extra = [key for key in present if key not in _MODEL_COLUMNS]
  return known + extra


def render_model_table(models: Mapping[str, Any]) -> list[str]:
  """Render the models as Markdown table lines, one row per model."""
  model_names = _ordered_models(models)
  columns = _model_columns(models, model_names)

  headers = ["Model"] + [_MODEL_COLUMNS.get(key, key) for key in columns]
  lines = [
      "| " + " | ".join(_escape_cell(header) for header in headers) + " |",
      "| --- |" + " ---: |" * len(columns),
  ]
  for name in model_names:
    entry = models[name]
    if not isinstance(entry, Mapping):
      entry = {}
    cells = [name] + [format_value(key, entry.get(key)) for key in columns]
    lines.append(
        "| " + " | ".join(_escape_cell(cell) for cell in cells) + " |"
    )
  return lines


def _render_bullets(value: Any, key: str = "", depth: int = 0) -> list[str]:
  """Render a value as Markdown bullets, nesting one level per dict."""
  indent = "  " * depth
  if isinstance(value, Mapping):
    if not value:
      return [f"{indent}- {MISSING_VALUE}"]
    lines = []
    for item_key, item in value.items():
      item_key = str(item_key)
      if isinstance(item, Mapping):
        lines.append(f"{indent}- **{item_key}**:")
        lines.extend(_render_bullets(item, item_key, depth + 1))
      else:
        # A line break would end the bullet, so it is shown as "\n".
        formatted = format_value(item_key, item).replace("\n", "\\n")
        lines.append(f"{indent}- **{item_key}**: {formatted}")
    return lines
  return [f"{indent}- {format_value(key, value)}"]


def render_markdown(report: Mapping[str, Any]) -> str:
  """Render a report dict as Markdown in the layout of the module docstring."""
  recipe = report.get("recipe")
  dataset = report.get("dataset")
  title = "# Distillation report"
  if recipe is not None:
    title += f": {recipe}"
  if dataset is not None:
    title += f" on {dataset}"
  lines = [title, ""]

  scalars = {
      key: value
      for key, value in report.items()
      if key not in _TITLE_KEYS
      and key not in _SECTION_TITLES
      and key != "models"
      and not isinstance(value, Mapping)
  }
  if scalars:
    lines.extend(_render_bullets(scalars))
    lines.append("")

  models = report.get("models")
  if isinstance(models, Mapping) and models:
    lines.extend(["## Models", ""])
    lines.extend(render_model_table(models))
    lines.append("")

  section_keys = [key for key in _SECTION_TITLES if key in report]
  section_keys += [
      key
      for key, value in report.items()
      if key not in _SECTION_TITLES
      and key != "models"
      and isinstance(value, Mapping)
  ]
  for key in section_keys:
    heading = _SECTION_TITLES.get(key, key.replace("_", " ").capitalize())
    lines.extend([f"## {heading}", ""])
    lines.extend(_render_bullets(report[key], key))
    lines.append("")

  return "\n".join(lines).rstrip("\n") + "\n"


def _metric(models: Mapping[str, Any], model: str, key: str) -> float | None:
  """Return a finite numeric metric of a model, or None if it is missing."""
  entry = models.get(model)
  if not isinstance(entry, Mapping):
    return None
  value = entry.get(key)
  if not _is_number(value) or not math.isfinite(float(value)):
    return None
  return float(value)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
  if numerator is None or denominator is None or denominator <= 0:
    return None
  return numerator / denominator


def compare_models(models: Mapping[str, Any]) -> dict[str, float]:
  """Compute the standard comparison numbers between teacher and students.

  Ratios use the distilled student, or the baseline student when there is no
  distilled one. A number is left out when a value it needs is missing.

  Args:
    models: The "models" section of a report.

  Returns:
    Any of `distilled_minus_baseline_accuracy_pp`,
    `teacher_minus_distilled_accuracy_pp` (percentage points),
    `parameter_ratio_teacher_to_student`,
    `speedup_batch1_teacher_to_student`, `speedup_batchN_teacher_to_student`
    (teacher latency / student latency) and
    `peak_memory_ratio_batchN_teacher_to_student`.
  """
  student = (
      "distilled_student" if "distilled_student" in models
      else "baseline_student"
  )
  teacher_accuracy = _metric(models, "teacher", "test_accuracy")
  distilled_accuracy = _metric(models, "distilled_student", "test_accuracy")
  baseline_accuracy = _metric(models, "baseline_student", "test_accuracy")

  comparison = {}
  if distilled_accuracy is not None and baseline_accuracy is not None:
    comparison["distilled_minus_baseline_accuracy_pp"] = 100.0 * (
        distilled_accuracy - baseline_accuracy
    )
  if teacher_accuracy is not None and distilled_accuracy is not None:
    comparison["teacher_minus_distilled_accuracy_pp"] = 100.0 * (
        teacher_accuracy - distilled_accuracy
    )

  ratios = {
      "parameter_ratio_teacher_to_student": "parameters",
      "speedup_batch1_teacher_to_student": "latency_batch1_ms",
      "speedup_batchN_teacher_to_student": "latency_batchN_ms",
      "peak_memory_ratio_batchN_teacher_to_student": "peak_memory_batchN_mib",
  }
  for name, key in ratios.items():
    ratio = _ratio(
        _metric(models, "teacher", key), _metric(models, student, key)
    )
    if ratio is not None:
      comparison[name] = ratio
  return comparison


def write_report(
    workdir: str | os.PathLike[str], report: Mapping[str, Any]
) -> tuple[str, str]:
  """Write report.json and report.md into `workdir`, each atomically.

  Args:
    workdir: Output directory, created if missing.
    report: Report dict in the layout of the module docstring.

  Returns:
    The paths of report.json and report.md.

  Raises:
    TypeError: if a value cannot be converted to JSON.
  """
  workdir = os.fspath(workdir)
  json_path = os.path.join(workdir, REPORT_JSON)
  markdown_path = os.path.join(workdir, REPORT_MARKDOWN)

  json_text = json.dumps(
      to_json_compatible(report), indent=2, allow_nan=False, ensure_ascii=False
  )
  markdown_text = render_markdown(report)

  _atomic_write_bytes(json_path, (json_text + "\n").encode("utf-8"))
  _atomic_write_bytes(markdown_path, markdown_text.encode("utf-8"))
  logging.info("Wrote report to %s and %s.", json_path, markdown_path)
  return json_path, markdown_path


def _curve_array(name: str, points: Sequence[tuple[int, float]]) -> np.ndarray:
  """Return the points of one curve as a float array of shape [n, 2]."""
  array = np.asarray(points, dtype=np.float64)
  if array.size == 0:
    return array.reshape(0, 2)
  if array.ndim != 2 or array.shape[1] != 2:
    raise ValueError(
        f"Curve {name!r} must be a list of (step, value) pairs, got an array "
        f"of shape {array.shape}."
    )
  return array


def plot_learning_curve_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> str:
  """Plot curves into a PNG with one panel per metric, side by side.

  The figure is drawn with matplotlib's Agg canvas directly, so the global
  pyplot backend is neither used nor changed.

  Args:
    panels: Maps each panel's y-axis label to its curves. Curves map a legend
      name to (step, value) points.
    path: Output PNG path. Its directory is created if missing.
    title: Figure title.

  Returns:
    The path of the written PNG.

  Raises:
    ValueError: if there are no panels, a panel has no curves or a curve is
      not a list of (step, value) pairs.
  """
  if not panels:
    raise ValueError("panels is empty. Pass at least one metric to plot.")

  figure = mpl_figure.Figure(figsize=(6.0 * len(panels), 4.0), dpi=120)
  canvas = backend_agg.FigureCanvasAgg(figure)
  axes_list = figure.subplots(1, len(panels), squeeze=False)[0]

  for axes, (ylabel, curves) in zip(axes_list, panels.items()):
    if not curves:
      raise ValueError(f"Panel {ylabel!r} has no curves to plot.")
    for name, points in curves.items():
      array = _curve_array(name, points)
      axes.plot(array[:, 0], array[:, 1], label=name)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend()

  figure.suptitle(title)
  figure.tight_layout()

  buffer = io.BytesIO()
  canvas.print_png(buffer)
  path = os.fspath(path)
  _atomic_write_bytes(path, buffer.getvalue())
  return path


def plot_learning_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
) -> str:
  """Plot (step, value) curves of one metric into a PNG, one line per curve.

  Args:
    curves: Maps each legend name to its (step, value) points.
    path: Output PNG path, written atomically.
    title: Figure title.
    ylabel: Y-axis label. The x-axis label is "step".

  Returns:
    The path of the written PNG.
  """
  return plot_learning_curve_panels({ylabel: curves}, path, title=title)
