#!/usr/bin/env bash
# What the offline GPU check (scripts/gpu_check.py) installs on a machine with no package index, built here
# where there is one: exitbench's own wheel and the pure-Python dependencies the GPU image lacks (ptflops,
# submitit and its cloudpickle), all py3-none-any, into dist/wheelhouse (ignored by git; carry it along).
# Usage: scripts/build_wheelhouse.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist/wheelhouse}"
rm -rf "$out"
mkdir -p "$out"
python3 -m pip download --quiet --only-binary=:all: --no-deps -d "$out" ptflops submitit cloudpickle
python3 -m pip wheel --quiet --no-deps -w "$out" .
ls -1 "$out"
echo "wheelhouse: $(du -sh "$out" | cut -f1) in $out"
