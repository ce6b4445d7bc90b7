#!/usr/bin/env bash
# One call on a GPU machine: build lk, check the GPU path, time it.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]
#
# Needs python with torch (CUDA) and a C++ compiler; the GPU machines we borrow have no
# network, so the build tools come from build/wheelhouse when pip cannot fetch them
# (`make gpu-wheelhouse` fills it on a machine with network). Runs, in order:
#   1. build lvllm._lk in place (the same CMake build as `make build`);
#   2. tests/lk on this host's CPU (every kernel ISA it has: often AVX-512/AMX here);
#   3. tests/gpu (torch only);
#   4. benchmarks/bench_gpu.py, results in OUT_DIR/bench_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-build/gpu-session}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
VENV=build/gpu-venv

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --no-index --find-links build/wheelhouse \
  -r requirements/build.txt 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet -r requirements/build.txt
"$VENV/bin/python" -m pip install --quiet --no-index --find-links build/wheelhouse pytest 2>/dev/null \
  || "$VENV/bin/python" -c "import pytest" 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet pytest

{
  echo "== host"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  grep -m1 "model name" /proc/cpuinfo; nproc
  grep -o -w -E "avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16" /proc/cpuinfo | sort | uniq -c
  "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/host.txt"

echo "== build"
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" setup.py build_ext --inplace 2>&1 | tail -5 | tee "$OUT_DIR/build.txt"
"$VENV/bin/python" -c "from lvllm import lk; print(lk.runtime_info())" | tee -a "$OUT_DIR/host.txt"

status=0
echo "== tests/lk"
"$VENV/bin/python" -m pytest tests/lk -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT_DIR/tests_lk.txt" || status=1
echo "== tests/gpu"
"$VENV/bin/python" -m pytest tests/gpu -v -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT_DIR/tests_gpu.txt" || status=1
echo "== bench_gpu"
"$VENV/bin/python" benchmarks/bench_gpu.py --json "$OUT_DIR/bench_gpu.json" 2>&1 | tee "$OUT_DIR/bench_gpu.txt" || status=1
exit $status
