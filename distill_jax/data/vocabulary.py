"""Checks that a teacher's and a student's vocabularies line up token for token."""

from absl import logging

from distill_jax.errors import ConfigError


def shared_vocab_size(*, teacher_rows: int, student_rows: int, teacher_tokenizer: str,
                      student_tokenizer: str, tokenizer_size: int) -> int:
  """Return the number of embedding rows both models use for the same tokens.

  Embedding tables are often padded past the tokenizer's last piece (to a
  multiple of 64 or 128, as in 151936 against 152064 rows). Rows past the
  tokenizer's size are never produced by it, so two tables that differ only
  there are compared on their shared first `min(teacher_rows, student_rows)`
  rows, with a warning.

  Args:
    teacher_rows: rows of the teacher's output embedding.
    student_rows: rows of the student's output embedding.
    teacher_tokenizer: fingerprint of the teacher's tokenizer.
    student_tokenizer: fingerprint of the student's tokenizer.
    tokenizer_size: number of pieces of the (shared) tokenizer.

  Raises:
    ConfigError: when the tokenizers differ, or when either table has fewer
      rows than the tokenizer has pieces.
  """
  if teacher_tokenizer != student_tokenizer:
    raise ConfigError(
        f"the teacher and student tokenizers differ (teacher {teacher_tokenizer[:16]}, "
        f"student {student_tokenizer[:16]}); token-level distillation needs one tokenizer")
  for name, rows in (("teacher", teacher_rows), ("student", student_rows)):
    if rows < tokenizer_size:
      raise ConfigError(
          f"the {name} embedding has {rows} rows but the tokenizer has {tokenizer_size} "
          f"pieces (teacher {teacher_rows}, student {student_rows} rows); set the {name}'s "
          f"vocab_size to at least {tokenizer_size}")

  shared = min(teacher_rows, student_rows)
  if teacher_rows != student_rows:
    logging.warning(
        "teacher and student vocabularies differ only in padding rows (teacher %d, student "
        "%d, tokenizer %d pieces); comparing them on the first %d rows", teacher_rows,
        student_rows, tokenizer_size, shared)
  return shared
