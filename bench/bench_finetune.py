"""Fine-tuning step time: what the answer-only LM head and length-grouped batches each save.

    python bench/bench_finetune.py                                      # synthetic TOFU, tiny model
    python bench/bench_finetune.py --data_path ../shared/data/tofu --threads 1

One process times full-parameter AdamW steps of the `learn` loss (batch size of the tiny family) on `--split`
under four settings, each on its own copy of the same model, with the steps of the four interleaved so that
load from other jobs falls on all alike:

- baseline: random batches, NLL from the model's full (B, T, V) logits;
- answer head: random batches, `dataloader.nll_loss` (the LM head applied at answer positions only);
- grouped: `trainer.LengthGroupedBatchSampler` batches, full logits;
- both: what `unlearn.py` does for the tiny family.

It prints the mean step time of each and its ratio to the baseline, and the seconds per epoch they imply.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

# common must come first: it puts the repo root on sys.path for the imports below.
from common import print_header, set_threads, tiny_model

import torch

from dataloader import IGNORE_INDEX, QADataset, nll_loss, token_nll_from_logits
from models import family_config, load_model, load_tokenizer
from tofu import load_tofu
from trainer import LengthGroupedBatchSampler

CPU = torch.device("cpu")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="synthetic", help="TOFU directory of JSON-lines files, or `synthetic`")
    p.add_argument("--split", default="full", help="split fine-tuned on")
    p.add_argument("--model_path", default=None, help="a tiny-family model (default: the initial tiny model)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    set_threads(p, args.threads)
    return args


def full_logit_mean_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    nll, mask = token_nll_from_logits(logits, batch["labels"])
    return nll.sum() / mask.sum()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print_header("fine-tuning step time (bench/bench_finetune.py)")
    path = tiny_model(args.model_path, args.data_path)
    family = family_config("tiny")
    tokenizer = load_tokenizer("tiny", path)
    data = QADataset.from_rows(load_tofu(args.split, args.data_path), tokenizer, family, family["max_length"])
    lengths = [len(e["input_ids"]) for e in data.items]
    answer = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in data.items)
    bs, n_batches = family["batch_size"], args.warmup + args.steps
    print(f"{args.split}: {len(data)} examples, mean length {statistics.mean(lengths):.1f} tokens "
          f"(max {max(lengths)}), answer tokens {answer / sum(lengths):.0%} of all; batch size {bs}; model {path}\n")

    order = list(range(len(data)))
    random.Random(args.seed).shuffle(order)
    random_batches = [order[i:i + bs] for i in range(0, bs * n_batches, bs)]
    sampler = LengthGroupedBatchSampler(lengths, bs, args.seed)
    grouped_batches = list(sampler)[:n_batches]
    settings = {
        "baseline (random batches, full logits)": (random_batches, full_logit_mean_nll),
        "answer-only head": (random_batches, nll_loss),
        "length-grouped batches": (grouped_batches, full_logit_mean_nll),
        "both (unlearn.py, tiny)": (grouped_batches, nll_loss),
    }
    runs = {}
    for name, (batches, loss_fn) in settings.items():
        torch.manual_seed(args.seed)
        model = load_model(path, CPU).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=family["lr"], weight_decay=family["weight_decay"])
        runs[name] = (model, optimizer, [data.collate([data[i] for i in b]) for b in batches], loss_fn, [])

    for step in range(n_batches):
        for model, optimizer, batches, loss_fn, times in runs.values():
            start = time.perf_counter()
            loss_fn(model, batches[step]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)

    steps_per_epoch = len(sampler)
    base = statistics.mean(runs["baseline (random batches, full logits)"][4])
    print("| setting | tokens per batch | mean step (s) | ratio to baseline | s per epoch |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, _, batches, _, times) in runs.items():
        tokens = statistics.mean(b["input_ids"].numel() for b in batches[args.warmup:])
        mean = statistics.mean(times)
        print(f"| {name} | {tokens:.0f} | {mean:.4f} | {mean / base:.2f}x | {mean * steps_per_epoch:.1f} |")


if __name__ == "__main__":
    main()
