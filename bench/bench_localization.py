"""Localization sanity check of attribution masks: zeroing a mask's value vectors should raise the forget set's NLL
more than the retain set's, and more than zeroing a random mask of the same size does.

    python bench/bench_localization.py --model_path <θ_full> --masks MASK [MASK ...] --data_path ../shared/data/tofu \
        --forget_split forget10 --seeds 5 --out outputs/localization.json

Per mask (evaluator.localization_check): ΔNLL = mean NLL per answer token with the mask's value vectors zeroed
minus the unablated model's, on the forget split and on the retain split (its complement; `--retain_subset`
examples drawn with `--retain_seed`, all of them when 0), and the same for `--seeds` random masks with the mask's
size in every layer (masks.random_like, seeds 0..N-1). The verdict holds when the mask's forget ΔNLL exceeds both
its retain ΔNLL and the random masks' mean forget ΔNLL. The random masks' forget / retain ratio is printed beside
the mask's: where the forget set is simply the more fragile one, random masks too raise its NLL more, and only a
mask whose ratio exceeds theirs is more forget-specific than chance. Prints a markdown table; `--out` writes the
numbers and the command as JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# common must come first: it puts the repo root on sys.path for the imports below.
from common import print_header, set_threads

import torch

from checkpoints import load_any_model
from dataloader import QADataset
from evaluator import localization_check
from masks import load_mask, mask_names
from models import family_config, load_tokenizer, value_vector_shape
from tofu import load_tofu, retain_split_for


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the model the masks were generated on (e.g. θ_full)")
    p.add_argument("--masks", nargs="+", required=True, metavar="MASK", help="mask files from generate_mask.py")
    p.add_argument("--model_family", default="tiny", help="formats the QA pairs and sets max_length (%(default)s)")
    p.add_argument("--data_path", required=True, help="TOFU directory of JSON-lines files, or `synthetic`")
    p.add_argument("--forget_split", default="forget10", help="forget split; its complement is the retain split")
    p.add_argument("--retain_subset", type=int, default=400,
                   help="retain examples scored, a random subset (%(default)s; 0: the whole retain split)")
    p.add_argument("--retain_seed", type=int, default=0,
                   help="seed of the retain subset (%(default)s; generate_mask.py draws its 400 with its own seed, "
                        "42 by default, so this one overlaps them only by chance)")
    p.add_argument("--seeds", type=int, default=5, help="random masks per mask, seeds 0..N-1 (%(default)s)")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per scoring pass (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.retain_subset < 0:
        p.error("--retain_subset must be >= 0")
    set_threads(p, args.threads)
    return args


def verdict(row: dict[str, Any]) -> str:
    if row["localized"]:
        return "yes"
    failed = [what for what, ok in (("≤ retain", row["forget"] > row["retain"]),
                                    ("≤ random", row["forget"] > row["random_forget_mean"])) if not ok]
    return "no (forget " + ", ".join(failed) + ")"


def table(result: dict[str, Any], sizes: dict[str, int]) -> str:
    lines = ["| mask | n | ΔNLL forget | ΔNLL retain | forget / retain | random ΔNLL forget | random ΔNLL retain | "
             "random forget / retain | forget / random | forget > retain and > random |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in result["masks"].items():
        lines.append(
            f"| {name} | {sizes[name]} | {row['forget']:.4f} | {row['retain']:.4f} | {row['forget_over_retain']:.2f} "
            f"| {row['random_forget_mean']:.4f} ± {row['random_forget_std']:.4f} "
            f"| {row['random_retain_mean']:.4f} ± {row['random_retain_std']:.4f} "
            f"| {row['random_forget_over_retain']:.2f} | {row['forget_over_random']:.2f} | {verdict(row)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print_header("localization sanity check: ΔNLL of forget and retain with a mask's value vectors zeroed")
    family = family_config(args.model_family)
    model = load_any_model(args.model_path, torch.device("cpu"))
    tokenizer = load_tokenizer(args.model_family, args.model_path)
    n_layers, d_ff = value_vector_shape(model)
    masks = {name: load_mask(path, n_layers, d_ff)[0] for name, path in zip(mask_names(args.masks), args.masks)}

    retain_rows = load_tofu(retain_split_for(args.forget_split), args.data_path)
    if args.retain_subset:
        picked = random.Random(args.retain_seed).sample(range(len(retain_rows)),
                                                        min(args.retain_subset, len(retain_rows)))
        retain_rows = [retain_rows[i] for i in sorted(picked)]
    encode = lambda rows: QADataset.from_rows(rows, tokenizer, family, family["max_length"]).items  # noqa: E731
    forget, retain = encode(load_tofu(args.forget_split, args.data_path)), encode(retain_rows)
    print(f"{len(forget)} {args.forget_split} and {len(retain)} {retain_split_for(args.forget_split)} examples, "
          f"{n_layers} x {d_ff} value vectors, {args.seeds} random masks per mask\n")

    start = time.perf_counter()
    result = localization_check(model, masks, forget, retain, list(range(args.seeds)), args.batch_size)
    seconds = time.perf_counter() - start
    base = result["baseline"]
    print(f"unablated mean NLL per answer token: forget {base['forget']:.4f}, retain {base['retain']:.4f}\n")
    print(table(result, {name: sum(len(t) for t in idx) for name, idx in masks.items()}))
    print(f"\n{seconds:.1f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": shlex.join([sys.executable, *sys.argv]), "args": vars(args),
                  "masks": dict(zip(masks, args.masks)), "seconds": seconds, **result}
        out.write_text(json.dumps(record, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
