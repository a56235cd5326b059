"""Process-level plumbing shared by the entry points: distributed setup, seeding, logging; the torch-free part
(config errors, atomic writes, run_main) lives in io_utils.py and is re-exported here."""
from __future__ import annotations

import logging
import os
import random
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Re-exported, so that library modules take all their process plumbing from here (the entry points import the
# torch-free part from io_utils, where it is defined).
from io_utils import ConfigError, atomic_path, check_writable, run_main, write_json  # noqa: F401

log = logging.getLogger("loc_unlearn")


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


def shard(n: int) -> list[int]:
    """This rank's share of n items, strided and without padding (sums over ranks count every item once)."""
    return list(range(rank(), n, world_size()))
