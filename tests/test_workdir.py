"""Workdir set-up: config recorded once, resumable keys allowed, other changes rejected."""

import json

import pytest

from distill_jax.training import workdir as workdir_lib

CONFIG = {"seed": 0, "distill": {"alpha": 0.9, "temperature": 1.0}, "log_every_steps": 100,
          "checkpoint": {"every_steps": 500}, "student": {"model": {"widths": [8, 16]}}}


def test_fresh_workdir_records_config(tmp_path):
  workdir = workdir_lib.prepare_workdir(str(tmp_path / "run"), json.dumps(CONFIG))

  with open(f"{workdir}/config.json") as f:
    assert json.load(f) == CONFIG


def test_resumable_keys_may_change(tmp_path):
  workdir_lib.prepare_workdir(str(tmp_path), json.dumps(CONFIG))
  changed = json.loads(json.dumps(CONFIG))
  changed["log_every_steps"] = 10
  changed["checkpoint"]["every_steps"] = 50

  workdir_lib.prepare_workdir(str(tmp_path), json.dumps(changed))

  with open(tmp_path / "config.json") as f:
    assert json.load(f)["log_every_steps"] == 10


@pytest.mark.parametrize("path,value", [
    (("distill", "alpha"), 0.5),
    (("seed",), 1),
    (("student", "model", "widths"), [8, 32]),
])
def test_training_key_change_rejected(tmp_path, path, value):
  workdir_lib.prepare_workdir(str(tmp_path), json.dumps(CONFIG))
  changed = json.loads(json.dumps(CONFIG))
  section = changed
  for key in path[:-1]:
    section = section[key]
  section[path[-1]] = value

  with pytest.raises(workdir_lib.WorkdirError, match="different config") as raised:
    workdir_lib.prepare_workdir(str(tmp_path), json.dumps(changed))

  assert ".".join(path) in str(raised.value)
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == CONFIG


def test_config_differences_lists_added_keys():
  current = json.loads(json.dumps(CONFIG))
  current["distill"]["beta"] = 0.5

  assert workdir_lib.config_differences(CONFIG, current) == ["distill.beta: '<unset>' -> 0.5"]
