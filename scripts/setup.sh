#!/usr/bin/env bash
# Create .venv in the repo root and install lightcrl with its dependencies.
# torch is pinned first so this machine takes its local CPU wheel; for a GPU, install a CUDA build of
# torch into .venv before running this script (see README), and the pin below is then left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==${LIGHTCRL_TORCH_VERSION:-2.13.0}"
fi
"$VPY" -m pip install -q -e ".[dev,export]"
# aisfx pins old versions of its dependencies: install it alone, its needs come from the line above.
"$VPY" -m pip install -q --no-deps "aisfx==0.1.2" || echo "warning: aisfx (audio encoder) not installed"
PYTHON="$VPY" bash scripts/install_chromium.sh
echo "lightcrl installed in .venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
