#!/usr/bin/env bash
# The GPU host's side of tools/airgap, in a copy of this repository, with the host's python
# (the one with torch; PYTHON, default python3). The lease plan `wheelhouse.py build` prints
# gives the calls in order:
#
#   bash tools/airgap/host.sh receive FOLDER   # each transfer: check its part and set it aside;
#                                              # the first also starts, in the background, the
#                                              # unpacking and installing of the parts as they
#                                              # arrive, and builds lk
#   bash tools/airgap/host.sh finish OUT_DIR   # last: wait for those, install lvllm into the
#                                              # venv, run tests/gpu and the e2e checks (--lean)
#   bash tools/airgap/host.sh whole-model OUT_DIR   # instead of finish: install lvllm, then
#                                              # benchmarks/gpu_whole_model.py (docs/gpu-path.md)
#
# finish writes into OUT_DIR whatever happens: finish.txt (its console), summary.md (the e2e
# checks') and results.tar.gz (every log); it exits non-zero when a step failed. E2E_ONLY=names
# (comma-separated) runs only those servers of the lean checks, to rerun a failed one in a lease.
# WHOLE_MODEL=1 on the first receive also starts building the whole-model benchmark's checkpoint
# while the parts arrive; whole-model gives the benchmark WHOLE_MODEL_SECONDS (default 480) and
# writes finish.txt beside its summary.md, results.json and logs.tar.gz; run again on the same
# machine, it goes on with the contenders not yet run.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
AIRGAP=build/airgap
WHEELHOUSE=tools/airgap/wheelhouse.py
WHOLE_MODEL_SCRIPT=benchmarks/gpu_whole_model.py
WHOLE_MODEL_WORK=build/whole-model
mkdir -p "$AIRGAP"

background() {  # NAME COMMAND...: a new session, so it outlives this call
  local name=$1; shift
  setsid nohup "$@" >"$AIRGAP/$name.log" 2>&1 </dev/null &
}

start_background_work() {
  [ -e "$AIRGAP/started" ] && return
  date +%s >"$AIRGAP/started"
  "$PYTHON" -m pip list --format=freeze >"$AIRGAP/host-pip-list.txt" 2>/dev/null
  background follow "$PYTHON" "$WHEELHOUSE" follow --python "$PYTHON"
  # The checkpoint needs only torch, safetensors and tokenizers, which the host's python has.
  [ "${WHOLE_MODEL:-0}" = 1 ] && background checkpoint "$PYTHON" "$WHOLE_MODEL_SCRIPT" "$WHOLE_MODEL_WORK" --build-only
  # lk in the foreground: each call's copy of the working tree would pull the sources from
  # under a build in the background (seen: headers missing mid-build).
  if "$PYTHON" setup.py build_ext --inplace >"$AIRGAP/lk_build.log" 2>&1; then echo "lk built"
  else echo "lk build failed (finish builds it again):"; tail -5 "$AIRGAP/lk_build.log"; fi
}

receive() {
  local folder=${1:?usage: host.sh receive FOLDER}
  echo "$(date +%T) receive $folder"
  "$PYTHON" "$WHEELHOUSE" receive "$folder" || exit 1
  start_background_work
  [ -e "$AIRGAP/follow.json" ] && "$PYTHON" -c "import json; s = json.load(open('$AIRGAP/follow.json')); \
print('unpacking:', s['status'], len(s['wheels']), 'wheels so far,', s['seconds'], 's', s.get('error', ''))"
}

step() {  # NAME COMMAND...: run, log, remember a failure
  echo "== $1 ($(date +%T))"
  local name=$1; shift
  "$@" 2>&1 | tee "$RESULTS/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! $name failed ($rc)"; FAILED="$FAILED $name"; }
  return "$rc"
}

versions() {
  "$VENV_PY" - <<'EOF'
import torch, vllm, lvllm._lk as lk
print("vllm", vllm.__version__, "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| lk ISA", lk.best_isa())
EOF
}

install() {  # wait for the parts' wheels, install lvllm into the venv, print the versions
  step unpacked "$PYTHON" "$WHEELHOUSE" wait --wait "${UNPACK_WAIT:-300}" \
    && step lvllm_install env LVLLM_TARGET_DEVICE=cuda "$VENV_PY" -m pip install --quiet --no-deps --no-index \
      --no-build-isolation -e . \
    && step versions versions
}

prepare() {  # OUT_DIR
  OUT=$1
  RESULTS=$AIRGAP/results
  VENV_PY=$PWD/$AIRGAP/venv/bin/python
  FAILED=""
  # FlashInfer is not shipped: vLLM 0.32's sampler imports it unless told not to (seen failing).
  export VLLM_USE_FLASHINFER_SAMPLER=0
  mkdir -p "$OUT" "$RESULTS"
}

whole_model() {
  prepare "${1:?usage: host.sh whole-model OUT_DIR}"
  {
    # From /: in the repository's root, lvllm imports from the working tree, installed or not.
    [ -x "$VENV_PY" ] && (cd / && "$VENV_PY" -c "import vllm, lvllm") 2>/dev/null || install
    step whole_model "$VENV_PY" "$WHOLE_MODEL_SCRIPT" "$WHOLE_MODEL_WORK" --out "$OUT" \
      --seconds "${WHOLE_MODEL_SECONDS:-480}"
    echo "failed:${FAILED:- nothing}"
  } 2>&1 | tee "$OUT/finish.txt"
  grep -q "^failed: nothing" "$OUT/finish.txt"
}

finish() {
  prepare "${1:?usage: host.sh finish OUT_DIR}"
  {
    install
    # tests/gpu with vLLM's torch (the venv's), then the e2e checks even if some failed.
    step tests_gpu timeout "${GPU_TESTS_TIMEOUT:-180}" "$VENV_PY" -m pytest tests/gpu -q -p no:cacheprovider
    step e2e timeout "${E2E_TIMEOUT:-450}" "$VENV_PY" tools/airgap/e2e_checks.py "$RESULTS/e2e" --device cuda --lean \
      ${E2E_ONLY:+--only "$E2E_ONLY"}
    echo "failed:${FAILED:- nothing}"
  } 2>&1 | tee "$OUT/finish.txt"
  cp "$RESULTS/e2e/summary.md" "$OUT/summary.md" 2>/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$AIRGAP" results follow.json follow.log lk_build.log \
    host-pip-list.txt started 2>/dev/null
  grep -q "^failed: nothing" "$OUT/finish.txt"
}

case "${1:-}" in
  receive) receive "${2:-}" ;;
  finish) finish "${2:-}" ;;
  whole-model) whole_model "${2:-}" ;;
  *) echo "usage: tools/airgap/host.sh receive FOLDER | finish OUT_DIR | whole-model OUT_DIR" >&2; exit 2 ;;
esac
