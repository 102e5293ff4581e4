"""Bad files, data and environments: one documented line, exit code 2, nothing saved changed."""

import pytest

from bad_input_cases import CASES, check_case, is_config_case


@pytest.mark.parametrize("name",
                         sorted(n for n, case in CASES.items() if not is_config_case(case)))
def test_bad_input_one_line(name, tiny_run, tfds_data_dir, gemma_gguf, tmp_path):
  check_case(name, tiny_run, tfds_data_dir, gemma_gguf, tmp_path)
