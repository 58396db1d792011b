#!/usr/bin/env bash
# The GPU check: one command for a machine with one CUDA GPU and no package registry (under 8 minutes
# on an H200). It uses the machine's own CUDA PyTorch and installs the few packages caduceus-dist needs
# beside it from wheels carried in .whl/ (fetch them first, on a machine that reaches PyPI):
#
#   bash benchmarks/gpu_check.sh --fetch-wheels     # here: .whl/ for CPython 3.12 on x86-64 Linux
#   bash benchmarks/gpu_check.sh                    # there, from the checkout's root
#
# It runs benchmarks/gpu_check.py (bf16 training steps of ps_1k at L 1,024 and ps_131k at L 131,072
# with the mamba-ssm kernels if they import, else the PyTorch scan on the GPU; tokens/s, MFU, peak
# memory; a checkpoint save and a bitwise restore), then the test suite's `gpu` tests, then the
# inference memory per position (benchmarks/bench_inference.py). Everything is written to $OUT (or
# ./gpu_check_out): gpu_check.json, gpu_check.log, gpu_tests.log, inference_memory.log. Exit 0 when the
# first two parts pass. Record the figures in benchmarks/RESULTS.md ("GPU").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}

if [ "${1:-}" = --fetch-wheels ]; then
  # The packages the GPU path imports that the GPU image lacks; the image has torch, numpy, PyYAML,
  # tensorboard, pytest and transformers. --no-deps: each dependency is named here.
  mkdir -p "$WHEELS"
  for requirement in omegaconf==2.4.0 zstandard==0.25.0; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$requirement" || exit 2
  done
  ls -l "$WHEELS"
  exit 0
fi

OUT_DIR=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT_DIR"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/caduceus-site \
    "$WHEELS"/*.whl || { echo "gpu_check: cannot install the wheels in $WHEELS"; exit 2; }
  export PYTHONPATH=/tmp/caduceus-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT_DIR/gpu.txt"

timeout 420 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
measured=${PIPESTATUS[0]}
timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_model_scan.py tests/test_data_loader.py 2>&1 \
  | tee "$OUT_DIR/gpu_tests.log"
tested=${PIPESTATUS[0]}
# inference memory per position on the GPU (docs/inference.md §3 states a figure computed from the CPU's)
timeout 150 "$PY" benchmarks/bench_inference.py --only memory --device cuda 2>&1 | tee "$OUT_DIR/inference_memory.log"
echo "gpu_check: measurements exit $measured, gpu tests exit $tested (results in $OUT_DIR)"
[ "$measured" = 0 ] && [ "$tested" = 0 ]
