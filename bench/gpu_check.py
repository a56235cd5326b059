"""Checks at the real shapes on one GPU, from random-init models and synthetic tokens (nothing downloaded).

    python bench/gpu_check.py            # one GPU; meant to take under 8 minutes on an H200 (not yet run on one)
    python bench/gpu_check.py --tiny     # tiny shapes on the CPU (the test suite runs this)

Prints one JSON line per check:
- masked_npo (Llama-3.1-8B and OLMo-2-7B shapes): 1 + 3 npo steps on a 10% random mask, bf16 model with fp32
  masked values (masking.MaskedValues, dataloader's npo, AdamW and clipping as trainer.train does them);
  peak memory, seconds per step, and the fraction of masked values changed at lr 1e-5 in the fp32 masters and in
  the bf16 checkpoint (masking.plain_state_dict).
- full_deepspeed: one full-parameter step through trainer's DeepSpeed engine (config/ds_config.json, ZeRO-2, one
  process). 8B with fp32 masters and Adam state does not fit one GPU without offloading (bench/bench_memory.py),
  so this check keeps the Llama width with 8 layers, and reports its parameters beside its peak.
- evaluation: evaluator.score_answers over 128 sequences and evaluator.generate_answers, 128 greedy generations
  of 200 new tokens (the tiny family's tokenizer and chat format; ids it lacks decode to nothing).
- attribution: mask_generator.compute_scores for bench_memory's method over one forget and one retain batch.

Steps go through the project's functions but not trainer.train, which ends by saving a checkpoint: at 8B that
would write the optimizer state to disk and time the disk.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# common must come first: it puts the repo root on sys.path for the imports below.
from common import ROOT

import torch
from torch import nn

from dataloader import REF_NLL_KEY, get_loss
from evaluator import generate_answers, score_answers
from mask_generator import compute_scores
from masking import MASKED_VALUES, MaskedValues, masked_modules, plain_state_dict
from models import family_config, load_tokenizer, tiny_model_path
from trainer import TrainSettings, _deepspeed_engine

from bench_memory import ATTRIBUTION, CONFIG, SHAPES, build, random_mask, reshaped, synthetic_part

LR = 1e-5


@dataclass(frozen=True)
class Sizes:
    divisor: int          # d_model and d_ff divided by this (bench_memory.narrow)
    layers: int | None    # None: the shape's own depth
    batch: int            # sequences per part of a training step
    seq_len: int
    steps: int
    full_layers: int      # depth of the full-parameter DeepSpeed check
    eval_sequences: int
    new_tokens: int
    attribution_batch: int


FULL = Sizes(divisor=1, layers=None, batch=4, seq_len=512, steps=3, full_layers=8, eval_sequences=128,
             new_tokens=200, attribution_batch=8)
TINY = Sizes(divisor=64, layers=2, batch=2, seq_len=32, steps=2, full_layers=2, eval_sequences=4, new_tokens=8,
             attribution_batch=2)


def shape(family: str, sizes: Sizes, layers: int | None = None) -> Any:
    return reshaped(SHAPES[family], sizes.divisor, layers or sizes.layers)


def on_device(config: Any, device: torch.device) -> nn.Module:
    return build(config, str(device)).train()


def reset_peak(device: torch.device) -> None:
    gc.collect()  # the previous check's model and engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory since the check began (null on a CPU, which keeps no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def npo_batch(config: Any, sizes: Sizes, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    spec = get_loss("npo")
    batch = {p: {k: v.to(device) for k, v in synthetic_part(config.vocab_size, sizes.batch, sizes.seq_len).items()}
             for p in spec.parts}
    for part in spec.cached_ref:  # a reference NLL of one nat per answer token
        batch[part][REF_NLL_KEY] = torch.full((sizes.batch,), float(sizes.seq_len // 2), device=device)
    return batch


def timed_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step after one untimed warm-up step."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def check_masked_npo(family: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    config = shape(family, sizes)
    model = on_device(config, device)
    trainable = MaskedValues(random_mask(model)).attach(model).parameters()
    before = [p.detach().clone() for p in trainable]  # fp32 copies of the bf16 values: exact
    spec, batch = get_loss("npo"), npo_batch(config, sizes, device)
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=family_config(family)["weight_decay"])
    cfg = {"hyper_param": spec.default_hyper_param, "retain_weight": 1.0, "seed": 0}

    def step() -> None:
        spec(model, batch, None, cfg).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, sizes.steps, device)
    peak = peak_gib(device)
    n_masked = sum(p.numel() for p in trainable)
    moved = sum((b != p).sum().item() for b, p in zip(before, trainable)) / n_masked
    saved = plain_state_dict(model)
    downs = masked_modules(model)
    moved_saved = sum((saved[f"{n}.weight"][:, m.mask_index] != b.to(saved[f"{n}.weight"].dtype)).sum().item()
                      for (n, m), b in zip(downs, before)) / n_masked
    return {"parameters": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(MASKED_VALUES)),
            "masked_values": n_masked, "peak_gib": peak, "steps": sizes.steps + 1, "s_per_step": round(seconds, 4),
            "changed_fp32_masters": round(moved, 4), "changed_bf16_checkpoint": round(moved_saved, 4)}


def check_full_deepspeed(family: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    config = shape(family, sizes, sizes.full_layers)
    model = on_device(config, device)
    trainable = list(model.parameters())
    settings = TrainSettings(lr=LR, weight_decay=0.01, epochs=1, batch_size=sizes.batch, grad_accum=1,
                             warmup_ratio=0.0, lr_scheduler="constant", max_grad_norm=1.0, seed=0,
                             save_checkpoint=False, save_steps=0, save_each_epoch=False,
                             deepspeed=str(ROOT / "config" / "ds_config.json"))
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    engine = _deepspeed_engine(model, trainable, optimizer, scheduler, settings, device)
    spec = get_loss("learn")
    batch = {"forget": {k: v.to(device) for k, v in synthetic_part(config.vocab_size, sizes.batch,
                                                                    sizes.seq_len).items()}}

    def step() -> None:
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(spec(model, batch, None, {}), scale_wrt_gas=False)
        engine.step()

    seconds = timed_steps(step, sizes.steps, device)
    return {"parameters": sum(p.numel() for p in trainable), "layers": config.num_hidden_layers,
            "bf16": engine.bfloat16_enabled(), "zero_stage": engine.zero_optimization_stage(),
            "peak_gib": peak_gib(device), "steps": sizes.steps + 1, "s_per_step": round(seconds, 4)}


def check_evaluation(family: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    config = shape(family, sizes)
    model = on_device(config, device).eval()
    part = synthetic_part(config.vocab_size, sizes.eval_sequences, sizes.seq_len)
    encodings = [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(part["input_ids"], part["labels"])]
    start = time.perf_counter()
    score_answers(model, encodings, batch_size=CONFIG["eval_tofu"]["batch_size"])
    scoring = time.perf_counter() - start
    tokenizer = load_tokenizer("tiny", str(tiny_model_path("synthetic")))
    prompts = [e["input_ids"][: sizes.seq_len // 2] for e in encodings]
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, family_config("tiny"), prompts,
                               batch_size=CONFIG["eval_tofu"]["generation_batch_size"], max_new_tokens=sizes.new_tokens)
    return {"parameters": sum(p.numel() for p in model.parameters()), "scored_sequences": len(encodings),
            "scoring_s": round(scoring, 3), "generations": len(answers), "max_new_tokens": sizes.new_tokens,
            "generation_s": round(time.perf_counter() - start, 3), "peak_gib": peak_gib(device)}


def check_attribution(family: str, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    config = shape(family, sizes)
    model = on_device(config, device)
    forget, retain = ([{k: v.to(device) for k, v in synthetic_part(config.vocab_size, sizes.attribution_batch,
                                                                    sizes.seq_len).items()}] for _ in range(2))
    start = time.perf_counter()
    scores = compute_scores(ATTRIBUTION, model, forget, retain, {"progress": False})
    return {"method": ATTRIBUTION, "parameters": sum(p.numel() for p in model.parameters()),
            "scores_finite": bool(torch.isfinite(scores).all()), "s": round(time.perf_counter() - start, 3),
            "peak_gib": peak_gib(device)}


# DeepSpeed's engine last: it may keep references to its model after the check.
CHECKS = [("masked_npo", "llama3.1-8b-inst", check_masked_npo), ("masked_npo", "olmo2-7b-inst", check_masked_npo),
          ("evaluation", "llama3.1-8b-inst", check_evaluation), ("attribution", "llama3.1-8b-inst", check_attribution),
          ("full_deepspeed", "llama3.1-8b-inst", check_full_deepspeed)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run of every check")
    p.add_argument("--only", action="append", choices=sorted({name for name, _, _ in CHECKS}),
                   help="run only these checks (repeatable)")
    args = p.parse_args()
    sizes = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no GPU visible; --tiny runs the checks at tiny shapes on the CPU")
    for name, family, check in CHECKS:
        if args.only and name not in args.only:
            continue
        reset_peak(device)
        result = check(family, sizes, device)
        print(json.dumps({"check": name, "shape": family, "device": str(device), **result}), flush=True)


if __name__ == "__main__":
    main()
