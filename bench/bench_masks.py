"""Cost of each attribution method relative to one forward+backward pass over the same data, and to the
reference implementation: mask_generator.py as of git revision --reference (default: before issue 13's changes).

    python bench/bench_masks.py                                  # synthetic TOFU, tiny model
    python bench/bench_masks.py --data_path ../shared/data/tofu  # real TOFU (tiny model built for it)
    python bench/bench_masks.py --data_path ../shared/data/tofu --wide --methods memflex_down
        # peak memory on a random-init wide Llama (2 layers x 8192 value vectors, d_model 1024)

Every figure comes from one process and one run, so the ratios hold even when absolute times are inflated by
other load on the machine: the baseline and every method are timed in `--repeats` rounds and the best round
of each counts (outside load only ever adds time); the slowest round shows how much the load varied.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import multiprocessing
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

# common must come first: it puts the repo root on sys.path for the imports below.
from common import ROOT, RssPeak, add_common_args, check_common_args, forget_retain_rows, mib, print_header, tiny_model

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dataloader import IGNORE_INDEX, QADataset, nll_loss
from mask_generator import ATTRIBUTION_KNOBS, ATTRIBUTIONS, compute_scores
from masks import select_top
from models import family_config, load_model, load_tokenizer, value_vector_shape
from schema import unique_knobs

BASELINE = "forward+backward"
REFERENCE = "90aaa30"  # the last commit before issue 13's attribution changes
RATIO = 0.1  # masks compared at generate_mask.py's default ratio


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, n_examples=64)
    p.add_argument("--batch_size", type=int, default=None, help="default: get_mask_tofu.yaml's batch_size")
    p.add_argument("--ig_steps", type=int, default=None, help="default: ig_down's declared ig_steps")
    p.add_argument("--repeats", type=int, default=3, help="rounds of baseline + every method; the best round counts")
    p.add_argument("--methods", nargs="+", default=sorted(ATTRIBUTIONS), choices=sorted(ATTRIBUTIONS),
                   metavar="METHOD", help=f"attribution methods to time (default: all of {sorted(ATTRIBUTIONS)})")
    p.add_argument("--reference", default=REFERENCE, metavar="REV",
                   help="git revision whose mask_generator.py runs beside today's (default: %(default)s); '' for none")
    p.add_argument("--wide", nargs=3, type=int, default=None, metavar=("LAYERS", "D_FF", "D_MODEL"),
                   help="instead of timing: peak RSS of each method, today's vs the reference, on a random-init Llama "
                        "of this shape (e.g. 2 8192 1024), each run in a fresh forked process")
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.wide is not None and not args.reference:
        p.error("--wide compares against --reference; give a revision")
    return args


def method_config(args: argparse.Namespace) -> dict[str, Any]:
    """The method knobs generate_mask.py would use, so each method does its real amount of work."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "config" / "get_mask_tofu.yaml"))
    cfg.pop("hydra")
    cfg.pop("defaults")
    cfg.update({knob.name: knob.default for knob in unique_knobs(ATTRIBUTION_KNOBS.values())})
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


def reference_module(rev: str) -> types.ModuleType:
    """mask_generator.py as of git revision ``rev``, imported beside today's (with today's dataloader and models)."""
    source = subprocess.run(["git", "show", f"{rev}:mask_generator.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType("mask_generator_reference")
    module.__file__ = f"{rev}:mask_generator.py"
    sys.modules[module.__name__] = module  # dataclasses look their defining module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def same_mask(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(torch.equal(x, y) for x, y in zip(select_top(a, RATIO), select_top(b, RATIO)))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def in_fresh_process(fn: Callable[[], torch.Tensor]) -> tuple[int | None, torch.Tensor]:
    """(peak RSS growth, result) of fn() in a forked child: every child starts from the parent's memory state, so
    no run reuses memory another one freed."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so a later allocation that does not
        # fit the holes adds to the RSS although less is live; from 1 MiB up every block is mapped and unmapped on
        # its own, and the RSS follows the live tensors as a GPU allocator's peak would.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
        with RssPeak() as rss:
            result = fn()
        send.send((rss.peak_bytes, result.numpy()))  # a tensor would travel as shared memory the child takes along

    proc = ctx.Process(target=child)
    proc.start()
    peak, result = receive.recv()
    proc.join()
    return peak, torch.from_numpy(result)


def wide_model(n_layers: int, d_ff: int, d_model: int, vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layers,
                      num_attention_heads=d_model // 128, num_key_value_heads=d_model // 128,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).float().eval()


def wide_memory(args: argparse.Namespace, cfg: dict[str, Any], loaders: Sequence[DataLoader], vocab: int) -> None:
    model = wide_model(*args.wide, vocab, args.seed)
    reference = reference_module(args.reference)
    print(f"model: random-init Llama, {args.wide[0]} layers x {args.wide[1]} value vectors, d_model {args.wide[2]}, "
          f"vocab {vocab} ({model.num_parameters():,} parameters); reference: {reference.__file__}")
    print()
    print("| method | peak RSS growth | reference peak RSS growth | ratio | max score difference / max score "
          "| same mask |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.methods:
        peak, scores = in_fresh_process(functools.partial(compute_scores, name, model, *loaders, cfg))
        ref_peak, ref_scores = in_fresh_process(functools.partial(reference.compute_scores, name, model, *loaders, cfg))
        ratio = f"{peak / ref_peak:.2f}x" if peak is not None and ref_peak else "n/a"
        print(f"| {name} | {mib(peak or 0)} | {mib(ref_peak or 0)} | {ratio} | "
              f"{relative_difference(scores, ref_scores):.1e} | {same_mask(scores, ref_scores)} |")


def timed(fn: Callable[[], object]) -> tuple[float, int | None, object]:
    with RssPeak() as rss:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, rss.peak_bytes, result


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
    forget, retain = (QADataset.from_rows(rows, tokenizer, family, family["max_length"])
                      for rows in (forget_rows, retain_rows))
    loaders = [DataLoader(ds, batch_size=cfg["batch_size"], collate_fn=ds.collate) for ds in (forget, retain)]
    n_layers, d_ff = value_vector_shape(model)
    n_tokens = sum(int((ds.collate(ds.items)["labels"] != IGNORE_INDEX).sum()) for ds in (forget, retain))
    print(f"model: {model_path} ({model.num_parameters():,} parameters, {n_layers} layers x {d_ff} value vectors)")
    print(f"data: {args.data_path}, {len(forget)} {args.forget_split} + {len(retain)} retain examples "
          f"({n_tokens} answer tokens), batch_size {cfg['batch_size']}, ig_steps {cfg['ig_steps']}, "
          f"memflex_copies {cfg['memflex_copies']}, "
          f"memflex_micro_batch {cfg['memflex_micro_batch']}, ig_alpha_batch {cfg['ig_alpha_batch']}")
    if args.wide is not None:
        wide_memory(args, cfg, loaders, len(tokenizer))
        return 0
    print(f"reference: {args.reference}:mask_generator.py" if args.reference else "reference: none")
    print()

    # The first pass pays one-off costs (allocator growth, kernel selection) that no later pass sees.
    forward_backward(model, loaders)
    jobs: dict[str, Callable[[], object]] = {BASELINE: lambda: forward_backward(model, loaders)}
    jobs.update({name: (lambda name=name: compute_scores(name, model, *loaders, cfg)) for name in args.methods})
    if args.reference:
        reference = reference_module(args.reference)
        jobs.update({f"{name} (reference)": (lambda name=name: reference.compute_scores(name, model, *loaders, cfg))
                     for name in args.methods})
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    rss: dict[str, int | None] = dict.fromkeys(jobs)
    scores: dict[str, object] = {}
    # Whole rounds rather than back-to-back repeats, so a burst of outside load hits one round of every job.
    for _ in range(args.repeats):
        for name, job in jobs.items():
            t, peak, scores[name] = timed(job)
            seconds[name].append(t)
            rss[name] = peak if rss[name] is None else max(rss[name], peak)
    # Best of the rounds: outside load only ever adds time.
    best = {name: min(ts) for name, ts in seconds.items()}

    base = seconds[BASELINE]
    print(f"baseline forward+backward: best {best[BASELINE]:.3f} s of {args.repeats} rounds "
          f"(slowest {max(base):.3f} s)")
    print()
    print("| method | best seconds | ratio to fwd+bwd | slowest seconds | peak RSS growth | ratio to reference "
          "| max score difference / max score | same mask |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in jobs:
        ref = f"{name} (reference)"
        versus = (f"{best[name] / best[ref]:.2f}x | {relative_difference(scores[name], scores[ref]):.1e} | "
                  f"{same_mask(scores[name], scores[ref])}" if ref in jobs else " |  | ")
        print(f"| {name} | {best[name]:.3f} | {best[name] / best[BASELINE]:.2f}x | {max(seconds[name]):.3f} | "
              f"{mib(rss[name]) if rss[name] is not None else 'n/a'} | {versus} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
