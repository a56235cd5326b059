"""Shared fixtures and the two test tiers.

Fast tier: everything in-process. Integration tier: every test that starts a process (an entry point as a user runs
it, torchrun, DeepSpeed's launch, multiprocessing ranks, SIGKILL, the pipeline, the bench scripts). A test is in the
integration tier exactly when it requests the `processes` fixture (directly, or through `run_script` or another
fixture): it is then marked `integration`. A test without the marker that starts a process fails on the spot.
"""
from __future__ import annotations

import importlib
import json
import logging
import multiprocessing.process
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from io_utils import run_main
from schema import added_keys, one_line_errors, schema_keys, unknown_key_line

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = Path(os.environ.get("TOFU_DIR", ROOT.parent / "shared" / "data" / "tofu"))
INTEGRATION = "integration"

# Tests share two cores with subprocess runs; one thread each avoids OpenMP oversubscription.
torch.set_num_threads(1)


# ---- the tiers ----

def pytest_collection_modifyitems(config, items):
    for item in items:
        if "processes" in getattr(item, "fixturenames", ()):
            item.add_marker(INTEGRATION)
        # pytest-xdist (--dist loadgroup): the tests sharing a module-scoped fixture (the pipeline's runs, the
        # DeepSpeed runs, the evaluated models) run on one worker, which computes it once; the rest spread freely.
        info, module = getattr(item, "_fixtureinfo", None), getattr(item, "module", None)
        if info and module and any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(module.__name__))


_current: dict[str, str | None] = {"fast_test": None}
_PROCESS_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec",
                   "pty.spawn"}


def _refuse(what: str) -> None:
    test = _current["fast_test"]
    if test is not None:
        raise RuntimeError(f"{test} is a fast-tier test but started a process ({what}); request the `processes` "
                           "fixture (directly or through run_script) to put it in the integration tier")


def _audit(event: str, args: tuple) -> None:
    if event in _PROCESS_EVENTS:
        _refuse(event)


sys.addaudithook(_audit)
_start = multiprocessing.process.BaseProcess.start


def _checked_start(self) -> None:  # multiprocessing's spawn start method raises no audit event of its own
    _refuse("multiprocessing")
    _start(self)


multiprocessing.process.BaseProcess.start = _checked_start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["fast_test"] = None if item.get_closest_marker(INTEGRATION) else item.nodeid
    try:
        yield
    finally:
        _current["fast_test"] = None


@pytest.fixture(scope="session")
def processes() -> None:
    """Requested by every test that starts a process: puts it in the integration tier."""


# ---- data and models ----

@pytest.fixture(scope="session")
def tofu_dir() -> Path:
    """The real TOFU files. A test about real data fails without them: CI has ../shared beside the clone."""
    if not (TOFU_DIR / "full.json").is_file():
        pytest.fail(f"real TOFU files not found at {TOFU_DIR} (set TOFU_DIR)")
    return TOFU_DIR


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory) -> None:
    """Locally built models go to a temporary directory, not the source tree's .cache/ (subprocesses inherit it).
    Under xdist the workers share one directory of the run: builds are atomic, so concurrent ones are safe."""
    from models import CACHE_ENV

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "model-cache"
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The tiny family's initial model for the synthetic data (built once per test session)."""
    from models import tiny_model_path

    return tiny_model_path("synthetic", 0)


def random_llama(seed: int = 0, **config) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM of 2 layers, width 16 and 24 value vectors per layer (vocabulary 40),
    for unit tests that need a real architecture but no trained weights; `config` overrides LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, **config}
    return LlamaForCausalLM(LlamaConfig(**config))


# ---- running the entry points ----

def subprocess_env() -> dict[str, str]:
    # Passive OpenMP waits: spinning threads of concurrent processes would starve each other on 2 cores.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def command(*args: str, nproc: int = 1) -> list[str]:
    """`python X.py args` or, for nproc > 1, `torchrun --standalone --nproc_per_node=N X.py args`."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    return [sys.executable, *args]


@pytest.fixture(scope="session")
def run_script(processes) -> Callable[..., subprocess.CompletedProcess]:
    """Runs an entry point as a user would (python X.py or torchrun), returning the completed process."""

    def run(*args: str, nproc: int = 1, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(command(*args, nproc=nproc), cwd=cwd, env=subprocess_env(), capture_output=True,
                              text=True, timeout=timeout)

    return run


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_checkpoint(run: Path) -> Path:
    """The checkpoint of a run marked final in its trainer_state.json."""
    (ckpt,) = [p for p in run.glob("checkpoint-*") if json.loads((p / "trainer_state.json").read_text())["final"]]
    return ckpt


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The final weights as saved: a full checkpoint's file, or a masked run's compact one applied to its start."""
    from safetensors.torch import load_file

    from checkpoints import compact_meta, load_any_model

    final = final_checkpoint(run)
    if compact_meta(final) is not None:
        return load_any_model(str(final), torch.device("cpu")).state_dict()
    return load_file(str(final / "model.safetensors"))


def compose_config(config: str, overrides: Sequence[str] = ()) -> DictConfig:
    """An entry point's config as Hydra composes it from config/<config>.yaml and the command line's overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose(config_name=config, overrides=list(overrides))


ENTRY_POINTS = {"unlearn.py": ("unlearn", "unlearn", "forget_tofu"),
                "generate_mask.py": ("generate_mask", "generate", "get_mask_tofu"),
                "eval_tofu.py": ("eval_tofu", "evaluate", "eval_tofu")}


def run_entry(entry: str, overrides: Sequence[str], capsys) -> tuple[int, str]:
    """`python <entry> *overrides` in-process, as schema.hydra_entry and the entry point's main run it: its exit
    status (0 when it returns) and its `error: ...` line ("" when none; more than one fails the test). Progress bars
    share stderr, so the error line need not be the last one."""
    module_name, function, config = ENTRY_POINTS[entry]
    module = importlib.import_module(module_name)
    keys = schema_keys(module.EvalConfig if entry == "eval_tofu.py" else module.SCHEMA)
    code = 0
    try:
        with one_line_errors(keys):
            if bad := added_keys(overrides, keys):
                print(f"error: {unknown_key_line(bad[0], keys)}", file=sys.stderr)
                raise SystemExit(2)
            cfg = compose_config(config, overrides)
        run_main(lambda: getattr(module, function)(cfg))
    except SystemExit as exit_info:
        code = exit_info.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, errors
    return code, errors[0] if errors else ""


@pytest.fixture(autouse=True)
def _restore_logging():
    """The entry points point the root logger at the captured stdout of the test that ran them; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
