r"""Command line of distill_jax: flags -> config -> run.

    python -m distill_jax.main --config=configs/fashion_mnist_kd.py --workdir=/tmp/run \
        [--config.student.train.steps=3000 ...]

Rerunning the same command with the same workdir resumes every stage from its
latest checkpoint. SIGTERM or Ctrl-C stops the run after the current step with
a checkpoint saved and exit code 0; a second one exits at once with code 130.
Invalid input is reported in one line on stderr with exit code 2.
"""

import os
import sys

# TensorFlow is imported by config_flags (for file access) and by TFDS, but
# runs no computation here; keep its C++ start-up messages out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import logging as python_logging

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from distill_jax.errors import UserInputError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Recipe file and optional variant, configs/NAME.py[:VARIANT]; override any value with "
    "--config.KEY=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints, TensorBoard logs and the report; rerunning with the same "
    "directory resumes the run.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/distill_jax/xla",
    "Directory of JAX's persistent compilation cache, so that a resumed or repeated run "
    "skips compiling the programs it has compiled before; empty disables it.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Delete the run already in --workdir (its checkpoints, logs, report and teacher cache) "
    "when its config differs from this one, and start over.")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# Libraries whose INFO records describe their internals (every checkpoint file
# write, every iterator step); their warnings and errors still pass.
_QUIET_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/", "/clu/platform/")


def _drop_library_info(record: python_logging.LogRecord) -> bool:
  """Drop the libraries' INFO records, and the tracebacks of their errors.

  The error that stops the run is printed as one line of its own; a library's
  error record keeps its message.
  """
  from_library = any(part in record.pathname for part in _QUIET_LIBRARIES)
  if from_library and record.exc_info:
    record.exc_info, record.exc_text = None, None
  return record.levelno >= python_logging.WARNING or not from_library


def _exit_with_error(message: str) -> None:
  print(f"distill-jax: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _one_line(message: str) -> str:
  """Collapse a flag error to one line; of an embedded traceback keep only the final error."""
  if "Traceback (most recent call last)" in message:
    head = message.split("Traceback", 1)[0]
    last = [line for line in message.splitlines() if line.strip()][-1]
    message = f"{head} {last}"
  return " ".join(message.split())


def _unknown_key_message(error: Exception, argv: list[str]) -> str:
  """Turn ConfigDict's multi-line unknown-key error into one line naming the flag."""
  # ConfigDict raises AttributeError(KeyError(message)); unwrap to the message.
  while isinstance(error, Exception) and error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  key = lines[0].strip("'\"") if lines else "?"
  flag = next((arg.split("=", 1)[0] for arg in argv
               if arg.startswith("--config.") and arg.split("=", 1)[0].endswith("." + key)),
              f"--config...{key}")
  hint = f" ({lines[1].rstrip('?')})" if len(lines) > 1 else ""
  return (f"{flag} sets an unknown config key {key!r}{hint}; check the key names in the "
          "recipe file")


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags and load the config, exiting with code 2 and one line on bad input."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as error:
    message = _one_line(str(error))
    if message.startswith("flag --config."):
      message += "; give a value of the type that the recipe file sets for this key"
    _exit_with_error(message)
  except (AttributeError, KeyError) as error:
    _exit_with_error(_unknown_key_message(error, argv))
  except (TypeError, ValueError) as error:
    _exit_with_error(" ".join(str(error).split()))

  if _CONFIG.value is None or not flags.FLAGS["config"].present:
    _exit_with_error("--config is required, e.g. --config=configs/fashion_mnist_kd.py")
  if not _WORKDIR.value:
    _exit_with_error("--workdir is required: the directory for checkpoints, logs and the report")
  if len(remaining) > 1:
    _exit_with_error(f"unexpected positional arguments {remaining[1:]}; all options are flags "
                     "like --config.KEY=VALUE")
  return remaining


def _load_config() -> ml_collections.ConfigDict:
  """Return the parsed config; a missing or broken recipe file exits with code 2."""
  config = _CONFIG.value
  if isinstance(config, ml_collections.ConfigDict):
    return config
  filename = flags.FLAGS["config"].config_filename
  if not os.path.isfile(filename):
    _exit_with_error(f"the recipe file {filename!r} does not exist; pass one of configs/*.py, "
                     "e.g. --config=configs/fashion_mnist_kd.py")
  # On a failed load, config_flags returns an object that raises the error on first use.
  try:
    config.recipe  # pylint: disable=pointless-statement
  except Exception as error:  # pylint: disable=broad-except
    _exit_with_error(f"cannot load the recipe file {flags.FLAGS['config'].config_filename!r}: "
                     f"{' '.join(str(error).split())}")
  _exit_with_error(f"the recipe file {flags.FLAGS['config'].config_filename!r} did not return "
                   "a ConfigDict from get_config()")


# Cap of the compilation cache; JAX evicts the least recently used programs beyond it.
_COMPILATION_CACHE_BYTES = 2 * 1024**3


def _enable_compilation_cache() -> None:
  """Point JAX's persistent compilation cache at --compilation_cache_dir, unless set by JAX_*."""
  import jax  # pylint: disable=g-import-not-at-top

  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not _COMPILATION_CACHE.value:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_COMPILATION_CACHE.value))
  # Cache every program: the many small ones of model set-up add up to seconds.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_compilation_cache_max_size", _COMPILATION_CACHE_BYTES)


def main(argv: list[str]) -> None:
  del argv
  # Imported here so that `--help` and flag errors come back without loading
  # JAX, and config errors without loading TensorFlow (for TFDS and TensorBoard).
  from distill_jax.training import preemption
  from distill_jax.training import validation

  logging.get_absl_handler().addFilter(_drop_library_info)
  # JAX logs backend probing (for instance a missing TPU library) through its own handler.
  python_logging.getLogger("jax").setLevel(python_logging.WARNING)
  config = _load_config()
  _enable_compilation_cache()
  try:
    with preemption.handle_stop_signals():
      if config.get("task") == "language_model":
        validation.validate_language_model_config(config)
        from distill_jax.training import lm_distill  # pylint: disable=g-import-not-at-top

        report = lm_distill.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
      else:
        validation.validate_config(config)
        from distill_jax.training import classification_kd  # pylint: disable=g-import-not-at-top

        report = classification_kd.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except UserInputError as error:
    _exit_with_error(str(error))
  except preemption.RunStopped as stopped:
    logging.warning("%s", stopped)
    print(f"distill-jax: {stopped}; rerun the same command to resume", file=sys.stderr)
    sys.exit(0)
  except KeyboardInterrupt:
    # Each stage waits for its pending checkpoint save before this point.
    print(f"distill-jax: interrupted; rerun the same command to resume {_WORKDIR.value} from "
          "its latest checkpoint", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)

  if "teacher_cache" in report and "models" not in report:
    print(f"teacher cache ready in {report['teacher_cache']}")
    return
  models = report["models"]
  if config.get("task") == "language_model":
    summary = ", ".join(f"{name} {entry['perplexity']:.2f}" for name, entry in models.items())
    logging.info("validation perplexity: %s", summary)
    print(f"validation perplexity: {summary}; report in {_WORKDIR.value}/report.md")
    return
  summary = ", ".join(f"{name} {entry['test_accuracy']:.2%}" for name, entry in models.items())
  logging.info("test accuracy: %s", summary)
  print(f"test accuracy: {summary}; report in {_WORKDIR.value}/report.md")


def _quiet_closed_loop_errors(error_type, error, traceback) -> None:
  """Print one line, not a traceback, for a late callback into a closed asyncio loop.

  After a failed asynchronous checkpoint save, TensorStore may still complete
  futures of Orbax's event loop once that loop is closed, and reports each
  through `sys.excepthook`. Every other error keeps the default traceback.
  """
  if issubclass(error_type, RuntimeError) and str(error) == "Event loop is closed":
    logging.warning("ignored a late checkpoint callback: %s", error)
    return
  sys.__excepthook__(error_type, error, traceback)


def run_cli() -> None:
  """Entry point of the `distill-jax` console script and of `python -m distill_jax.main`."""
  sys.excepthook = _quiet_closed_loop_errors
  # absl's --help lists the flags of the module named by sys.argv[0], which is
  # the console script's wrapper rather than this module.
  for name in ("config", "workdir", "overwrite", "compilation_cache_dir"):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_cli()
