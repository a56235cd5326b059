#!/usr/bin/env bash
# Evaluate theta_o, the retain model (if only its directory is given) and every checkpoint of the unlearning runs
# with eval_tofu.py, then score and plot the runs with `aggregate.py runs`. Models whose eval JSON exists (computed
# against the current retain result) are skipped, so a killed eval.sh simply continues where it stopped.
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
if [[ -n ${RUNS:-} ]]; then read -r -a RUNS <<< "$RUNS"; else RUNS=(
  # runs/tiny/TOFU/default/forget10/grad_diff/lora_r0/masked_False/lr_1e-05_wd_0.01_ep_5_bs_32
); fi

usage() {
  cat <<EOF
usage: scripts/eval.sh [options] [RUN_DIR ...]

Evaluates theta_o, the retain model and every unevaluated checkpoint-<step> of each RUN_DIR, then writes
OUT/runs.json, OUT/runs.csv and the trade-off plots (python aggregate.py runs).

  --theta-o DIR        model before unlearning              (THETA_O=$THETA_O)
  --retain-eval JSON   retain model's eval JSON             (RETAIN_EVAL=$RETAIN_EVAL)
  --retain-model DIR   retain model, evaluated if needed    (RETAIN_MODEL=$RETAIN_MODEL)
  --model-family NAME                                       (MODEL_FAMILY=$MODEL_FAMILY)
  --data-path DIR                                           (DATA_PATH=$DATA_PATH)
  --forget-split NAME                                       (FORGET_SPLIT=$FORGET_SPLIT)
  --nproc N            torchrun processes when N > 1        (NPROC=$NPROC)
  --out DIR            aggregation output                   (OUT=$OUT)
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
    --) shift; positional+=("$@"); break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
((${#positional[@]})) && RUNS=("${positional[@]}")

die() { echo "error: $*" >&2; exit 2; }
((${#RUNS[@]})) || die "no run directories (set RUNS or pass RUN_DIR arguments; see -h)"
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

# Done when the JSON exists, was computed with the same key=value settings (data, split, EVAL_ARGS) and (if a retain
# result is given) its forget quality against that file; otherwise eval_tofu.py runs again, which reuses stored
# per-sample values when only the retain result changed.
is_done() {  # result retain_result key=value...
  [[ -f $1 ]] || return 1
  "$PYTHON" - "$@" <<'EOF'
import json, os, sys, yaml
config = json.load(open(sys.argv[1])).get("config", {})
theirs = config.get("retain_result")
same_retain = not sys.argv[2] or (theirs and os.path.isfile(theirs) and os.path.samefile(theirs, sys.argv[2]))
same_args = all(config.get(k) == yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[3:]))
sys.exit(0 if same_retain and same_args else 1)
EOF
}

evaluate() {  # $1: model directory, $2: retain result JSON or empty
  local result="$1/eval_results/eval_$FORGET_SPLIT.json" extra=()
  if is_done "$result" "$2" "${common[@]}" "${eval_args[@]}"; then echo "== evaluated already: $1"; return; fi
  echo "== evaluating $1"
  [[ -n $2 ]] && extra=(retain_result="$2")
  "${eval_cmd[@]}" "${common[@]}" model_path="$1" "${extra[@]}" "${eval_args[@]}"
  [[ -f $result ]] || die "the evaluator exited without writing $result (eval.sh expects the default output_dir)"
}

if [[ -z $RETAIN_EVAL ]]; then
  evaluate "$RETAIN_MODEL" ""
  RETAIN_EVAL="$RETAIN_MODEL/eval_results/eval_$FORGET_SPLIT.json"
fi
[[ -f $RETAIN_EVAL ]] || die "retain eval $RETAIN_EVAL does not exist"
RETAIN_EVAL=$(realpath "$RETAIN_EVAL")  # stored in each eval's config, so is_done can recognise it from any cwd

evaluate "$THETA_O" "$RETAIN_EVAL"
for run in "${RUNS[@]}"; do
  [[ -d $run ]] || die "run directory $run does not exist"
  for ckpt in "$run"/checkpoint-*; do
    if [[ -d $ckpt && $(basename "$ckpt") =~ ^checkpoint-[0-9]+$ ]]; then evaluate "$ckpt" "$RETAIN_EVAL"; fi
  done
done

"$PYTHON" "$ROOT/aggregate.py" runs --theta-o "$THETA_O" --retain-eval "$RETAIN_EVAL" --forget-split "$FORGET_SPLIT" \
  --out "$OUT" "${RUNS[@]}" "${aggregate_args[@]}"
