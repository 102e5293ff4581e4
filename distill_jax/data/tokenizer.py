"""SentencePiece tokenizers rebuilt from the vocabulary stored in a GGUF file.

A GGUF file written by llama.cpp keeps the SentencePiece vocabulary as three
arrays (`tokenizer.ggml.tokens`, `.scores`, `.token_type`) plus the special
token ids. `tokenizer_from_gguf` turns them back into a SentencePiece BPE model
with byte fallback, which is what Gemma's `tokenizer.model` is. Two details of
the stored vocabulary need care:

- Gemma's tokens made only of spaces (ids 138 to 167 in Gemma 3) are stored
  with plain spaces, where SentencePiece expects its space marker U+2581.
- The unknown token is stored as a control token; SentencePiece needs exactly
  one piece of type UNKNOWN.
"""

import dataclasses
import hashlib

import numpy as np

from distill_jax.errors import CheckpointFileError

SPACE_MARKER = "\u2581"

# GGUF token types, which use SentencePiece's numbering.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A SentencePiece processor with the special ids of its model.

  Attributes:
    processor: the `sentencepiece.SentencePieceProcessor`.
    vocab_size: number of pieces.
    bos_id, eos_id, pad_id: special token ids.
    add_bos: whether the model expects a BOS token before each sequence.
    fingerprint: sha256 of the serialized SentencePiece model; two tokenizers
      with the same fingerprint split every text the same way.
  """

  processor: object
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  add_bos: bool
  fingerprint: str

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Split `text` into token ids, with BOS first when the model expects it."""
    ids = list(self.processor.encode(text))
    if self.add_bos if add_bos is None else add_bos:
      ids.insert(0, self.bos_id)
    return ids

  def decode(self, ids) -> str:
    return self.processor.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self.processor.id_to_piece(int(token_id))


def _string_array(reader, key: str, path: str) -> list[str]:
  field = reader.fields.get(key)
  if field is None:
    raise CheckpointFileError(f"{path}: metadata field {key!r} is missing; the file has "
                              f"no SentencePiece vocabulary")
  return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _number_array(reader, key: str, path: str) -> np.ndarray:
  field = reader.fields.get(key)
  if field is None:
    raise CheckpointFileError(f"{path}: metadata field {key!r} is missing; the file has "
                              f"no SentencePiece vocabulary")
  return np.array([field.parts[i][0] for i in field.data])


def sentencepiece_proto_from_gguf(reader, path: str):
  """Build a SentencePiece `ModelProto` from the tokenizer metadata of a GGUF reader."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  model_kind = reader.fields.get("tokenizer.ggml.model")
  model_kind = None if model_kind is None else model_kind.contents()
  if model_kind != "llama":
    raise CheckpointFileError(
        f"{path}: tokenizer.ggml.model is {model_kind!r}, expected 'llama' (SentencePiece); "
        f"this tokenizer cannot be rebuilt")

  pieces = _string_array(reader, "tokenizer.ggml.tokens", path)
  scores = _number_array(reader, "tokenizer.ggml.scores", path)
  types = _number_array(reader, "tokenizer.ggml.token_type", path)
  if not len(pieces) == len(scores) == len(types):
    raise CheckpointFileError(
        f"{path}: tokenizer arrays differ in length (tokens {len(pieces)}, scores "
        f"{len(scores)}, token types {len(types)})")

  def special_id(name: str) -> int:
    field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
    if field is None:
      raise CheckpointFileError(f"{path}: metadata field 'tokenizer.ggml.{name}_token_id' "
                                f"is missing")
    return int(field.contents())

  unk_id, bos_id, eos_id, pad_id = (special_id(name) for name in ("unknown", "bos", "eos",
                                                                  "padding"))
  add_space_prefix = reader.fields.get("tokenizer.ggml.add_space_prefix")
  add_dummy_prefix = bool(add_space_prefix.contents()) if add_space_prefix else False

  proto = sentencepiece_model_pb2.ModelProto()
  proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  proto.trainer_spec.vocab_size = len(pieces)
  proto.trainer_spec.byte_fallback = bool((types == _BYTE).any())
  proto.trainer_spec.unk_id = unk_id
  proto.trainer_spec.bos_id = bos_id
  proto.trainer_spec.eos_id = eos_id
  proto.trainer_spec.pad_id = pad_id
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
  proto.normalizer_spec.remove_extra_whitespaces = False
  proto.normalizer_spec.escape_whitespaces = True

  for token_id, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
    kind = int(kind)
    if token_id == unk_id:
      kind = _UNKNOWN
    elif kind == _UNKNOWN:
      kind = _CONTROL
    if kind in (_NORMAL, _USER_DEFINED) and piece and not piece.strip(" "):
      piece = piece.replace(" ", SPACE_MARKER)
    entry = proto.pieces.add()
    entry.piece = piece
    entry.score = float(score)
    entry.type = kind
  return proto, dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def tokenizer_from_gguf(path: str) -> Tokenizer:
  """Rebuild the SentencePiece tokenizer stored in the GGUF file at `path`."""
  import sentencepiece  # pylint: disable=g-import-not-at-top

  from distill_jax.checkpoints.gemma3_import import open_gguf  # pylint: disable=g-import-not-at-top

  reader = open_gguf(path)
  proto, special = sentencepiece_proto_from_gguf(reader, path)
  serialized = proto.SerializeToString()
  processor = sentencepiece.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(serialized)
  except RuntimeError as error:
    raise CheckpointFileError(f"{path}: the stored vocabulary is not a valid SentencePiece "
                              f"model ({error})") from None

  add_bos_field = reader.fields.get("tokenizer.ggml.add_bos_token")
  add_bos = bool(add_bos_field.contents()) if add_bos_field else True
  return Tokenizer(processor=processor, vocab_size=len(proto.pieces), add_bos=add_bos,
                   fingerprint=hashlib.sha256(serialized).hexdigest(), **special)
