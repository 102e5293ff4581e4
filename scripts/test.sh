#!/usr/bin/env bash
# Install distill_jax with its test extras into .venv, then run the test suite
# on CPU with 8 simulated devices (tests/conftest.py sets them up).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS=test bash scripts/install.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
