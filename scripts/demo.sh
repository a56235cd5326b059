#!/usr/bin/env bash
# The embedded demo: a reduced version of both experiments of the study on 2 CPU cores, sized so that the injection
# verifies (README, "Quick start"): tiny-wide on a 20-author synthetic TOFU (data_path=synthetic:20), forget10 =
# the last 2 authors. Every setting can be overridden from the environment; DATA_PATH=<dir> runs the same settings
# on TOFU's real files, which take far longer (3,600 retain answers instead of 360).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export PYTHON=.venv/bin/python OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: faster for models this small, and robust to a shared CPU
export MODEL_FAMILY=${MODEL_FAMILY:-tiny-wide} DATA_PATH=${DATA_PATH:-synthetic:20} OUT=${OUT:-outputs/demo}
export FORGET_SPLIT=${FORGET_SPLIT:-forget10} RETAIN_SPLIT=${RETAIN_SPLIT:-retain90}
export SEEDS=${SEEDS:-"1 2"} LOSSES=${LOSSES:-npo} METHODS=${METHODS:-"random_down activation"} RATIO=0.1
export FT_ARGS=${FT_ARGS:-}
export INJECT_ARGS=${INJECT_ARGS:-"forget_loss=learn_reg hyper_param=1 lr=1e-1 weight_decay=0 epochs=80 batch_size=8"}
export UNLEARN_ARGS=${UNLEARN_ARGS:-"epochs=2 batch_size=8 lr=2e-2 lr_scheduler=constant"}
export EVAL_ARGS=${EVAL_ARGS:-"max_samples=30"}
start=$(date +%s)
scripts/controlled.sh
echo "demo finished in $(( $(date +%s) - start )) s; outputs under $OUT"
