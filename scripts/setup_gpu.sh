#!/usr/bin/env bash
# GPU nodes: create (or update) the conda env of environment.yml, then install DeepSpeed, and with FLASH_ATTN=1
# flash-attn, built against its torch. CPU laptops: scripts/setup.sh.
#   bash scripts/setup_gpu.sh                 # env `loc-unlearn` (ENV_NAME=... for another name)
#   FLASH_ATTN=1 bash scripts/setup_gpu.sh    # also flash-attn (optional: models.py falls back to sdpa without it)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_NAME=${ENV_NAME:-loc-unlearn}
if conda env list | awk '{print $1}' | grep -qx "$ENV_NAME"; then
  conda env update -n "$ENV_NAME" -f environment.yml --prune
else
  conda env create -n "$ENV_NAME" -f environment.yml
fi
run() { conda run -n "$ENV_NAME" --no-capture-output "$@"; }
# With build isolation pip would build against a freshly downloaded torch, not the CUDA build installed above.
run python -m pip install --no-build-isolation deepspeed==0.19.8
if [ "${FLASH_ATTN:-0}" = 1 ]; then
  # flash-attn's setup downloads the prebuilt wheel matching this torch, CUDA and Python; only when none matches
  # does it compile from source (an hour or more; MAX_JOBS limits its memory use).
  run python -m pip install packaging ninja
  run python -m pip install --no-build-isolation flash-attn
fi
run python -c "import torch, transformers, deepspeed; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), \
transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')"
