#!/usr/bin/env bash
# Evaluate theta_o, the retain model (if only its directory is given) and every checkpoint of the unlearning runs
# with eval_tofu.py, then score and plot the runs with `aggregate.py runs`. theta_o and the checkpoints go to one
# evaluator process, which loads theta_o once and swaps in the masked values of compact checkpoints. Models with a
# current eval JSON (eval_tofu.py decides: same model files, config and evaluator) are not evaluated again, so a
# killed eval.sh simply continues where it stopped.
set -euo pipefail

# ---- Defaults: edit here, or set them in the environment (RUNS="run_a run_b"), or pass arguments (see -h). ----
MODEL_FAMILY=${MODEL_FAMILY:-tiny}
DATA_PATH=${DATA_PATH:-}            # TOFU directory; empty: eval_tofu.py's default (the hub dataset)
FORGET_SPLIT=${FORGET_SPLIT:-forget10}
THETA_O=${THETA_O:-}                # the model before unlearning (directory)
RETAIN_EVAL=${RETAIN_EVAL:-}        # the retain model's eval JSON, or ...
RETAIN_MODEL=${RETAIN_MODEL:-}      # ... the retain model's directory, evaluated first
NPROC=${NPROC:-1}                   # > 1: one torchrun process per GPU
OUT=${OUT:-outputs/aggregate}
EVAL_ARGS=${EVAL_ARGS:-}            # extra eval_tofu.py overrides, e.g. "batch_size=16 es_convention=open_unlearning"
AGGREGATE_ARGS=${AGGREGATE_ARGS:-}  # extra `aggregate.py runs` options, e.g. "--aues trapezoid --names a b"
EVALUATE_ONLY=${EVALUATE_ONLY:-0}   # 1: evaluate only (RUN_DIRs optional), no scores or plots
if [[ -n ${RUNS:-} ]]; then read -r -a RUNS <<< "$RUNS"; else RUNS=(
  # runs/tiny/TOFU/default/forget10/grad_diff/lora_r0/masked_False/lr_1e-05_wd_0.01_ep_5_bs_32
); fi

usage() {
  cat <<EOF
usage: scripts/eval.sh [options] [RUN_DIR ...]

Evaluates theta_o, the retain model and every unevaluated checkpoint of each RUN_DIR (theta_o and the
checkpoints in one evaluator process; layout.py names them and their results), then writes OUT/runs.json,
OUT/runs.csv and the trade-off plots (python aggregate.py runs).

  --theta-o DIR        model before unlearning              (THETA_O=$THETA_O)
  --retain-eval JSON   retain model's eval JSON             (RETAIN_EVAL=$RETAIN_EVAL)
  --retain-model DIR   retain model, evaluated if needed    (RETAIN_MODEL=$RETAIN_MODEL)
  --model-family NAME                                       (MODEL_FAMILY=$MODEL_FAMILY)
  --data-path DIR                                           (DATA_PATH=$DATA_PATH)
  --forget-split NAME                                       (FORGET_SPLIT=$FORGET_SPLIT)
  --nproc N            torchrun processes when N > 1        (NPROC=$NPROC)
  --out DIR            aggregation output                   (OUT=$OUT)
  --evaluate-only      evaluate, then stop: no scores or plots; RUN_DIRs optional (EVALUATE_ONLY=$EVALUATE_ONLY)
  RUN_DIR ...          replace RUNS (now: ${RUNS[*]})

Environment only: EVAL_ARGS (key=value overrides for eval_tofu.py), AGGREGATE_ARGS, PYTHON (default python),
EVAL_CMD (the evaluator command; default: \$PYTHON eval_tofu.py, or torchrun's module when NPROC > 1).
EOF
}

positional=()
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --theta-o) THETA_O=${2:?$1 needs a value}; shift 2 ;;
    --retain-eval) RETAIN_EVAL=${2:?$1 needs a value}; shift 2 ;;
    --retain-model) RETAIN_MODEL=${2:?$1 needs a value}; shift 2 ;;
    --model-family) MODEL_FAMILY=${2:?$1 needs a value}; shift 2 ;;
    --data-path) DATA_PATH=${2:?$1 needs a value}; shift 2 ;;
    --forget-split) FORGET_SPLIT=${2:?$1 needs a value}; shift 2 ;;
    --nproc) NPROC=${2:?$1 needs a value}; shift 2 ;;
    --out) OUT=${2:?$1 needs a value}; shift 2 ;;
    --evaluate-only) EVALUATE_ONLY=1; shift ;;
    --) shift; positional+=("$@"); break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
((${#positional[@]})) && RUNS=("${positional[@]}")

die() { echo "error: $*" >&2; exit 2; }
((${#RUNS[@]} || EVALUATE_ONLY)) || die "no run directories (set RUNS or pass RUN_DIR arguments; see -h)"
[[ -n $THETA_O ]] || die "THETA_O / --theta-o is not set"
[[ -n $RETAIN_EVAL || -n $RETAIN_MODEL ]] || die "set RETAIN_EVAL / --retain-eval or RETAIN_MODEL / --retain-model"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
if [[ -n ${EVAL_CMD:-} ]]; then
  read -r -a eval_cmd <<< "$EVAL_CMD"
elif ((NPROC > 1)); then
  eval_cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$ROOT/eval_tofu.py")
else
  eval_cmd=("$PYTHON" "$ROOT/eval_tofu.py")
fi
read -r -a eval_args <<< "$EVAL_ARGS"
read -r -a aggregate_args <<< "$AGGREGATE_ARGS"
common=(model_family="$MODEL_FAMILY" forget_split="$FORGET_SPLIT")
[[ -n $DATA_PATH ]] && common+=(data_path="$DATA_PATH")

layout() { "$PYTHON" "$ROOT/layout.py" "$@"; }  # every artifact name comes from layout.py

evaluate() {  # retain result JSON or empty, then model directories: all of them in one evaluator process
  local extra=() quoted=() model result results
  [[ -n $1 ]] && extra=(retain_result="$1")
  for model in "${@:2}"; do quoted+=("'${model//\'/\\\'}'"); done  # Hydra list items, quoted
  echo "== evaluating ${*:2}"
  "${eval_cmd[@]}" "${common[@]}" "model_path=[$(IFS=,; echo "${quoted[*]}")]" "${extra[@]}" "${eval_args[@]}"
  results=$(layout eval-path --forget-split "$FORGET_SPLIT" "${@:2}")
  while IFS= read -r result; do
    [[ -f $result ]] || die "the evaluator exited without writing $result (eval.sh expects the default output_dir)"
  done <<< "$results"
}

if [[ -z $RETAIN_EVAL ]]; then
  evaluate "" "$RETAIN_MODEL"
  RETAIN_EVAL=$(layout eval-path --forget-split "$FORGET_SPLIT" "$RETAIN_MODEL")
fi
[[ -f $RETAIN_EVAL ]] || die "retain eval $RETAIN_EVAL does not exist"
RETAIN_EVAL=$(realpath "$RETAIN_EVAL")  # stored in each eval's config: absolute, it names the file from any cwd

models=("$THETA_O")
if ((${#RUNS[@]})); then
  ckpts=$(layout checkpoints "${RUNS[@]}") || exit 2  # layout.py names a missing run directory
  [[ -n $ckpts ]] && mapfile -t -O 1 models <<< "$ckpts"
fi
evaluate "$RETAIN_EVAL" "${models[@]}"
((EVALUATE_ONLY)) && exit 0

"$PYTHON" "$ROOT/aggregate.py" runs --theta-o "$THETA_O" --retain-eval "$RETAIN_EVAL" --forget-split "$FORGET_SPLIT" \
  --out "$OUT" "${RUNS[@]}" "${aggregate_args[@]}"
