#!/usr/bin/env bash
# Create .venv and install the pinned CPU requirements (GPU nodes: scripts/setup_gpu.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# DeepSpeed builds against the torch installed above; with build isolation pip would fetch a CUDA torch.
.venv/bin/python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
# DeepSpeed compiles its CPU shared-memory comm op on first use (~45 s of CPU): build it here, once, not inside
# whichever run or test first starts DeepSpeed (a process killed mid-build leaves a lock that hangs later ones).
.venv/bin/python -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b and b.load(verbose=False)" >/dev/null
.venv/bin/python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
