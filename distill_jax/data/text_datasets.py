"""Text datasets for language-model distillation, built offline as TFDS ArrayRecord.

Two sources, both available without network access:

* `reasoning_gym`: procedurally generated reasoning tasks from the PyPI package
  `reasoning-gym`. Each record is a question and a step-by-step solution
  ending in the verified answer. The generators, their sizes and seeds come
  from the config, and the validation split uses seeds offset by
  `VALIDATION_SEED_OFFSET` with questions seen in training removed.
* `gnu_standards`: the GNU Coding Standards and the GNU Maintainer
  Information, English prose from the Debian package `gnu-standards`
  (`/usr/share/doc/gnu-standards/*.text.gz`, GNU Free Documentation License).
  Each record is one paragraph; one paragraph in 20, chosen by a CRC32 of its
  text, goes to the validation split.

Records are dicts with `prompt` and `completion` strings. Plain text has an
empty prompt, so every one of its tokens is a training target; for reasoning
tasks only the solution's tokens are.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import gzip
import hashlib
import json
import os
import re
from typing import Any
import zlib

from absl import logging
import tensorflow_datasets as tfds

from distill_jax.data.image_datasets import _OfflineBuilder  # pylint: disable=protected-access
from distill_jax.data.image_datasets import _prepare_builder  # pylint: disable=protected-access
from distill_jax.errors import DataSourceError

TEXT_SOURCES = ("reasoning_gym", "gnu_standards")

GNU_STANDARDS_DIR = "/usr/share/doc/gnu-standards"
GNU_STANDARDS_FILES = ("standards.text.gz", "maintain.text.gz")
_VALIDATION_BUCKETS = 20
# Paragraphs shorter than this are headings, menu entries or index lines.
_MIN_PARAGRAPH_CHARS = 80

VALIDATION_SEED_OFFSET = 100_003


@dataclasses.dataclass(frozen=True)
class TextSplits:
  """Train and validation records of one text source.

  Attributes:
    train: records with `prompt` and `completion` strings.
    validation: held-out records of the same form.
    name: TFDS dataset name and config, for logs and fingerprints.
  """

  train: list[dict[str, str]]
  validation: list[dict[str, str]]
  name: str


# --- reasoning-gym ----------------------------------------------------------


_NUMBER = r"-?\d+(?:\.\d+)?"
_CHAIN = re.compile(rf"\s*({_NUMBER})((?:\s*[+-]\s*{_NUMBER})+)\s*")
_CHAIN_TERM = re.compile(rf"\s*([+-])\s*({_NUMBER})")


def _arithmetic_steps(expression: str) -> list[str] | None:
  """Return left-to-right steps of a chain of + and - on integers or decimals.

  Returns None when `expression` is anything else, such as one with `*` or
  parentheses.
  """
  match = _CHAIN.fullmatch(expression)
  if match is None:
    return None
  first, rest = match.groups()
  terms = _CHAIN_TERM.findall(rest)
  decimals = max((len(n.split(".")[1]) for n in [first] + [t[1] for t in terms] if "." in n),
                 default=0)

  def show(value: float) -> str:
    return f"{value:.{decimals}f}" if decimals else str(int(round(value)))

  total, steps = float(first), []
  for operator, operand in terms:
    updated = total + float(operand) if operator == "+" else total - float(operand)
    steps.append(f"{show(total)} {operator} {operand} = {show(updated)}")
    total = updated
  return steps


def reasoning_solution(entry: Mapping[str, Any]) -> str:
  """Write a step-by-step solution for one reasoning-gym entry, ending in its result.

  Uses the generator's own chain of thought where it has one (`answer_cot`
  of `gsm_symbolic`), left-to-right partial results for chains of + and -,
  and the moves of a Tower of Hanoi answer as its steps.
  """
  answer = str(entry["answer"]).strip()
  metadata = entry.get("metadata", {})

  if metadata.get("answer_cot"):
    steps = str(metadata["answer_cot"]).strip()
  elif metadata.get("expression") and _arithmetic_steps(str(metadata["expression"])):
    steps = "\n".join(_arithmetic_steps(str(metadata["expression"])))
  elif "\n" in answer:
    lines = answer.splitlines()
    steps = "\n".join(f"Step {i}: {line}" for i, line in enumerate(lines, 1))
    return f"{steps}\nThat is all {len(lines)} steps."
  else:
    steps = ""
  return (steps + "\n" if steps else "") + f"The answer is {answer}."


def reasoning_gym_records(generators: Sequence[Mapping[str, Any]], *,
                          seed_offset: int = 0) -> list[dict[str, str]]:
  """Generate question and solution records from reasoning-gym.

  Args:
    generators: dicts with `name` (a reasoning-gym dataset name), `size`
      (number of records) and `seed`.
    seed_offset: added to every seed, to draw a disjoint validation set.

  Raises:
    DataSourceError: a generator name is unknown to reasoning-gym.
  """
  import reasoning_gym  # pylint: disable=g-import-not-at-top

  known = set(reasoning_gym.factory.DATASETS)
  records = []
  for generator in generators:
    name = generator["name"]
    if name not in known:
      raise DataSourceError(
          f"reasoning-gym has no generator {name!r}; use one of its dataset names, such as "
          f"gsm_symbolic, chain_sum or basic_arithmetic")
    dataset = reasoning_gym.create_dataset(name, size=int(generator["size"]),
                                           seed=int(generator["seed"]) + seed_offset)
    for entry in dataset:
      records.append({"prompt": f"Question: {entry['question'].strip()}\nSolution:",
                      "completion": " " + reasoning_solution(entry), "task": name})
  return records


def generators_fingerprint(generators: Sequence[Mapping[str, Any]]) -> str:
  """Return a short hash of the generator list, used as the TFDS config name."""
  canonical = json.dumps([{"name": g["name"], "size": int(g["size"]), "seed": int(g["seed"])}
                          for g in generators], sort_keys=True)
  return hashlib.sha256(canonical.encode()).hexdigest()[:12]


_TEXT_FEATURES = ("prompt", "completion", "task")


class _TextBuilder(_OfflineBuilder, skip_registration=True):
  """Base class of builders whose records are prompt, completion and task strings."""

  def _text_features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({name: tfds.features.Text() for name in _TEXT_FEATURES})

  # What to change when a split comes out empty.
  EMPTY_SPLIT_HINT = "choose another source"

  def _generate_text(self, records):
    for index, record in enumerate(records):
      yield index, record

  def _text_splits(self, splits: Mapping[str, list[dict[str, str]]]) -> dict[str, Any]:
    """Return the split generators; raises `DataSourceError` if a split has no records."""
    for split, records in splits.items():
      if not records:
        raise DataSourceError(f"the {split} split of {self.name} would have no records; "
                              f"{self.EMPTY_SPLIT_HINT}")
    return {split: self._generate_text(records) for split, records in splits.items()}


class ReasoningGymText(_TextBuilder):
  """Question and solution records generated by reasoning-gym."""

  name = "reasoning_gym_text"
  EMPTY_SPLIT_HINT = "raise the sizes in config.data.generators"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, generators: Sequence[Mapping[str, Any]], **kwargs):
    self.generators = [dict(g) for g in generators]
    config = tfds.core.BuilderConfig(name=f"g{generators_fingerprint(generators)}",
                                     description=json.dumps(self.generators))
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Reasoning tasks from reasoning-gym with step-by-step solutions.",
        features=self._text_features(),
        homepage="https://github.com/open-thought/reasoning-gym",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    train = reasoning_gym_records(self.generators)
    seen = {record["prompt"] for record in train}
    validation = [record for record in reasoning_gym_records(
        self.generators, seed_offset=VALIDATION_SEED_OFFSET) if record["prompt"] not in seen]
    return self._text_splits({"train": train, "validation": validation})


# --- GNU Coding Standards ----------------------------------------------------


def gnu_standards_paragraphs(directory: str = GNU_STANDARDS_DIR) -> list[str]:
  """Return the prose paragraphs of the GNU Coding Standards and Maintainer Information.

  Lines of a paragraph are joined with single spaces. Headings, underlines,
  menus and short fragments are dropped.

  Raises:
    DataSourceError: a file is missing or unreadable.
  """
  paragraphs = []
  for file_name in GNU_STANDARDS_FILES:
    path = os.path.join(directory, file_name)
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    except FileNotFoundError:
      raise DataSourceError(
          f"{path} not found; install the Debian package with 'apt-get install gnu-standards' "
          f"or set config.data.text_dir to a directory with {', '.join(GNU_STANDARDS_FILES)}"
      ) from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
      raise DataSourceError(f"{path} is truncated or corrupt ({error}); reinstall it with "
                            f"'apt-get install --reinstall gnu-standards'") from None

    for block in re.split(r"\n\s*\n", text):
      lines = [line.strip() for line in block.splitlines()]
      if any(set(line) <= set("=-*.") and line for line in lines) or block.lstrip().startswith(
          "* "):
        continue
      paragraph = " ".join(line for line in lines if line)
      if len(paragraph) >= _MIN_PARAGRAPH_CHARS:
        paragraphs.append(paragraph)
  return paragraphs


def is_validation_paragraph(paragraph: str) -> bool:
  return zlib.crc32(paragraph.encode()) % _VALIDATION_BUCKETS == 0


class GnuStandardsText(_TextBuilder):
  """Paragraphs of the GNU Coding Standards and the GNU Maintainer Information."""

  name = "gnu_standards_text"
  EMPTY_SPLIT_HINT = ("point config.data.text_dir at the complete files of the Debian package "
                      "gnu-standards")
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, text_dir: str = GNU_STANDARDS_DIR, **kwargs):
    self.text_dir = text_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="English prose: the GNU Coding Standards and GNU Maintainer Information.",
        features=self._text_features(),
        homepage="https://www.gnu.org/prep/standards/",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    paragraphs = gnu_standards_paragraphs(self.text_dir)
    splits = {"train": [], "validation": []}
    for paragraph in paragraphs:
      split = "validation" if is_validation_paragraph(paragraph) else "train"
      splits[split].append({"prompt": "", "completion": paragraph, "task": "gnu_standards"})
    return self._text_splits(splits)


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, str]]:
  source = builder.as_data_source(split=split)
  records = []
  for index in range(len(source)):
    record = source[index]
    records.append({key: value.decode("utf-8") if isinstance(value, bytes) else str(value)
                    for key, value in record.items()})
  return records


def load_text_splits(source: str, data_dir: str, *,
                     generators: Sequence[Mapping[str, Any]] = (),
                     text_dir: str = GNU_STANDARDS_DIR) -> TextSplits:
  """Build the named text source into `data_dir` once and return its splits in memory.

  Args:
    source: one of `TEXT_SOURCES`.
    data_dir: TFDS data directory for the ArrayRecord files.
    generators: reasoning-gym generators, for `source="reasoning_gym"`.
    text_dir: directory of the gnu-standards files, for `source="gnu_standards"`.

  Raises:
    DataSourceError: the source is unknown, its files are missing, or a split
      is empty.
  """
  if source == "reasoning_gym":
    if not generators:
      raise DataSourceError("config.data.generators is empty; list at least one reasoning-gym "
                            "generator with its name, size and seed")
    make_builder = lambda d: ReasoningGymText(generators=generators, data_dir=d)
  elif source == "gnu_standards":
    make_builder = lambda d: GnuStandardsText(text_dir=text_dir, data_dir=d)
  else:
    raise DataSourceError(f"config.data.source must be one of {', '.join(TEXT_SOURCES)}, got "
                          f"{source!r}")

  builder = _prepare_builder(source, make_builder, data_dir)
  splits = TextSplits(train=_read_split(builder, "train"),
                      validation=_read_split(builder, "validation"),
                      name=f"{builder.name}/{builder.builder_config.name if builder.builder_config else 'default'}")
  for split in ("train", "validation"):
    if not getattr(splits, split):
      raise DataSourceError(f"the {split} split of {splits.name} in {data_dir} has no records; "
                            f"raise the generator sizes or choose another source")
  logging.info("loaded %s: %d train and %d validation records", splits.name, len(splits.train),
               len(splits.validation))
  return splits
