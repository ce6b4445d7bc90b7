#!/usr/bin/env bash
# On a GPU host without network, in a copy of this repository, once every part of the
# wheelhouse is in build/airgap/parts (tools/airgap/wheelhouse.py receive after each transfer):
# assemble it, install vLLM's CUDA build into build/airgap/venv over the host's python (whose
# torch and CUDA libraries stay visible), install lvllm in it (building lk), and check that
# vLLM, torch and lk load and that tests/gpu pass, then run the end-to-end checks
# (tools/airgap/e2e_checks.py: `vllm serve` lk on against lk off, summary in OUT_DIR/e2e).
# Results go to OUT_DIR; a failure of tests/gpu or of a check still lets the checks write
# their summary, and the script then exits non-zero.
#
#   bash tools/airgap/host.sh OUT_DIR [PYTHON]       # PYTHON: the host's, default python3
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: tools/airgap/host.sh OUT_DIR [PYTHON]}
PYTHON=${2:-python3}
mkdir -p "$OUT"
WHEELHOUSE=tools/airgap/wheelhouse.py
VENV_PY=build/airgap/venv/bin/python

"$PYTHON" "$WHEELHOUSE" receive | tee "$OUT/receive.txt"
"$PYTHON" "$WHEELHOUSE" assemble | tee "$OUT/assemble.txt"
"$PYTHON" "$WHEELHOUSE" install --python "$PYTHON" | tee "$OUT/install.txt"
LVLLM_TARGET_DEVICE=cuda "$VENV_PY" -m pip install --quiet --no-deps --no-index --no-build-isolation -e . \
  2>&1 | tee "$OUT/lvllm_install.txt"
"$VENV_PY" - <<'EOF' | tee "$OUT/versions.txt"
import torch, vllm, lvllm._lk as lk
print("vllm", vllm.__version__, "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| lk ISA", lk.best_isa())
EOF
status=0
"$VENV_PY" -m pytest -q tests/gpu 2>&1 | tee "$OUT/tests_gpu.txt" || status=1
"$VENV_PY" tools/airgap/e2e_checks.py "$OUT/e2e" --device cuda 2>&1 | tee "$OUT/e2e.txt" || status=1
exit $status
