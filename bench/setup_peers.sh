#!/usr/bin/env bash
# Create .venv-peers: a separate environment with the public trainers bench/bench_peers.py compares
# against (SAELens and EleutherAI sparsify). It is git-ignored and nothing in pyproject.toml refers
# to it; the project itself never imports these packages.
#
#   bash bench/setup_peers.sh            # create or complete .venv-peers at the repository root
#   PYTHON=python3.11 bash bench/setup_peers.sh
#
# torch==2.13.0 goes in first, alone, so that pip takes the local CPU wheel (PIP_FIND_LINKS on the
# project's machines) and the peers' loose `torch` requirement is already met: pip must never pull a
# CUDA torch. The script refuses to finish if a CUDA build ended up installed anyway.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_PEERS:-$ROOT/.venv-peers}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
SAE_LENS_VERSION="6.54.12"
SPARSIFY_VERSION="1.3.3"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
# Installing the peers with torch pinned keeps pip from replacing it with another build.
"$PY" -m pip install -q "torch==$TORCH_VERSION" "sae-lens==$SAE_LENS_VERSION" "eai-sparsify==$SPARSIFY_VERSION"

"$PY" - <<'EOF'
import sys

import torch

if torch.version.cuda is not None:
    sys.exit(f"{sys.prefix}: torch {torch.__version__} is a CUDA build; remove the venv and install the CPU wheel")
import sae_lens
import sparsify

print(f"{sys.prefix}: torch {torch.__version__}, sae-lens {sae_lens.__version__}, sparsify from {sparsify.__file__}")
EOF
