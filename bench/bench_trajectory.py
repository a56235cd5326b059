"""A masked run's trajectory (θ_o + its checkpoints) evaluated in one eval_tofu.py process against one process per
model, as scripts/eval.sh did before: wall time of each, and the per-sample values compared.

    python bench/bench_trajectory.py --data_path ../shared/data/tofu [--model_path θ_o] [--eval_args "..."]

unlearn.py runs a masked npo run (random 10% mask) from θ_o with a checkpoint each epoch (`--checkpoints` epochs,
compact checkpoints). Each arm runs eval_tofu.py as a user would, so process start, imports, data loading and model
loading count; the one-process arm loads θ_o once and swaps in each checkpoint's masked values.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path

# common must come first: it puts the repo root on sys.path for the imports below.
from common import ROOT, print_header, run_python

import numpy as np

from layout import checkpoints
from models import resolve_model_path

GOAL = 2.0
TOLERANCE = 1e-6


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference of two results' per-sample numbers; inf when texts or shapes differ."""
    worst = 0.0
    for split, values in a["per_sample"].items():
        for key, value in values.items():
            other = b["per_sample"][split][key]
            if key in ("question", "generation"):
                if value != other:
                    return float("inf")
            else:
                worst = max(worst, float(np.max(np.abs(np.asarray(value, float) - np.asarray(other, float)))))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.environ.get("TOFU_DIR", str(ROOT.parent / "shared" / "data" / "tofu")),
                   help="TOFU directory (default: $TOFU_DIR, else ../shared/data/tofu)")
    p.add_argument("--model_path", default=None, help="θ_o, a tiny-family model (default: the initial tiny model)")
    p.add_argument("--forget_split", default="forget01")
    p.add_argument("--checkpoints", type=int, default=5, help="checkpoints of the run (one per epoch)")
    p.add_argument("--eval_args", default="", help="extra eval_tofu.py overrides for both arms, e.g. max_samples=20")
    args = p.parse_args()
    print_header(f"trajectory evaluation: θ_o + {args.checkpoints} checkpoints in one process vs one process each")

    common = ["model_family=tiny", f"data_path={args.data_path}", f"forget_split={args.forget_split}"]
    eval_args = [*common, *shlex.split(args.eval_args)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        theta_o = root / "theta_o"
        shutil.copytree(resolve_model_path("tiny", args.model_path, args.data_path), theta_o,
                        ignore=shutil.ignore_patterns("eval_results", "trainer_state.pt"))
        run_python("generate_mask.py", *common, f"model_path={theta_o}", "attribution=random_down", "ratio=0.1",
                   f"mask_root={root / 'masks'}")
        (mask,) = (root / "masks").rglob("*.pt")
        run_python("unlearn.py", *common, f"model_path={theta_o}", f"mask_path={mask}", "forget_loss=npo",
                   f"epochs={args.checkpoints}", "batch_size=8", "lr=5e-3", f"output_dir={root / 'run'}")
        models = [theta_o, *(path for _, path in checkpoints(root / "run"))]
        result = lambda m: m / "eval_results" / f"eval_{args.forget_split}.json"  # noqa: E731

        separate_s = [run_python("eval_tofu.py", f"model_path={m}", *eval_args) for m in models]
        separate = [json.loads(result(m).read_text()) for m in models]
        listed = "model_path=[" + ",".join(f"'{m}'" for m in models) + "]"
        together_s = run_python("eval_tofu.py", listed, *eval_args, "overwrite=true")
        together = [json.loads(result(m).read_text()) for m in models]

    print(f"θ_o: {args.model_path or 'the initial tiny model'}; run: masked npo, 10% random mask, "
          f"{len(models) - 1} compact checkpoints; eval_tofu.py {shlex.join(eval_args)}")
    print("| model | one process each: s | evaluation inside it: s | max |difference| of per-sample values |")
    print("|---|---|---|---|")
    worst = 0.0
    for model, seconds, alone, one in zip(models, separate_s, separate, together):
        inside = sum(t["seconds"] for t in alone["timing"].values())
        diff = max_difference(alone, one)
        worst = max(worst, diff)
        print(f"| {model.name} | {seconds:.1f} | {inside:.1f} | {diff:.2g} |")
    inside = sum(t["seconds"] for r in together for t in r["timing"].values())
    print(f"| all, one process each | {sum(separate_s):.1f} | | |")
    print(f"| all, one process | {together_s:.1f} | {inside:.1f} | |")
    speedup = sum(separate_s) / together_s
    verdict = "met" if worst <= TOLERANCE else "NOT met"
    print(f"\nper-sample values: max |difference| {worst:.2g} (goal <= {TOLERANCE}: {verdict})")
    print(f"speed-up one process / one process per model: {speedup:.2f}x "
          f"(goal >= {GOAL}: {'met' if speedup >= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
