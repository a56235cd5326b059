"""Torch-free process plumbing: the config error, atomic writes and the entry-point wrapper.

Kept apart from runtime.py (which imports torch, ~5 s) so that aggregate.py and layout.py start fast; runtime.py
re-exports these names for the entry points.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A bad config value: the entry points print it as one line and exit with status 2."""


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


def run_main(main_fn: Callable[[], Any]) -> None:
    """Run an entry point's body; a ConfigError becomes one clear line on stderr and exit status 2."""
    try:
        main_fn()
    except ConfigError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # always one line
        raise SystemExit(2) from None
    finally:
        # Only a process that imported torch.distributed can hold a process group; looking it up instead of
        # importing it keeps torch-free callers torch-free.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
