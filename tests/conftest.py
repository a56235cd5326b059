"""Shared fixtures: the real TOFU directory (when present beside the repo) and a tiny model on synthetic data."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("TOFU_DIR", ROOT.parent / "shared" / "data" / "tofu"))

# Tests share two cores with subprocess runs; one thread each avoids OpenMP oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tofu_dir() -> Path:
    if not (TOFU_DIR / "full.json").is_file():
        pytest.skip(f"real TOFU files not found at {TOFU_DIR} (set TOFU_DIR)")
    return TOFU_DIR


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The tiny family's initial model for the synthetic data (built once, cached under .cache/)."""
    from models import tiny_model_path

    return tiny_model_path("synthetic", 0)


def run_script(*args: str, nproc: int = 1, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (python X.py or torchrun), returning the completed process."""
    # Passive OpenMP waits: spinning threads of concurrent processes would starve each other on 2 cores.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The entry points point the root logger at the captured stdout of the test that ran them; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
