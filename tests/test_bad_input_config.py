"""Bad config values and flags: one documented line, exit code 2, nothing saved changed."""

import pytest

from bad_input_cases import CASES, check_case, documented_messages, is_config_case


def test_every_case_documented():
  documented = documented_messages()
  assert len(documented) >= 30
  assert sorted(documented) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if is_config_case(case)))
def test_bad_config_one_line(name, tiny_run, tfds_data_dir, gemma_gguf, tmp_path):
  check_case(name, tiny_run, tfds_data_dir, gemma_gguf, tmp_path)
