"""What both benchmark scripts share: repo imports, the machine header, data and RSS probes."""
from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The scripts run as `python bench/X.py`, which puts bench/ (not the repo root) on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# With active waiting, idle OpenMP threads spin for the CPU; on a machine shared with other jobs that made
# one forward+backward vary 80-fold between rounds.  Passive waiting keeps torch's thread count and removes the
# spin; set OMP_WAIT_POLICY yourself to measure otherwise.  It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402

from models import resolve_model_path  # noqa: E402
from tofu import load_tofu, retain_split_for  # noqa: E402

# meta-llama/Llama-3.1-8B(-Instruct), embeddings and lm_head untied: for the at-scale lines of the reports.
LLAMA31_8B_PARAMS = 8_030_261_248
LLAMA31_8B_VALUE_PARAMS = 32 * 14336 * 4096  # n_layers x d_ff value vectors of d_model each


def add_common_args(p: argparse.ArgumentParser, n_examples: int) -> None:
    p.add_argument("--data_path", default="synthetic", help="TOFU directory of JSON-lines files, or `synthetic`")
    p.add_argument("--forget_split", default="forget10", help="forget split; its complement is the retain split")
    p.add_argument("--n_examples", type=int, default=n_examples, help="forget examples, and as many retain examples")
    p.add_argument("--model_path", default=None, help="a tiny-family model directory, e.g. a fine-tuned checkpoint "
                   "(default: the initial tiny model for --data_path)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=42)


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.n_examples < 1:
        p.error("--n_examples must be >= 1")
    set_threads(p, args.threads)


def set_threads(p: argparse.ArgumentParser, threads: int | None) -> None:
    """--threads: torch's intra-op threads, or torch's own choice when None."""
    if threads is None:
        return
    if threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(threads)


def print_header(title: str) -> None:
    """Command line and machine, so pasted figures carry the conditions they were measured under."""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"# {title}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{cores} cores ({usable} usable), torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average (1/5/15 min) {load}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print()


def tiny_model(model_path: str | None, data_path: str) -> str:
    """An explicit model directory, else the tiny family's initial model for this data source (built once)."""
    return resolve_model_path("tiny", model_path, data_path)


def forget_retain_rows(data_path: str, forget_split: str, n_examples: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The first n forget rows and a seeded random n of the complementary retain split (as generate_mask.py draws)."""
    forget = load_tofu(forget_split, data_path)[:n_examples]
    retain_all = load_tofu(retain_split_for(forget_split), data_path)
    picked = sorted(random.Random(seed).sample(range(len(retain_all)), min(n_examples, len(retain_all))))
    return forget, [retain_all[i] for i in picked]


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_python(*args: str, what: str | None = None) -> float:
    """Seconds of wall time of `python args...` in the repository root; on failure, exit with its stderr's tail.
    what: the step's name in that message (default: args[0], the script)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what or args[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def touch(model: torch.nn.Module, page_bytes: int = 4096) -> None:
    """Read one value of every memory page of a model's weights (memory-mapped safetensors are read on first use)."""
    for tensor in model.state_dict().values():
        tensor.view(-1)[::page_bytes // tensor.element_size()].sum()


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, the high-water mark of the current address space.  ru_maxrss is not used there because it
    survives execve: a child that subprocess starts with vfork reports the parent's peak if that was higher.
    """
    try:
        return _status_bytes("VmHWM")
    except OSError:  # no /proc: ru_maxrss, which is bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def current_rss_bytes() -> int | None:
    """Resident set size now (Linux; None elsewhere)."""
    try:
        return _status_bytes("VmRSS")
    except OSError:
        return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


class RssPeak:
    """Peak resident-set growth over a block: VmHWM is reset on entry (clear_refs 5) and read on exit.

    ru_maxrss is a process-wide high-water mark, so a block that stays below an earlier peak would read 0.
    Memory the allocator freed but kept mapped from an earlier block can be reused without RSS growth, so
    figures are lower bounds.  Linux >= 4.0 only; elsewhere peak_bytes stays None.
    """

    def __init__(self) -> None:
        self.peak_bytes: int | None = None

    def __enter__(self) -> RssPeak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start: int | None = _status_bytes("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.peak_bytes = max(0, _status_bytes("VmHWM") - self._start)
