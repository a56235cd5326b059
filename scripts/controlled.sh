#!/usr/bin/env bash
# The study end to end. Every step writes into $OUT and is skipped when its result is already there, so a
# killed run continues where it stopped.
#  controlled: theta_r (fine-tuned on the retain split) -> per seed V_tgt, a random RATIO of all value vectors, and
#     theta_o (the forget split injected into V_tgt only) -> theta_r and every theta_o evaluated -> the injection
#     table, which stops the study when an injection failed (aggregate.py injection: Forget Strength down by
#     >= 0.5, Retain Strength down by <= 0.05) -> per seed V_rdm, as many vectors drawn outside V_tgt -> each loss
#     unlearns theta_o on V_tgt (oracle) and on V_rdm (random) -> eval.sh -> oracle-vs-random tables over seeds.
#  methods: theta_f (fine-tuned on full) -> per seed a mask per attribution method, and the Jaccard table of the
#     seed's masks -> each loss unlearns theta_f on each mask -> eval.sh -> per loss the table of AUES/MU95 per
#     method, with each method's paired |delta| and permutation p against random_down when it is among METHODS.
# Every setting below can be overridden from the environment, e.g. SEEDS="1 2" LOSSES=npo scripts/controlled.sh
# Each loss unlearns with UNLEARN_ARGS followed by UNLEARN_ARGS_<loss> (e.g. UNLEARN_ARGS_rmu_1), which are unset by
# default: its tuned setting from a sweep, e.g. UNLEARN_ARGS_npo="lr=5e-3 epochs=4" (a later key=value wins); in the
# methods part UNLEARN_ARGS_<method>_<loss> follows (e.g. UNLEARN_ARGS_activation_npo): a setting tuned per method.
# Artifact names (final checkpoints, mask files) come from layout.py; this script only orchestrates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODEL_FAMILY=${MODEL_FAMILY:-tiny}
DATA_PATH=${DATA_PATH:-synthetic}          # TOFU directory, or synthetic
OUT=${OUT:-outputs/study}
FORGET_SPLIT=${FORGET_SPLIT:-forget10}
RETAIN_SPLIT=${RETAIN_SPLIT:-retain90}     # theta_r's split, and the retain term of injection and unlearning
SEEDS=${SEEDS:-"1 2 3 4 5"}
LOSSES=${LOSSES:-"npo wga dpo rmu_1"}
METHODS=${METHODS:-"random_down activation memflex_down wagle_down"}
PARTS=${PARTS:-"controlled methods"}
RATIO=${RATIO:-0.1}
FT_ARGS=${FT_ARGS:-}                       # extra unlearn.py overrides for the two fine-tunes (e.g. epochs=3)
INJECT_ARGS=${INJECT_ARGS:-"forget_loss=learn_reg epochs=10"}
UNLEARN_ARGS=${UNLEARN_ARGS:-"epochs=5 lr=1e-3 lr_scheduler=constant"}  # every loss; UNLEARN_ARGS_<loss> after it
MASK_ARGS=${MASK_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
INJECTION_ARGS=${INJECTION_ARGS:-}         # extra `aggregate.py injection` options, e.g. "--min-fs-drop 0.3"
INJECTION_CHECK=${INJECTION_CHECK:-stop}   # stop: a failed injection ends the study; warn: say so and go on
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
export PYTHON EVAL_ARGS

run() {  # run an entry point with one process, or torchrun when NPROC > 1
  if ((NPROC > 1)); then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
  else "$PYTHON" "$@"; fi
}
layout() { "$PYTHON" layout.py "$@"; }
final() { layout final "$1"; }  # the checkpoint marked final; fails when the run has not finished
common=(model_family="$MODEL_FAMILY" data_path="$DATA_PATH")
read -r -a ft_args <<< "$FT_ARGS"
read -r -a inject_args <<< "$INJECT_ARGS"
read -r -a unlearn_args <<< "$UNLEARN_ARGS"
read -r -a mask_args <<< "$MASK_ARGS"
read -r -a injection_args <<< "$INJECTION_ARGS"
mask_file() {  # mask_root attribution variant seed -> the path generate_mask.py writes
  layout mask-path --mask-root "$1" --attribution "$2" --model-family "$MODEL_FAMILY" --forget-split "$FORGET_SPLIT" \
    --variant "$3" --ratio "$RATIO" --seed "$4"
}
group_args() {  # name pattern -> "--group name" and the pattern with SEED replaced by each seed
  echo "--group $1"; for seed in $SEEDS; do echo "${2//SEED/$seed}"; done
}
per_loss() {  # pattern -> "loss=path" for each loss, LOSS in the pattern replaced by the loss
  for loss in $LOSSES; do echo "$loss=${1//LOSS/$loss}"; done
}
section() {  # title, command: print the command's output under the title, append both to $tables; its status
  printf '### %s\n\n' "$1" | tee -a "$tables"; shift
  "$@" | tee -a "$tables" || return  # explicit: also under `||`
  echo | tee -a "$tables"
}
table() {  # aggregate.py mode, title, JSON output, arguments: the table over $SEEDS as a section
  local mode=$1 title=$2 out=$3; shift 3
  section "$title (seeds: $SEEDS)" "$PYTHON" aggregate.py "$mode" "$@" --out "$out"
}
unlearn_and_evaluate() {  # start_model mask seed loss dir [method]: unlearn into dir/run, scores into dir/agg
  local loss_var="UNLEARN_ARGS_$4" method_var="UNLEARN_ARGS_${6:-none}_$4" loss_args method_args
  read -r -a loss_args <<< "${!loss_var:-}"
  read -r -a method_args <<< "${!method_var:-}"
  run unlearn.py "${common[@]}" model_path="$1" forget_split="$FORGET_SPLIT" retain_split="$RETAIN_SPLIT" \
    forget_loss="$4" mask_path="$2" seed="$3" output_dir="$5/run" "${unlearn_args[@]}" "${loss_args[@]}" \
    "${method_args[@]}"
  scripts/eval.sh --theta-o "$1" --retain-model "$THETA_R" --model-family "$MODEL_FAMILY" --data-path "$DATA_PATH" \
    --forget-split "$FORGET_SPLIT" --nproc "$NPROC" --out "$5/agg" "$5/run" > "$5/agg.log"
}

echo "== theta_r: fine-tune on $RETAIN_SPLIT"
run unlearn.py "${common[@]}" forget_loss=learn forget_split="$RETAIN_SPLIT" output_dir="$OUT/theta_r" \
  save_checkpoint=false "${ft_args[@]}"
THETA_R=$(final "$OUT/theta_r")
tables="$OUT/tables.md"
: > "$tables"

if [[ " $PARTS " == *" controlled "* ]]; then
  theta_os=()
  for seed in $SEEDS; do
    echo "== seed $seed: V_tgt and the injection into it"
    run generate_mask.py "${common[@]}" model_path="$THETA_R" attribution=random_down ratio="$RATIO" seed="$seed" \
      forget_split="$FORGET_SPLIT" mask_root="$OUT/masks"
    v_tgt=$(mask_file "$OUT/masks" random_down normal "$seed")
    run unlearn.py "${common[@]}" model_path="$THETA_R" forget_split="$FORGET_SPLIT" retain_split="$RETAIN_SPLIT" \
      mask_path="$v_tgt" seed="$seed" output_dir="$OUT/controlled/seed$seed/theta_o" save_checkpoint=false \
      "${inject_args[@]}"
    theta_o=$(final "$OUT/controlled/seed$seed/theta_o")
    theta_os+=("$theta_o")
    echo "== seed $seed: evaluating theta_o (and theta_r)"
    scripts/eval.sh --evaluate-only --theta-o "$theta_o" --retain-model "$THETA_R" --model-family "$MODEL_FAMILY" \
      --data-path "$DATA_PATH" --forget-split "$FORGET_SPLIT" --nproc "$NPROC" > "$OUT/controlled/seed$seed/eval.log"
  done
  # Before any unlearning: comparing regions of a model the injection did not change would mean nothing.
  status=0
  table injection "Injection: theta_o against theta_r" "$OUT/controlled/injection.json" --theta-r "$THETA_R" \
    --forget-split "$FORGET_SPLIT" "${injection_args[@]}" "${theta_os[@]}" || status=$?
  if ((status == 1)) && [[ $INJECTION_CHECK == warn ]]; then
    echo "INJECTION_CHECK=warn: unlearning on the regions anyway; the tables below do not test localization" >&2
  elif ((status)); then
    echo "controlled.sh: stopped before unlearning on the regions (see above; INJECTION_CHECK=warn goes on)" >&2
    exit "$status"
  fi
  for seed in $SEEDS; do
    theta_o=$(final "$OUT/controlled/seed$seed/theta_o")
    v_tgt=$(mask_file "$OUT/masks" random_down normal "$seed")
    echo "== seed $seed: V_rdm"
    run generate_mask.py "${common[@]}" model_path="$THETA_R" attribution=random_down variant=random_complement \
      target_mask_path="$v_tgt" ratio="$RATIO" seed="$seed" forget_split="$FORGET_SPLIT" mask_root="$OUT/masks"
    v_rdm=$(mask_file "$OUT/masks" random_down random_complement "$seed")
    for loss in $LOSSES; do
      for region in oracle random; do
        mask=$v_tgt; [[ $region == random ]] && mask=$v_rdm
        echo "== seed $seed: $loss on the $region region"
        unlearn_and_evaluate "$theta_o" "$mask" "$seed" "$loss" "$OUT/controlled/seed$seed/$loss/$region"
      done
    done
  done
  for loss in $LOSSES; do
    groups=()
    for region in oracle random; do groups+=($(group_args "$region" "$OUT/controlled/seedSEED/$loss/$region/agg")); done
    table compare "Controlled experiment, $loss" "$OUT/controlled/compare_$loss.json" "${groups[@]}"
  done
  "$PYTHON" aggregate.py compare-plot $(per_loss "$OUT/controlled/compare_LOSS.json") \
    --out "$OUT/controlled/compare.png" --title "$MODEL_FAMILY, $FORGET_SPLIT, ratio $RATIO: oracle vs random, seeds $SEEDS"
fi

if [[ " $PARTS " == *" methods "* ]]; then
  echo "== theta_f: fine-tune on full"
  run unlearn.py "${common[@]}" forget_loss=learn forget_split=full output_dir="$OUT/theta_f" save_checkpoint=false \
    "${ft_args[@]}"
  theta_f=$(final "$OUT/theta_f")
  # Every mask before any unlearning: the overlap tables come out early and cost no training.
  for seed in $SEEDS; do
    masks=()
    for method in $METHODS; do
      echo "== seed $seed: $method mask"
      run generate_mask.py "${common[@]}" model_path="$theta_f" attribution="$method" ratio="$RATIO" seed="$seed" \
        forget_split="$FORGET_SPLIT" mask_root="$OUT/masks_f" "${mask_args[@]}"
      masks+=("$(mask_file "$OUT/masks_f" "$method" normal "$seed")")
    done
    section "Jaccard overlap of the methods' masks, seed $seed" \
      "$PYTHON" masks.py compare "${masks[@]}" --out "$OUT/methods/jaccard_seed$seed"
  done
  for seed in $SEEDS; do
    for method in $METHODS; do
      mask=$(mask_file "$OUT/masks_f" "$method" normal "$seed")
      for loss in $LOSSES; do
        unlearn_and_evaluate "$theta_f" "$mask" "$seed" "$loss" "$OUT/methods/seed$seed/$method/$loss" "$method"
      done
    done
  done
  baseline=()
  [[ " $METHODS " == *" random_down "* ]] && baseline=(--baseline random_down)
  for loss in $LOSSES; do
    groups=()
    for method in $METHODS; do groups+=($(group_args "$method" "$OUT/methods/seedSEED/$method/$loss/agg")); done
    table methods "Attribution methods, $loss" "$OUT/methods/methods_$loss.json" "${groups[@]}" "${baseline[@]}"
  done
  "$PYTHON" aggregate.py methods-plot $(per_loss "$OUT/methods/methods_LOSS.json") --out "$OUT/methods/methods.png" \
    --title "$MODEL_FAMILY, $FORGET_SPLIT, ratio $RATIO: mean ± std over seeds $SEEDS"
fi
echo "tables: $tables; figures: $OUT/controlled/compare.png (controlled part), $OUT/methods/methods.png (methods part); per-run plots: $OUT/*/seed*/*/*/agg/*.png (and .../agg/runs.json, runs.csv)"
