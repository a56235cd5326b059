"""Disk per checkpoint of a masked run: compact (the default) against full, the same run saved both ways.

    python bench/bench_checkpoints.py                                  # tiny-wide, synthetic TOFU, 10% random mask
    python bench/bench_checkpoints.py --data_path ../shared/data/tofu

generate_mask.py draws a random `--ratio` mask; unlearn.py then runs the same masked npo run twice, with
save_format=compact and save_format=full, saving each epoch. A checkpoint's size is every file in it except
trainer_state.pt, the optimizer state that only the newest checkpoint keeps (the same in both formats). The
compact run's final checkpoint, exported to a full directory, must hold the full run's final weights exactly.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# common must come first: it puts the repo root on sys.path for the imports below.
from common import LLAMA31_8B_PARAMS, LLAMA31_8B_VALUE_PARAMS, mib, print_header, run_python

import torch
from safetensors.torch import load_file

from checkpoints import export
from layout import STATE_FILE, checkpoints
from models import resolve_model_path

GOAL = 0.15


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file() and f.name != STATE_FILE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="synthetic", help="TOFU directory of JSON-lines files, or `synthetic`")
    p.add_argument("--model_family", default="tiny-wide", help="a locally built family (tiny, tiny-wide)")
    p.add_argument("--ratio", type=float, default=0.1, help="fraction of the value vectors in the mask")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the masked run (a checkpoint each)")
    args = p.parse_args()
    print_header(f"disk per masked checkpoint: compact vs full ({args.model_family}, {args.ratio:.0%} mask)")

    model = resolve_model_path(args.model_family, None, args.data_path)
    common = [f"model_family={args.model_family}", f"data_path={args.data_path}", "forget_split=forget01"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_python("generate_mask.py", *common, f"model_path={model}", "attribution=random_down", f"ratio={args.ratio}",
                   f"mask_root={root / 'masks'}")
        (mask,) = (root / "masks").rglob("*.pt")
        sizes, finals = {}, {}
        for save_format in ("compact", "full"):
            out = root / save_format
            run_python("unlearn.py", *common, f"model_path={model}", f"mask_path={mask}", "forget_loss=npo",
                       f"epochs={args.epochs}", "batch_size=8", f"save_format={save_format}", f"output_dir={out}")
            found = [path for _, path in checkpoints(out)]
            sizes[save_format] = [checkpoint_bytes(c) for c in found]
            finals[save_format] = found[-1]
        full = load_file(str(finals["full"] / "model.safetensors"))
        exported = load_file(str(export(str(finals["compact"]), str(root / "exported")) / "model.safetensors"))
        identical = full.keys() == exported.keys() and all(torch.equal(full[k], exported[k]) for k in full)

    print(f"model: {model}; mask: {args.ratio:.0%} of the value vectors; {len(sizes['full'])} checkpoints per run")
    print("| format | checkpoints | bytes per checkpoint (mean) |\n|---|---|---|")
    mean = {k: sum(v) / len(v) for k, v in sizes.items()}
    for save_format, values in sizes.items():
        print(f"| {save_format} | {len(values)} | {mean[save_format]:,.0f} ({mib(mean[save_format])}) |")
    ratio = mean["compact"] / mean["full"]
    print(f"\nexported compact checkpoint equals the full one: {'yes' if identical else 'NO'}")
    print(f"disk ratio compact/full: {ratio:.4f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")
    values, weights = LLAMA31_8B_VALUE_PARAMS * args.ratio * 2, LLAMA31_8B_PARAMS * 2
    print(f"at Llama-3.1-8B in bf16: {values / 2**30:.2f} GiB of masked values against {weights / 2**30:.2f} GiB "
          f"of weights ({values / weights:.3f}x)")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
