#!/usr/bin/env bash
# One call on a GPU machine: build lk, check the GPU path, time it.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]
#
# Needs python with torch (CUDA) and a C++ compiler; the GPU machines we borrow have no
# network, so the build tools come from build/wheelhouse when pip cannot fetch them
# (`make gpu-wheelhouse` fills it on a machine with network). Runs, in order:
#   1. build lvllm._lk in place (the same CMake build as `make build`);
#   2. tests/gpu (torch only);
#   3. benchmarks/bench_gpu.py, results in OUT_DIR/bench_gpu.json;
#   4. tests/lk on this host's CPU (every kernel ISA it has: often AVX-512/AMX here);
#   5. benchmarks/bench_kernels.py for the integer formats at each AVX-512 level the host
#      has (AVX512 against AVX512_VNNI: what vpdpwssd gains), in OUT_DIR/kernels_<isa>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-build/gpu-session}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
PY=$PYTHON

# The GPU images we borrow already hold these tools (any recent version builds lk), in the
# python that has torch, itself often a venv. Only where some are missing is a venv made
# over it, filled from build/wheelhouse first since those machines have no network.
TOOLS="import cmake, ninja, pybind11, setuptools, pytest, torch"
if ! "$PY" -c "$TOOLS" 2>/dev/null; then
  VENV=build/gpu-venv
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install --quiet --no-index --find-links build/wheelhouse -r requirements/build.txt pytest \
    || "$PY" -m pip install --quiet -r requirements/build.txt pytest
fi
# cmake and ninja as the build calls them: the scripts beside that python.
PATH="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"

{
  echo "== host"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  grep -m1 "model name" /proc/cpuinfo; nproc
  grep -o -w -E "avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16" /proc/cpuinfo | sort | uniq -c
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT_DIR/host.txt"

echo "== build"
"$PY" setup.py build_ext --inplace 2>&1 | tail -5 | tee "$OUT_DIR/build.txt"
"$PY" -c "from lvllm import lk; print(lk.runtime_info())" | tee -a "$OUT_DIR/host.txt"

# GPU stages first: they are what only this machine can show. Each stage has its own time
# limit so one hang does not eat the whole borrowed session.
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # lvllm from this checkout, not installed here
status=0
echo "== tests/gpu"
timeout "${GPU_TESTS_TIMEOUT:-240}" "$PY" -m pytest tests/gpu -v -p no:cacheprovider 2>&1 \
  | tee "$OUT_DIR/tests_gpu.txt" || status=1
echo "== bench_gpu"
timeout "${GPU_BENCH_TIMEOUT:-400}" "$PY" benchmarks/bench_gpu.py --json "$OUT_DIR/bench_gpu.json" 2>&1 \
  | tee "$OUT_DIR/bench_gpu.txt" || status=1
echo "== tests/lk"
timeout "${LK_TESTS_TIMEOUT:-300}" "$PY" -m pytest tests/lk -q -p no:cacheprovider 2>&1 \
  | tail -40 | tee "$OUT_DIR/tests_lk.txt" || status=1
echo "== bench_kernels"
for isa in AVX512 AVX512_VNNI; do
  "$PY" -c "from lvllm import _lk, envs; import sys; n = envs.ISA_NAMES; sys.exit(n.index('$isa') > n.index(_lk.best_isa()))" \
    || continue
  timeout "${KERNELS_BENCH_TIMEOUT:-120}" "$PY" benchmarks/bench_kernels.py --isa "$isa" --formats int8,int4 \
    --rows 1,3,12 --seconds 0.2 2>&1 | tee "$OUT_DIR/kernels_$isa.txt" || status=1
done
exit $status
