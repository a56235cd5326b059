"""Cost of each attribution method relative to one forward+backward pass over the same data.

    python bench/bench_masks.py                                  # synthetic TOFU, tiny model
    python bench/bench_masks.py --data_path ../shared/data/tofu  # real TOFU (tiny model built for it)

Every figure comes from one process and one run, so the ratios hold even when absolute times are inflated by
other load on the machine: the baseline and every method are timed in `--repeats` rounds and the best round
of each counts (outside load only ever adds time); the slowest round shows how much the load varied.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

# common must come first: it puts the repo root on sys.path for the imports below.
from common import ROOT, RssPeak, add_common_args, check_common_args, forget_retain_rows, mib, print_header, tiny_model

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dataloader import IGNORE_INDEX, QADataset, nll_loss
from mask_generator import ATTRIBUTIONS, compute_scores, model_shape
from models import family_config, load_model, load_tokenizer

BASELINE = "forward+backward"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, n_examples=64)
    p.add_argument("--batch_size", type=int, default=None, help="default: get_mask_tofu.yaml's batch_size")
    p.add_argument("--ig_steps", type=int, default=None, help="default: get_mask_tofu.yaml's ig_steps")
    p.add_argument("--repeats", type=int, default=3, help="rounds of baseline + every method; the best round counts")
    p.add_argument("--methods", nargs="+", default=sorted(ATTRIBUTIONS), choices=sorted(ATTRIBUTIONS),
                   metavar="METHOD", help=f"attribution methods to time (default: all of {sorted(ATTRIBUTIONS)})")
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def method_config(args: argparse.Namespace) -> dict[str, Any]:
    """The method knobs generate_mask.py would use, so each method does its real amount of work."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "config" / "get_mask_tofu.yaml"))
    cfg.pop("hydra")
    cfg.pop("defaults")
    cfg.update(seed=args.seed, progress=False)
    if args.batch_size is not None:
        cfg["batch_size"] = args.batch_size
    if args.ig_steps is not None:
        cfg["ig_steps"] = args.ig_steps
    return cfg


def forward_backward(model: torch.nn.Module, loaders: Sequence[DataLoader]) -> None:
    """One forward+backward pass (every parameter's gradient) over the batches: the unit of cost."""
    model.eval()
    for loader in loaders:
        for batch in loader:
            nll_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def timed(fn: Callable[[], object]) -> tuple[float, int | None]:
    with RssPeak() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, rss.peak_bytes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header("attribution cost vs one forward+backward pass")
    cfg = method_config(args)
    torch.manual_seed(args.seed)
    model_path = tiny_model(args.model_path, args.data_path)
    family = family_config("tiny")
    tokenizer = load_tokenizer("tiny", model_path)
    model = load_model(model_path, torch.device("cpu"))
    forget_rows, retain_rows = forget_retain_rows(args.data_path, args.forget_split, args.n_examples, args.seed)
    forget, retain = (QADataset.from_rows(rows, tokenizer, family, family["max_length"]) for rows in (forget_rows, retain_rows))
    loaders = [DataLoader(ds, batch_size=cfg["batch_size"], collate_fn=ds.collate) for ds in (forget, retain)]
    n_layers, d_ff = model_shape(model)
    n_tokens = sum(int((ds.collate(ds.items)["labels"] != IGNORE_INDEX).sum()) for ds in (forget, retain))
    print(f"model: {model_path} ({model.num_parameters():,} parameters, {n_layers} layers x {d_ff} value vectors)")
    print(f"data: {args.data_path}, {len(forget)} {args.forget_split} + {len(retain)} retain examples "
          f"({n_tokens} answer tokens), batch_size {cfg['batch_size']}, ig_steps {cfg['ig_steps']}, "
          f"memflex_copies {cfg['memflex_copies']}")
    print()

    # The first pass pays one-off costs (allocator growth, kernel selection) that no later pass sees.
    forward_backward(model, loaders)
    jobs: dict[str, Callable[[], object]] = {BASELINE: lambda: forward_backward(model, loaders)}
    jobs.update({name: (lambda name=name: compute_scores(name, model, *loaders, cfg)) for name in args.methods})
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    rss: dict[str, int | None] = dict.fromkeys(jobs)
    # Whole rounds rather than back-to-back repeats, so a burst of outside load hits one round of every job.
    for _ in range(args.repeats):
        for name, job in jobs.items():
            t, peak = timed(job)
            seconds[name].append(t)
            rss[name] = peak if rss[name] is None else max(rss[name], peak)
    # Best of the rounds: outside load only ever adds time.
    best = {name: min(ts) for name, ts in seconds.items()}

    base = seconds[BASELINE]
    print(f"baseline forward+backward: best {best[BASELINE]:.3f} s of {args.repeats} rounds "
          f"(slowest {max(base):.3f} s)")
    print()
    print("| method | best seconds | ratio to fwd+bwd | slowest seconds | peak RSS growth |")
    print("|---|---:|---:|---:|---:|")
    for name in jobs:
        print(f"| {name} | {best[name]:.3f} | {best[name] / best[BASELINE]:.2f}x | {max(seconds[name]):.3f} | "
              f"{mib(rss[name]) if rss[name] is not None else 'n/a'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
