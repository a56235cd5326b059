"""Masked vs full-parameter unlearning (step time, optimizer state) and cached vs resident reference (peak RSS).

    python bench/bench_unlearn.py                                  # synthetic TOFU, tiny model, npo
    python bench/bench_unlearn.py --data_path ../shared/data/tofu --loss npo --steps 30

(a) One process trains two copies of the same model on the same batches with the same loss and AdamW: one with
    only a random `--ratio` of the value vectors trainable (masking.MaskedValues), one with every
    parameter.  Steps of the two alternate, so load from other jobs falls on both alike.
(b) Two subprocesses (so their peaks do not mix) each load the model and run `--ref_steps` masked npo steps:
    one with the reference NLL cached once before training (what unlearn.py does for npo), one keeping a second
    copy of the model resident and computing the reference NLL every step.  Their peak RSS are compared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

# common must come first: it puts the repo root on sys.path for the imports below.
from common import (
    LLAMA31_8B_PARAMS,
    LLAMA31_8B_VALUE_PARAMS,
    add_common_args,
    check_common_args,
    current_rss_bytes,
    forget_retain_rows,
    mib,
    peak_rss_bytes,
    print_header,
    tensor_bytes,
    tiny_model,
)

import torch
from torch.utils.data import DataLoader

from dataloader import LossSpec, UnlearnDataset, get_loss, load_idk, sequence_nll
from mask_generator import compute_scores
from masking import MaskedValues
from masks import select_top
from models import family_config, load_model, load_tokenizer, value_vector_shape
from runtime import ConfigError
from unlearn import reference_nll

CPU = torch.device("cpu")
REF_MODES = ("cached", "resident")
RESULT_PREFIX = "RESULT "
STATE_GOAL = 0.05
STEP_TIME_GOAL = 1.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, n_examples=64)
    p.add_argument("--loss", default="npo", help="forget loss of part (a) (part (b) is always npo)")
    p.add_argument("--ratio", type=float, default=0.1, help="fraction of value vectors trainable in the masked run")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run in part (a)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per run before timing")
    p.add_argument("--ref_steps", type=int, default=10, help="training steps of each part (b) subprocess")
    p.add_argument("--batch_size", type=int, default=None, help="default: the tiny family's batch_size")
    p.add_argument("--ref_worker", choices=REF_MODES, help=argparse.SUPPRESS)  # internal: one part (b) subprocess
    args = p.parse_args(argv)
    check_common_args(p, args)
    if min(args.steps, args.ref_steps) < 1 or args.warmup < 0:
        p.error("--steps and --ref_steps must be >= 1, --warmup >= 0")
    if not 0 < args.ratio <= 1:
        p.error("--ratio must be in (0, 1]")
    try:
        get_loss(args.loss)
    except ConfigError as err:
        p.error(str(err))
    return args


class Setup:
    """Model path, data and loss config shared by every run of one invocation."""

    def __init__(self, args: argparse.Namespace, loss: str):
        self.args = args
        self.spec: LossSpec = get_loss(loss)
        self.model_path = tiny_model(args.model_path, args.data_path)
        family = family_config("tiny")
        self.batch_size = args.batch_size or family["batch_size"]
        tokenizer = load_tokenizer("tiny", self.model_path)
        forget_rows, retain_rows = forget_retain_rows(args.data_path, args.forget_split, args.n_examples, args.seed)
        self.dataset = UnlearnDataset(forget_rows, retain_rows, load_idk(None), tokenizer, family, family["max_length"],
                                      self.spec.parts, args.seed)
        self.loss_cfg = {"hyper_param": self.spec.default_hyper_param, "retain_weight": 1.0, "simnpo_gamma": 0.0,
                         "seed": args.seed}
        self.lr, self.weight_decay = family["lr"], family["weight_decay"]

    def load(self) -> torch.nn.Module:
        return load_model(self.model_path, CPU)

    def cache_reference(self, model: torch.nn.Module) -> None:
        for part in self.spec.cached_ref:
            self.dataset.ref_nll[part] = reference_nll(model, self.dataset, part, self.batch_size, CPU)

    def batches(self) -> list[dict[str, Any]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.dataset.collate)
        return list(loader)

    def masked(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """A random mask of `ratio` of the value vectors (random_down + select_top, as generate_mask.py builds one)."""
        scores = compute_scores("random_down", model, None, None, {"seed": self.args.seed})
        return MaskedValues(select_top(scores, self.args.ratio)).attach(model).parameters()


class Run:
    """One model, its trainable tensors and AdamW, stepping the loss the way trainer.train does."""

    def __init__(self, setup: Setup, model: torch.nn.Module, trainable: list[torch.nn.Parameter],
                 ref_model: torch.nn.Module | None):
        self.setup, self.model, self.trainable, self.ref_model = setup, model.train(), trainable, ref_model
        self.optimizer = torch.optim.AdamW(trainable, lr=setup.lr, weight_decay=setup.weight_decay)
        self.times: list[float] = []

    def step(self, batch: dict[str, Any], timed: bool) -> None:
        start = time.perf_counter()
        self.setup.spec(self.model, batch, self.ref_model, self.setup.loss_cfg).backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.times.append(time.perf_counter() - start)

    def state_bytes(self) -> int:
        return sum(tensor_bytes(state.values()) for state in self.optimizer.state.values())


def masked_vs_full(args: argparse.Namespace) -> None:
    setup = Setup(args, args.loss)
    full_model, masked_model = setup.load(), setup.load()
    setup.cache_reference(full_model)
    # rt_diff's reference is a retain-trained model; any model of the same shape costs the same.
    ref_model = setup.load().eval().requires_grad_(False) if setup.spec.resident_ref else None
    n_layers, d_ff = value_vector_shape(full_model)
    runs = {"masked": Run(setup, masked_model, setup.masked(masked_model), ref_model),
            "full": Run(setup, full_model, list(full_model.parameters()), ref_model)}
    batches = setup.batches()
    print(f"## (a) masked vs full-parameter unlearning: loss {args.loss}, {len(setup.dataset)} {args.forget_split} "
          f"examples (+ retain), batch_size {setup.batch_size}, AdamW lr {setup.lr}, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, steps alternating between the runs")
    print(f"model: {setup.model_path} ({full_model.num_parameters():,} parameters, {n_layers} x {d_ff} value vectors)")
    for i in range(args.warmup + args.steps):
        # Alternate which run goes first so neither always follows the other's cache footprint.
        order = ("masked", "full") if i % 2 == 0 else ("full", "masked")
        for name in order:
            runs[name].step(batches[i % len(batches)], timed=i >= args.warmup)

    print()
    print("| run | trainable values | mean step (s) | median step (s) | optimizer state |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(f"| {name} | {sum(p.numel() for p in run.trainable):,} | {statistics.fmean(run.times):.4f} | "
              f"{statistics.median(run.times):.4f} | {run.state_bytes():,} B ({mib(run.state_bytes())}) |")
    masked, full = runs["masked"], runs["full"]
    state_ratio = masked.state_bytes() / full.state_bytes()
    time_ratio = statistics.fmean(masked.times) / statistics.fmean(full.times)
    median_ratio = statistics.median(masked.times) / statistics.median(full.times)
    print()
    print(f"optimizer state ratio masked/full: {state_ratio:.4f} (goal <= {STATE_GOAL}: "
          f"{'met' if state_ratio <= STATE_GOAL else 'NOT met'})")
    llama_ratio = args.ratio * LLAMA31_8B_VALUE_PARAMS / LLAMA31_8B_PARAMS
    print(f"for scale, Llama-3.1-8B: AdamW state scales with trainable values, so the ratio would be "
          f"{args.ratio} x {LLAMA31_8B_VALUE_PARAMS:,} / {LLAMA31_8B_PARAMS:,} = {llama_ratio:.4f}")
    print(f"step time ratio masked/full: {time_ratio:.3f} mean, {median_ratio:.3f} median (goal <= {STEP_TIME_GOAL}: "
          f"{'met' if time_ratio <= STEP_TIME_GOAL else 'NOT met'})")


def ref_worker(args: argparse.Namespace) -> None:
    """One part (b) measurement; prints a RESULT line with this process's peak RSS."""
    setup = Setup(args, "npo")
    model = setup.load()
    model_bytes, n_params = tensor_bytes(model.parameters()), model.num_parameters()  # before masking adds tensors
    ref_model = None
    start = time.perf_counter()
    if args.ref_worker == "cached":
        setup.cache_reference(model)
    else:
        ref_model = setup.load().eval().requires_grad_(False)
    run = Run(setup, model, setup.masked(model), None)
    batches = setup.batches()
    for i in range(args.ref_steps):
        batch = batches[i % len(batches)]
        if ref_model is not None:
            with torch.no_grad():
                batch["forget"]["ref_nll"] = sequence_nll(ref_model, batch["forget"])
        run.step(batch, timed=False)
    seconds = time.perf_counter() - start
    print(RESULT_PREFIX + json.dumps({"peak_rss": peak_rss_bytes(), "end_rss": current_rss_bytes(), "seconds": seconds,
                                      "model_bytes": model_bytes, "n_params": n_params}))


def run_ref_worker(mode: str, argv: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--ref_worker", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"part (b) subprocess {mode!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def cached_vs_resident(args: argparse.Namespace, argv: Sequence[str]) -> None:
    print(f"## (b) npo reference: cached NLL vs resident second model, peak RSS of separate processes "
          f"({args.ref_steps} masked training steps each)")
    res = {mode: run_ref_worker(mode, argv) for mode in REF_MODES}
    cached, resident = res["cached"], res["resident"]
    print()
    print("| reference | peak RSS (VmHWM) | RSS after the steps | reference + steps (s) |")
    print("|---|---:|---:|---:|")
    for mode in REF_MODES:
        end = res[mode]["end_rss"]
        print(f"| {mode} | {mib(res[mode]['peak_rss'])} | {mib(end) if end is not None else 'n/a'} | "
              f"{res[mode]['seconds']:.2f} |")
    print()
    print(f"peak RSS ratio resident/cached: {resident['peak_rss'] / cached['peak_rss']:.3f} "
          f"(measured difference {mib(resident['peak_rss'] - cached['peak_rss'])}; on the tiny model the Python/torch "
          f"baseline and allocator noise dominate both)")
    print(f"analytical saving of the cache: one model's parameters = {cached['model_bytes']:,} B "
          f"({mib(cached['model_bytes'])}, {cached['n_params']:,} parameters at "
          f"{cached['model_bytes'] // cached['n_params']} B each)")
    llama_bytes = LLAMA31_8B_PARAMS * 2
    print(f"for scale, Llama-3.1-8B in bf16: {LLAMA31_8B_PARAMS:,} parameters x 2 B = {llama_bytes / 1e9:.1f} GB "
          f"({llama_bytes / 2**30:.1f} GiB) not held")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.ref_worker:
        ref_worker(args)
        return 0
    print_header("masked vs full unlearning; cached vs resident reference")
    torch.manual_seed(args.seed)
    masked_vs_full(args)
    print()
    cached_vs_resident(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
