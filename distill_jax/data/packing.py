"""Tokenize prompt and completion records and pack them into fixed-length rows.

Each record becomes `[bos] + prompt + completion + [eos]`. In a row of
`seq_len` positions, position `t` has input token `tokens[t]` and the next
token `targets[t]`. `loss_mask[t]` is True when that target belongs to the
completion (or the EOS after it), so prompt and padding never enter a loss.
Records are packed greedily in order: a record starts a new row when it does
not fit in the space left. `segment_ids` number the records of a row from 1
(0 is padding) and `positions` restart at 0 in each record, which is what
`Gemma3Decoder` needs to keep packed records from attending to each other.

A plain-text record longer than a row is split into row-sized pieces. A
prompt and completion record that does not fit in one row is dropped and
counted, because cutting it would separate a question from its answer.
"""

from collections.abc import Sequence
import dataclasses
import hashlib

from absl import logging
import numpy as np

from distill_jax.errors import ConfigError, DataSourceError

PACKING = "greedy-in-order-v1"
FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class PackedTokens:
  """Packed rows, each field an array `[rows, seq_len]`.

  Attributes:
    tokens: int32 input token ids.
    targets: int32 next-token ids.
    segment_ids: int32 record number within the row, 0 for padding.
    positions: int32 position within the record.
    loss_mask: bool, True where `targets` is a completion token.
    dropped: records dropped because they do not fit in one row.
  """

  tokens: np.ndarray
  targets: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  loss_mask: np.ndarray
  dropped: int = 0

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1]

  def row(self, index: int) -> dict[str, np.ndarray]:
    return {name: getattr(self, name)[index] for name in FIELDS}

  def fingerprint(self) -> str:
    """Return the sha256 of every field's bytes: equal fingerprints mean equal rows."""
    digest = hashlib.sha256()
    for name in FIELDS:
      array = np.ascontiguousarray(getattr(self, name))
      digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
      digest.update(array.tobytes())
    return digest.hexdigest()

  def target_tokens(self) -> int:
    return int(self.loss_mask.sum())


def _record_pieces(prompt_ids: list[int], completion_ids: list[int], seq_len: int
                   ) -> list[tuple[list[int], int]] | None:
  """Split one tokenized record into pieces of at most `seq_len + 1` ids.

  Returns (ids, number of leading ids whose next token is not a target) per
  piece, or None when a record with a prompt does not fit in one row.
  """
  ids = prompt_ids + completion_ids
  prompt_targets = len(prompt_ids) - 1
  if len(ids) <= seq_len + 1:
    return [(ids, prompt_targets)]
  if len(prompt_ids) > 1:
    return None
  # Plain text: overlapping by one id so that every target is predicted once.
  return [(ids[start:start + seq_len + 1], prompt_targets if start == 0 else 0)
          for start in range(0, len(ids) - 1, seq_len)]


def pack_records(records: Sequence[dict[str, str]], tokenizer, seq_len: int, *,
                 max_rows: int | None = None) -> PackedTokens:
  """Tokenize `records` and pack them into rows of `seq_len` positions.

  Args:
    records: dicts with `prompt` and `completion` strings.
    tokenizer: a `distill_jax.data.tokenizer.Tokenizer`.
    seq_len: positions per row.
    max_rows: stop after this many rows, or None for all records.

  Raises:
    ConfigError: `seq_len` is below 2.
    DataSourceError: no record fits in a row.
  """
  if seq_len < 2:
    raise ConfigError(f"config.data.seq_len must be >= 2, got {seq_len}")

  rows = {name: [] for name in FIELDS}
  current = {name: [] for name in FIELDS}
  segment = 0
  dropped = 0

  def flush():
    nonlocal segment
    pad = seq_len - len(current["tokens"])
    rows["tokens"].append(current["tokens"] + [tokenizer.pad_id] * pad)
    rows["targets"].append(current["targets"] + [tokenizer.pad_id] * pad)
    rows["segment_ids"].append(current["segment_ids"] + [0] * pad)
    rows["positions"].append(current["positions"] + [0] * pad)
    rows["loss_mask"].append(current["loss_mask"] + [False] * pad)
    for values in current.values():
      values.clear()
    segment = 0

  for record in records:
    if max_rows is not None and len(rows["tokens"]) >= max_rows:
      break
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(record["prompt"], add_bos=False)
    completion_ids = tokenizer.encode(record["completion"], add_bos=False) + [tokenizer.eos_id]
    pieces = _record_pieces(prompt_ids, completion_ids, seq_len)
    if pieces is None:
      dropped += 1
      continue

    for ids, prompt_targets in pieces:
      length = len(ids) - 1
      if len(current["tokens"]) + length > seq_len:
        flush()
      segment += 1
      current["tokens"].extend(ids[:-1])
      current["targets"].extend(ids[1:])
      current["segment_ids"].extend([segment] * length)
      current["positions"].extend(range(length))
      current["loss_mask"].extend([i >= prompt_targets for i in range(length)])
  if current["tokens"]:
    flush()
  if max_rows is not None:
    for values in rows.values():
      del values[max_rows:]

  if not rows["tokens"]:
    raise DataSourceError(f"no record fits in config.data.seq_len={seq_len} tokens "
                          f"({dropped} dropped); raise seq_len")
  if dropped:
    logging.warning("dropped %d of %d records longer than seq_len=%d tokens", dropped,
                    len(records), seq_len)

  dtypes = {"loss_mask": np.bool_}
  return PackedTokens(**{name: np.asarray(values, dtypes.get(name, np.int32))
                         for name, values in rows.items()}, dropped=dropped)


class PackedSource:
  """A random-access source of packed rows, optionally joined with cached teacher rows.

  Attributes:
    packed: the rows.
    teacher_cache: a random-access source with the same number of rows whose
      records are dicts of teacher arrays, or None.
    name: description used in `repr`, which grain compares on restore.
  """

  def __init__(self, packed: PackedTokens, name: str, teacher_cache=None):
    if teacher_cache is not None and len(teacher_cache) != len(packed):
      raise DataSourceError(f"the teacher cache has {len(teacher_cache)} rows but the data "
                            f"has {len(packed)}; rebuild the cache")
    self.packed = packed
    self.teacher_cache = teacher_cache
    self.name = name

  def __len__(self) -> int:
    return len(self.packed)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row = self.packed.row(index)
    if self.teacher_cache is not None:
      row.update(self.teacher_cache[index])
    return row

  def __repr__(self) -> str:
    cached = ", teacher_cache" if self.teacher_cache is not None else ""
    return f"PackedSource({self.name}, rows={len(self)}{cached})"
