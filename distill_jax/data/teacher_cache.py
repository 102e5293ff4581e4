"""An offline cache of the teacher's top-k next-token distributions.

Running a large teacher costs as much as the rest of a distillation step, and
its outputs do not change while the student trains. `write_teacher_cache`
runs the teacher once over the packed training rows and stores, per
position, the ids of its `k` most likely next tokens and their
log-probabilities at the distillation temperature. Rows go to ArrayRecord
shards, one record per packed row: `k` int32 ids then `k` float32
log-probabilities for each of `seq_len` positions.

`manifest.json` records what the cache depends on. `open_teacher_cache`
compares it with the current run and raises `ConfigError` naming the first
field that differs, so a cache is never used with another teacher, tokenizer,
temperature, k, sequence length, packing or dataset. The manifest is written
last, so a cache without one is incomplete and is rebuilt.
"""

from collections.abc import Callable, Iterator
import dataclasses
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import numpy as np

from distill_jax.errors import ConfigError, DataSourceError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Fields compared between a cache's manifest and the current run, in order.
CHECKED_FIELDS = ("format_version", "teacher_sha256", "tokenizer_sha256", "vocab_size", "top_k",
                  "temperature", "seq_len", "packing", "dataset_fingerprint", "rows")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """What a teacher cache depends on; its fields are those of the manifest."""

  teacher_sha256: str
  tokenizer_sha256: str
  vocab_size: int
  top_k: int
  temperature: float
  seq_len: int
  packing: str
  dataset_fingerprint: str
  rows: int
  format_version: int = FORMAT_VERSION

  @property
  def bytes_per_token(self) -> int:
    return self.top_k * (4 + 4)


def file_sha256(path: str, block_size: int = 1 << 20) -> str:
  """Return the sha256 hex digest of a file's contents."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(block_size), b""):
      digest.update(block)
  return digest.hexdigest()


def encode_row(ids: np.ndarray, log_probs: np.ndarray) -> bytes:
  """Serialize one row's `[seq_len, k]` ids and log-probabilities."""
  return (np.ascontiguousarray(ids, np.int32).tobytes()
          + np.ascontiguousarray(log_probs, np.float32).tobytes())


def decode_row(record: bytes, seq_len: int, k: int) -> dict[str, np.ndarray]:
  """Parse a record written by `encode_row` into `teacher_top_ids` and `teacher_top_log_probs`."""
  expected = seq_len * k * 8
  if len(record) != expected:
    raise DataSourceError(f"a teacher cache record has {len(record)} bytes, expected {expected}; "
                          f"the cache is corrupt, delete it to rebuild")
  split = seq_len * k * 4
  return {
      "teacher_top_ids": np.frombuffer(record[:split], np.int32).reshape(seq_len, k),
      "teacher_top_log_probs": np.frombuffer(record[split:], np.float32).reshape(seq_len, k),
  }


def read_manifest(directory: str) -> dict[str, Any] | None:
  """Return the manifest of the cache in `directory`, or None when it has none."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise DataSourceError(f"{path} is unreadable ({error}); delete the cache directory "
                          f"{directory} to rebuild it") from None


def check_manifest(manifest: dict[str, Any], spec: CacheSpec, directory: str) -> None:
  """Raise `ConfigError` naming the first manifest field that differs from `spec`."""
  current = dataclasses.asdict(spec)
  for field in CHECKED_FIELDS:
    cached = manifest.get(field)
    if cached != current[field]:
      raise ConfigError(
          f"the teacher cache in {directory} was written with {field}={cached!r} but this run "
          f"has {field}={current[field]!r}; point config.teacher_cache.dir at another "
          f"directory, or delete this one to rebuild it")


class TeacherCacheSource:
  """Random-access rows of a complete teacher cache."""

  def __init__(self, directory: str, spec: CacheSpec, shard_paths: list[str]):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

    self.directory = directory
    self.spec = spec
    self._source = array_record_data_source.ArrayRecordDataSource(shard_paths)
    if len(self._source) != spec.rows:
      raise DataSourceError(f"the teacher cache in {directory} has {len(self._source)} rows but "
                            f"its manifest lists {spec.rows}; delete it to rebuild")

  def __len__(self) -> int:
    return self.spec.rows

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return decode_row(self._source[index], self.spec.seq_len, self.spec.top_k)

  def __repr__(self) -> str:
    return f"TeacherCacheSource({self.directory}, rows={self.spec.rows})"


def open_teacher_cache(directory: str, spec: CacheSpec) -> TeacherCacheSource | None:
  """Return the cache in `directory` if it is complete and matches `spec`, else None.

  Raises:
    ConfigError: the cache is complete but was written for another run.
  """
  manifest = read_manifest(directory)
  if manifest is None:
    return None
  check_manifest(manifest, spec, directory)
  shard_paths = [os.path.join(directory, name) for name in manifest["shards"]]
  missing = [path for path in shard_paths if not os.path.exists(path)]
  if missing:
    raise DataSourceError(f"the teacher cache shard {missing[0]} is missing; delete "
                          f"{directory} to rebuild the cache")
  return TeacherCacheSource(directory, spec, shard_paths)


def write_teacher_cache(directory: str, spec: CacheSpec,
                        batches: Iterator[tuple[int, np.ndarray]],
                        compute_top_k: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                        *, rows_per_shard: int = 1024) -> TeacherCacheSource:
  """Run the teacher over all rows and write the cache, then its manifest.

  Args:
    directory: the cache directory; shards of an incomplete earlier attempt
      are overwritten.
    spec: what the cache depends on.
    batches: yields (first row index, a `[batch]` array of row indices) in
      order, covering rows 0 to `spec.rows - 1` once.
    compute_top_k: maps row indices to the teacher's `[batch, seq_len, k]`
      top-k ids and log-probabilities.
    rows_per_shard: rows per ArrayRecord file.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)

  num_shards = max(1, -(-spec.rows // rows_per_shard))
  shard_names = [f"teacher_top_k.array_record-{i:05d}-of-{num_shards:05d}"
                 for i in range(num_shards)]
  writer, writer_shard, written = None, -1, 0
  started = last_log = time.monotonic()
  try:
    for first_row, row_indices in batches:
      ids, log_probs = compute_top_k(row_indices)
      for offset in range(len(row_indices)):
        row = first_row + offset
        if row != written:
          raise ValueError(f"teacher cache rows out of order: got row {row}, expected {written}")
        shard = row // rows_per_shard
        if shard != writer_shard:
          if writer is not None:
            writer.close()
          writer = array_record_module.ArrayRecordWriter(
              os.path.join(directory, shard_names[shard]), "group_size:1")
          writer_shard = shard
        writer.write(encode_row(ids[offset], log_probs[offset]))
        written += 1

      now = time.monotonic()
      if now - last_log > 30 or written == spec.rows:
        rate = written / max(now - started, 1e-9)
        logging.info("teacher cache: %d/%d rows, %.1f rows/s, ETA %.0f s", written, spec.rows,
                     rate, (spec.rows - written) / max(rate, 1e-9))
        last_log = now
  finally:
    if writer is not None:
      writer.close()

  if written != spec.rows:
    raise ValueError(f"wrote {written} teacher cache rows, expected {spec.rows}")

  manifest = {**dataclasses.asdict(spec), "shards": shard_names,
              "bytes_per_token": spec.bytes_per_token,
              "seconds": round(time.monotonic() - started, 1)}
  temporary = manifest_path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(temporary, manifest_path)
  logging.info("wrote the teacher cache of %d rows to %s (%d bytes per token)", spec.rows,
               directory, spec.bytes_per_token)
  return TeacherCacheSource(directory, spec, [os.path.join(directory, n) for n in shard_names])
