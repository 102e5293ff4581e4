"""Tests of text sources, packing and the offline teacher cache."""

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest

from distill_jax.data import packing
from distill_jax.data import teacher_cache
from distill_jax.data import text_datasets
from distill_jax.errors import ConfigError, DataSourceError


class CharacterTokenizer:
  """One token per character: ids 3 + ord(c); 0 pad, 1 eos, 2 bos."""

  pad_id, eos_id, bos_id = 0, 1, 2
  vocab_size = 3 + 128
  fingerprint = "characters"

  def encode(self, text, add_bos=None):
    ids = [3 + ord(c) for c in text]
    return [self.bos_id] + ids if add_bos else ids


TOKENIZER = CharacterTokenizer()


def _decode(ids):
  return "".join(chr(i - 3) if i >= 3 else "|" for i in ids)


# --- packing ----------------------------------------------------------------


def test_packing_masks_prompt_and_padding():
  packed = packing.pack_records([{"prompt": "ab", "completion": "xyz"}], TOKENIZER, 10)
  row = packed.row(0)
  # [bos] a b x y z [eos]: 6 inputs, 6 targets, 4 padding positions.
  assert _decode(row["tokens"][:6]) == "|abxyz"
  assert _decode(row["targets"][:6]) == "abxyz|"
  assert row["targets"][5] == TOKENIZER.eos_id
  assert row["loss_mask"].tolist() == [False, False, True, True, True, True] + [False] * 4
  assert row["segment_ids"].tolist() == [1] * 6 + [0] * 4
  assert row["positions"].tolist() == list(range(6)) + [0] * 4


def test_packing_puts_records_side_by_side():
  records = [{"prompt": "", "completion": "abc"}, {"prompt": "q", "completion": "de"}]
  packed = packing.pack_records(records, TOKENIZER, 12)
  row = packed.row(0)
  assert len(packed) == 1
  assert row["segment_ids"].tolist() == [1] * 4 + [2] * 4 + [0] * 4
  assert row["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 0, 0]
  # Plain text trains on every token; the second record's prompt "q" is masked.
  assert row["loss_mask"].tolist() == [True] * 4 + [False, True, True, True] + [False] * 4


def test_packing_starts_new_row_when_full():
  records = [{"prompt": "", "completion": "abcdef"}, {"prompt": "", "completion": "ghi"}]
  packed = packing.pack_records(records, TOKENIZER, 8)
  assert len(packed) == 2
  assert _decode(packed.row(1)["tokens"][:4]) == "|ghi"


def test_long_text_split_without_losing_targets():
  text = "abcdefghijklmnopqrstuvwxyz"
  packed = packing.pack_records([{"prompt": "", "completion": text}], TOKENIZER, 8)
  targets = [t for row in range(len(packed)) for t, keep in
             zip(packed.row(row)["targets"], packed.row(row)["loss_mask"]) if keep]
  assert _decode(targets) == text + "|"
  assert packed.target_tokens() == len(text) + 1


def test_long_prompt_record_dropped():
  records = [{"prompt": "a long question", "completion": "answer"},
             {"prompt": "q", "completion": "a"}]
  packed = packing.pack_records(records, TOKENIZER, 8)
  assert packed.dropped == 1
  assert len(packed) == 1


def test_packing_rejects_when_nothing_fits():
  with pytest.raises(DataSourceError, match="no record fits in config.data.seq_len=4"):
    packing.pack_records([{"prompt": "question", "completion": "answer"}], TOKENIZER, 4)


def test_packing_max_rows():
  records = [{"prompt": "", "completion": "abcdefg"}] * 5
  assert len(packing.pack_records(records, TOKENIZER, 8, max_rows=3)) == 3


def test_fingerprint_changes_with_data():
  first = packing.pack_records([{"prompt": "", "completion": "abc"}], TOKENIZER, 8)
  same = packing.pack_records([{"prompt": "", "completion": "abc"}], TOKENIZER, 8)
  other = packing.pack_records([{"prompt": "", "completion": "abd"}], TOKENIZER, 8)
  assert first.fingerprint() == same.fingerprint()
  assert first.fingerprint() != other.fingerprint()


# --- text sources -------------------------------------------------------------


def test_chain_sum_solution_steps():
  entry = {"answer": "156", "metadata": {"expression": "60 + 93 - 16 + 19"}}
  assert text_datasets.reasoning_solution(entry) == (
      "60 + 93 = 153\n153 - 16 = 137\n137 + 19 = 156\nThe answer is 156.")


def test_decimal_chain_solution_steps():
  entry = {"answer": "-2.2017", "metadata": {"expression": "4.4439 + 1.2537 - 7.8993"}}
  assert text_datasets.reasoning_solution(entry).splitlines() == [
      "4.4439 + 1.2537 = 5.6976", "5.6976 - 7.8993 = -2.2017", "The answer is -2.2017."]


def test_solution_uses_generator_chain_of_thought():
  entry = {"answer": "7", "metadata": {"answer_cot": "3 + 4 = 7"}}
  assert text_datasets.reasoning_solution(entry) == "3 + 4 = 7\nThe answer is 7."


def test_reasoning_gym_records_are_reproducible():
  generators = [{"name": "chain_sum", "size": 3, "seed": 5}]
  first = text_datasets.reasoning_gym_records(generators)
  second = text_datasets.reasoning_gym_records(generators)
  assert first == second
  assert len(first) == 3
  assert first[0]["prompt"].startswith("Question: ")
  assert first[0]["completion"].rstrip().endswith(".")


def test_unknown_generator_rejected():
  with pytest.raises(DataSourceError, match="reasoning-gym has no generator 'no_such_task'"):
    text_datasets.reasoning_gym_records([{"name": "no_such_task", "size": 1, "seed": 0}])


def _write_gnu_files(directory, paragraphs):
  for name in text_datasets.GNU_STANDARDS_FILES:
    with gzip.open(os.path.join(directory, name), "wt", encoding="utf-8") as f:
      f.write("1 Title\n*******\n\n" + "\n\n".join(paragraphs) + "\n\n* Menu:\n* item::\n")


def test_gnu_paragraphs_joined_and_filtered(tmp_path):
  paragraph = ("This is a paragraph of prose that is long enough to be kept by the reader,\n"
               "   and it continues on a second line.")
  _write_gnu_files(str(tmp_path), [paragraph, "Too short."])
  paragraphs = text_datasets.gnu_standards_paragraphs(str(tmp_path))
  assert paragraphs == [" ".join(line.strip() for line in paragraph.splitlines())] * 2


def test_gnu_missing_files_rejected(tmp_path):
  with pytest.raises(DataSourceError, match="apt-get install gnu-standards"):
    text_datasets.gnu_standards_paragraphs(str(tmp_path))


def test_text_splits_built_once(tmp_path):
  paragraphs = [f"Paragraph number {i} says something long enough to be kept as training "
                f"prose for the language model." for i in range(60)]
  text_dir = tmp_path / "text"
  text_dir.mkdir()
  _write_gnu_files(str(text_dir), paragraphs)
  splits = text_datasets.load_text_splits("gnu_standards", str(tmp_path / "tfds"),
                                          text_dir=str(text_dir))
  assert len(splits.train) + len(splits.validation) == 120
  assert splits.validation
  assert all(text_datasets.is_validation_paragraph(r["completion"]) for r in splits.validation)
  assert not any(text_datasets.is_validation_paragraph(r["completion"]) for r in splits.train)


def test_unknown_text_source_rejected(tmp_path):
  with pytest.raises(DataSourceError, match="config.data.source must be one of"):
    text_datasets.load_text_splits("wikipedia", str(tmp_path))


# --- teacher cache ---------------------------------------------------------------


SEQ_LEN, TOP_K, ROWS = 6, 3, 5


def _spec(**changes):
  spec = teacher_cache.CacheSpec(teacher_sha256="t" * 64, tokenizer_sha256="k" * 64,
                                 vocab_size=100, top_k=TOP_K, temperature=2.0, seq_len=SEQ_LEN,
                                 packing=packing.PACKING, dataset_fingerprint="d" * 64,
                                 rows=ROWS)
  return dataclasses.replace(spec, **changes)


def _fake_top_k(indices):
  ids = np.stack([np.full((SEQ_LEN, TOP_K), i, np.int32) for i in indices])
  log_probs = -np.stack([np.full((SEQ_LEN, TOP_K), i + 0.5, np.float32) for i in indices])
  return ids, log_probs


def _write(directory, spec=None):
  spec = spec or _spec()
  batches = [(0, np.array([0, 1])), (2, np.array([2, 3])), (4, np.array([4]))]
  return teacher_cache.write_teacher_cache(str(directory), spec, iter(batches), _fake_top_k,
                                           rows_per_shard=2)


def test_cache_round_trip(tmp_path):
  source = _write(tmp_path)
  assert len(source) == ROWS
  assert len([n for n in os.listdir(tmp_path) if n.startswith("teacher_top_k")]) == 3
  reopened = teacher_cache.open_teacher_cache(str(tmp_path), _spec())
  for row in range(ROWS):
    record = reopened[row]
    np.testing.assert_array_equal(record["teacher_top_ids"], np.full((SEQ_LEN, TOP_K), row))
    np.testing.assert_array_equal(record["teacher_top_log_probs"],
                                  np.full((SEQ_LEN, TOP_K), -(row + 0.5), np.float32))


def test_cache_manifest_records_fields(tmp_path):
  _write(tmp_path)
  with open(tmp_path / "manifest.json", encoding="utf-8") as f:
    manifest = json.load(f)
  for field in teacher_cache.CHECKED_FIELDS:
    assert field in manifest
  assert manifest["bytes_per_token"] == TOP_K * 8


@pytest.mark.parametrize("field, value", [
    ("teacher_sha256", "u" * 64),
    ("tokenizer_sha256", "j" * 64),
    ("vocab_size", 99),
    ("top_k", 4),
    ("temperature", 1.0),
    ("seq_len", 7),
    ("packing", "other"),
    ("dataset_fingerprint", "e" * 64),
    ("rows", 6),
])
def test_cache_mismatch_rejected(tmp_path, field, value):
  _write(tmp_path)
  with pytest.raises(ConfigError, match=f"written with {field}="):
    teacher_cache.open_teacher_cache(str(tmp_path), _spec(**{field: value}))


def test_cache_without_manifest_is_incomplete(tmp_path):
  _write(tmp_path)
  os.remove(tmp_path / "manifest.json")
  assert teacher_cache.open_teacher_cache(str(tmp_path), _spec()) is None


def test_cache_missing_shard_rejected(tmp_path):
  _write(tmp_path)
  os.remove(tmp_path / "teacher_top_k.array_record-00001-of-00003")
  with pytest.raises(DataSourceError, match="shard .* is missing"):
    teacher_cache.open_teacher_cache(str(tmp_path), _spec())


def test_cache_corrupt_manifest_rejected(tmp_path):
  _write(tmp_path)
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(DataSourceError, match="manifest.json is unreadable"):
    teacher_cache.open_teacher_cache(str(tmp_path), _spec())


def test_packed_source_joins_cache(tmp_path):
  records = [{"prompt": "", "completion": "abcdefghij"[i:i + 4]} for i in range(ROWS)]
  packed = packing.pack_records(records, TOKENIZER, SEQ_LEN)
  assert len(packed) == ROWS
  source = packing.PackedSource(packed, "letters", teacher_cache=_write(tmp_path))
  row = source[3]
  assert set(row) == set(packing.FIELDS) | {"teacher_top_ids", "teacher_top_log_probs"}
  np.testing.assert_array_equal(row["teacher_top_ids"], np.full((SEQ_LEN, TOP_K), 3))
  with pytest.raises(DataSourceError, match="the teacher cache has 5 rows but the data has 4"):
    packing.PackedSource(packing.pack_records(records[:4], TOKENIZER, SEQ_LEN), "letters",
                         teacher_cache=_write(tmp_path / "other"))


def test_config_check_knows_every_text_source():
  from distill_jax.training import validation  # pylint: disable=g-import-not-at-top

  assert validation.TEXT_SOURCES == text_datasets.TEXT_SOURCES
