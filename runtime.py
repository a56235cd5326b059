"""Process-level plumbing shared by the entry points: distributed setup, seeding, atomic writes, logging."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("loc_unlearn")


class ConfigError(ValueError):
    """A bad config value: the entry points print it as one line and exit with status 2."""


def process_group_backend(device_type: str, accelerator_backend: str = "nccl") -> str:
    """The backend string of a process group for models on `device_type`.

    NCCL serves CUDA tensors only, so a CUDA group also gets gloo for CPU tensors (object collectives, a CPU scalar
    anywhere): with "nccl" alone they fail on GPU nodes, and never in a gloo-only CPU test.
    """
    if device_type == "cuda":
        return f"cpu:gloo,cuda:{accelerator_backend}"
    return "gloo"


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; return (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(process_group_backend(device.type))
    return rank(), world_size, device


def init_single_process_group(device: torch.device) -> None:
    """A one-rank process group for libraries that need one (DeepSpeed) when not launched by torchrun."""
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # what torchrun would set
            os.environ.setdefault(key, value)
        dist.init_process_group(process_group_backend(device.type), store=dist.HashStore(), rank=0, world_size=1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (used for decisions that must agree, e.g. the resume step)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging() -> None:
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that is renamed onto `final` only on success.

    A killed process therefore never leaves something at `final` that looks finished.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    shutil.rmtree(tmp)
    try:
        yield tmp
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_writable(directory: str | os.PathLike) -> None:
    """Fail before any heavy work if results could not be written."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output directory {directory} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"output directory {directory} is not writable (checked {probe})")


def run_main(main_fn) -> None:
    """Run an entry point's body; a ConfigError becomes one clear line on stderr and exit status 2."""
    try:
        main_fn()
    except ConfigError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # always one line
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def shard(n: int) -> list[int]:
    """This rank's share of n items, strided and without padding (sums over ranks count every item once)."""
    return list(range(rank(), n, world_size()))
