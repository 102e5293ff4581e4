#!/usr/bin/env bash
# Time the default Fashion-MNIST recipe end to end in a fresh workdir and print
# its report. Usage: bash scripts/benchmark_fashion_mnist_kd.sh [WORKDIR] [--config.KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR="${1:-workdirs/benchmark_fashion_mnist_kd}"
shift || true
if [ -e "$WORKDIR" ]; then
  echo "error: $WORKDIR exists; pass a new workdir so that the run starts from scratch" >&2
  exit 2
fi

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -m)," \
     "$(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.default_backend())')"
start=$(date +%s)
.venv/bin/distill-jax --config=configs/fashion_mnist_kd.py --workdir="$WORKDIR" "$@"
end=$(date +%s)
echo "wall time: $((end - start)) s"
cat "$WORKDIR/report.md"
