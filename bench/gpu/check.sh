#!/usr/bin/env bash
# The prepared device check: compiled-kernel tests, kernel benchmarks, the pipeline and the
# generation benchmarks on one GPU in under 8 minutes, every result in one folder (at most 8 files).
#
#   bench/gpu/check.sh                     # GPU: results in bench/gpu/results/<UTC stamp>_gpu/
#   bench/gpu/check.sh --out "$OUT/check"  # into a given (new or empty) folder
#   bench/gpu/check.sh --tiny              # CPU rehearsal of the same code path, toy sizes (~1 min of CPU)
#
# Options: bench/gpu/check.py --help. Run from any directory; python3 is the interpreter that holds
# torch (override with PYTHON=...). The checkout must be importable as cca_fast
# (pip install --no-deps --no-build-isolation -e .).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/check.py" "$@"
