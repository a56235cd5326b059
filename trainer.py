"""The one training loop for fine-tuning, knowledge injection and unlearning, with resumable checkpoints.

Distributed runs use plain torch.distributed: each rank takes its shard of every epoch (DistributedSampler,
seeded by epoch) and the gradients of the trainable tensors are averaged across ranks before each step.
With masked or LoRA training those tensors are small, so the all-reduce is too.

With DeepSpeed (ZeRO) the same loop drives the engine: the trainer, not DeepSpeed's global micro-step counter,
marks where an accumulation group ends, so both paths take the same optimizer steps, and DeepSpeed's own
checkpoint format holds its partitioned optimizer state beside the plain weights.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import get_scheduler

from checkpointer import Checkpointer
from dataloader import recording_loss_terms
from layout import TENSORBOARD_DIR
from runtime import ConfigError, init_single_process_group, is_main, rank, world_size

log = logging.getLogger("loc_unlearn")
CPU = torch.device("cpu")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainSettings:
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    grad_accum: int
    warmup_ratio: float
    lr_scheduler: str
    max_grad_norm: float
    seed: int
    save_checkpoint: bool
    save_steps: int
    save_each_epoch: bool
    group_by_length: bool = False
    deepspeed: str | None = None
    report_to: str = "none"  # or "tensorboard": scalars under <run dir>/tensorboard/ (rank 0)

    def steps_per_epoch(self, n_examples: int) -> int:
        micro = math.ceil(math.ceil(n_examples / world_size()) / self.batch_size)
        return math.ceil(micro / self.grad_accum)


class LengthGroupedBatchSampler:
    """This rank's batches of one epoch: examples of similar length together, the batches in random order.

    Each epoch is a seeded permutation, cut into mega-batches of `megabatch` global batches that are sorted by
    length and split into global batches (one micro-batch per rank); the global batches are then shuffled.
    Shuffling them matters: walking each sorted mega-batch from long to short examples (as transformers'
    LengthGroupedSampler does) slowed memorisation in fine-tuning (docs/BENCHMARKS.md). Like DistributedSampler,
    the permutation is padded with its first examples to a multiple of the world size.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, megabatch: int = 50):
        self.lengths, self.batch_size, self.seed, self.megabatch = lengths, batch_size, seed, megabatch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / world_size()) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order += order[: math.ceil(len(order) / world_size()) * world_size() - len(order)]
        span = self.batch_size * world_size()
        batches = []
        for start in range(0, len(order), span * self.megabatch):
            chunk = sorted(order[start:start + span * self.megabatch], key=self.lengths.__getitem__)
            batches += [chunk[i:i + span] for i in range(0, len(chunk), span)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[j][rank()::world_size()]


def train(
    model: torch.nn.Module,
    trainable: list[torch.nn.Parameter],
    dataset,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    settings: TrainSettings,
    checkpointer: Checkpointer,
    device: torch.device = CPU,
) -> Path:
    """Train `trainable` to minimise `loss_fn` over `dataset`; return the final checkpoint directory.

    A resumed run (checkpointer.resume() found a checkpoint) continues at its step with its optimizer state.
    """
    if settings.group_by_length:
        sampler = LengthGroupedBatchSampler(dataset.lengths(), settings.batch_size, settings.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=settings.seed)
        loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, collate_fn=dataset.collate)
    steps_per_epoch = settings.steps_per_epoch(len(dataset))
    total_steps = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, math.ceil(settings.warmup_ratio * total_steps),
                              total_steps)
    engine = _deepspeed_engine(model, trainable, optimizer, scheduler, settings, device) if settings.deepspeed else None
    step, history = checkpointer.restore_optimizer(optimizer, scheduler, engine)
    if step:
        log.info("resuming at step %d of %d", step, total_steps)

    board = _tensorboard(settings, checkpointer.run_dir, step)

    def save(final: bool = False) -> Path:
        if board is not None:
            board.flush()
        return checkpointer.save(model, step, total_steps, history, final, optimizer, scheduler, engine)

    model.train()
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not is_main(), dynamic_ncols=True)
    try:
        for epoch in range(step // steps_per_epoch, settings.epochs):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            skip_micro = (step - epoch * steps_per_epoch) * settings.grad_accum
            micro_batches = list(loader)
            for start in range(skip_micro, len(micro_batches), settings.grad_accum):
                started = time.perf_counter()
                means = _backward_group(model, micro_batches[start:start + settings.grad_accum], loss_fn, engine,
                                        device)
                tokens = means.pop("tokens")
                if not math.isfinite(means["loss"]):
                    raise NonFiniteLoss(f"loss became {means['loss']} at step {step + 1}; last good checkpoint is "
                                        f"kept in {checkpointer.run_dir}")
                grad_norm = _optimizer_step(trainable, optimizer, scheduler, engine, settings.max_grad_norm)
                step += 1
                history.append({"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in means.items()},
                                "lr": scheduler.get_last_lr()[0],
                                **({} if grad_norm is None else {"grad_norm": float(f"{grad_norm:.6g}")})})
                if board is not None:
                    _write_scalars(board, history[-1], tokens / (time.perf_counter() - started))
                progress.update(1)
                progress.set_postfix(loss=f"{means['loss']:.4f}", epoch=epoch)
                if settings.save_checkpoint and settings.save_steps > 0 and step % settings.save_steps == 0 \
                        and step < total_steps:
                    save()
            if settings.save_checkpoint and settings.save_each_epoch and step < total_steps:
                save()
        progress.close()
        return save(final=True)
    finally:
        progress.close()  # also on an error, so the bar is drawn before the entry point's one-line message
        if board is not None:
            board.close()


def _backward_group(model: torch.nn.Module, group: list[Any], loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
                    engine: Any, device: torch.device) -> dict[str, float]:
    """Forward and backward over one accumulation group. Returns the loss and the terms a composite loss records
    (`loss_<name>`, dataloader.loss_terms), each averaged over the group's micro-batches and the ranks, and the
    tokens (attention-mask ones) all ranks processed."""
    # Summed on the training device (NCCL serves no CPU tensor, and no .item() per micro-batch stalls the GPU).
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for i, batch in enumerate(group):
        tokens += _tokens(batch)
        with recording_loss_terms() as terms:
            loss = loss_fn(model, _to(batch, device)) / len(group)  # a short last group averages its own
        if engine is not None:
            engine.set_gradient_accumulation_boundary(i == len(group) - 1)
            engine.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()
        for name, value in {"loss": loss.detach(), **{f"loss_{k}": v / len(group) for k, v in terms.items()}}.items():
            sums[name] = sums[name] + value if name in sums else value.to(torch.float64)
    sums["tokens"] = torch.tensor(tokens, dtype=torch.float64, device=device)
    names = sorted(sums)  # the same on every rank: one loss
    means = dict(zip(names, _mean_across_ranks(torch.stack([sums[n] for n in names]))))
    return {**means, "tokens": round(means["tokens"] * world_size())}


def _optimizer_step(trainable: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                    engine: Any, max_grad_norm: float) -> float | None:
    """One optimizer step on the accumulated gradients; their norm before clipping (None when DeepSpeed has not
    computed one)."""
    if engine is not None:
        engine.step()  # reduces, clips, steps the optimizer and the scheduler at the boundary set above
        norm = engine.get_global_grad_norm()
    else:
        _average_gradients(trainable)
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return None if norm is None else float(norm)


def _tokens(batch: Any) -> int:
    """Tokens of a batch (the ones of its attention masks, every part), counted before it moves to the device."""
    if not isinstance(batch, dict):
        return 0
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return sum(_tokens(part) for part in batch.values())


# ---- TensorBoard (report_to=tensorboard): an optional dependency, imported only when asked for ----

REPORT_TO = ("none", "tensorboard")
TENSORBOARD_MISSING = "report_to=tensorboard needs the tensorboard package: pip install tensorboard==2.21.0"


def check_report_to(report_to: str) -> None:
    """Refuse an unknown `report_to`, or tensorboard without its package, with one line before any work."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"report_to={report_to!r}; expected one of {list(REPORT_TO)}")
    if report_to == "tensorboard":
        _summary_writer_class()


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def _tensorboard(settings: TrainSettings, run_dir: Path, step: int) -> Any:
    """Rank 0's writer into <run dir>/tensorboard/ when report_to=tensorboard, else None. Events past `step` (logged
    after the checkpoint a run resumes from) are purged: a resumed run's curves continue without a doubled stretch."""
    if settings.report_to != "tensorboard" or not is_main():
        return None
    return _summary_writer_class()(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=step + 1)


def _write_scalars(board: Any, record: dict[str, Any], tokens_per_s: float) -> None:
    """A history record as train/<key> (loss, loss_<term>, lr, grad_norm, epoch) at its step, plus the throughput."""
    for key, value in record.items():
        if key != "step":
            board.add_scalar(f"train/{key}", value, record["step"])
    board.add_scalar("train/tokens_per_s", tokens_per_s, record["step"])


def _deepspeed_engine(model, trainable, optimizer, scheduler, settings: TrainSettings, device: torch.device):
    """A DeepSpeed ZeRO engine over the same model, optimizer and schedule (only `trainable` is partitioned).

    bf16 trainable weights (full-parameter training of a bf16 model) turn on DeepSpeed's bf16 mode, whose ZeRO
    optimizer keeps fp32 master partitions; fp32 trainable values (masks, adapters) are optimised as they are.
    """
    import deepspeed

    init_single_process_group(device)  # DeepSpeed needs a process group, also in one plain `python` process
    config = json.loads(Path(settings.deepspeed).read_text())
    auto = {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": settings.grad_accum,
            "gradient_clipping": settings.max_grad_norm}
    config.update({k: v for k, v in auto.items() if config.get(k, "auto") == "auto"})
    config["train_batch_size"] = settings.batch_size * settings.grad_accum * world_size()
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = trainable[0].dtype == torch.bfloat16
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                      lr_scheduler=scheduler, config=config, dist_init_required=False)
    return engine


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _mean_across_ranks(values: torch.Tensor) -> Any:
    """The mean over the ranks: a float for a scalar, a list for a vector (one collective for all its values)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return (values / world_size()).tolist()


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size()
