"""What one evaluation process saves per checkpoint of a trajectory at a real shape: a fresh process's imports and
model loading against one process swapping a compact checkpoint's values in.

    python bench/bench_switch.py                            # Llama-3.1-8B shape: 16 GB of disk and of memory, ~5 min
    python bench/bench_switch.py --layers 2 --divisor 64 --checkpoints 2        # a narrow 2-layer slice: smoke test

A model of the shape (bench_memory.SHAPES, bf16, weights left uninitialised: their values do not change what
reading or swapping them costs) is saved as θ_o; a random 10% value-vector mask (masking.MaskedValues, the mask
unlearn.py trains) is attached and its masked values are moved and saved as compact checkpoints (save_compact, as
unlearn.py writes them), once per checkpoint. Then:
- one process per checkpoint, as scripts/eval.sh did before: `python -c` importing eval_tofu (the entry point's
  imports) and loading the checkpoint with checkpoints.load_any_model (θ_o read from disk, the values written in);
- one process for the trajectory, as eval_tofu.py given a list does: checkpoints.ModelSwitcher loads θ_o with the
  first checkpoint, then for each later one checks θ_o's fingerprint, restores the previous values and writes its own.
θ_o is dropped from the page cache (posix_fadvise) before the first fresh process and before the one process, so
those read it from this machine's disk; the other fresh processes find it in the page cache. A GPU node adds CUDA
initialisation and the copy to the GPU to every fresh process, which are not counted here. The evaluation itself
costs both arms the same and is left out: what one process saves per later checkpoint is a fresh process's time
minus a swap's.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

# common must come first: it puts the repo root on sys.path for the imports below.
from common import ROOT, print_header, run_python, touch

import torch
from transformers import PretrainedConfig

from checkpoints import ModelSwitcher, save_compact, starting_model_reference
from masking import MaskedValues

from bench_memory import SHAPES, build, random_mask, reshaped

# A checkpoint's values move by about this much from the previous one (their magnitude is irrelevant here).
STEP = 1e-3
# safetensors weights are memory-mapped: loading reads a page only when something first touches it, so every
# arm touches every page of the model it loaded before its clock stops (common.touch; common's own imports are
# eval_tofu's).
LOAD = """
import os, sys
sys.path.insert(0, {root!r})
import eval_tofu, torch
from checkpoints import load_any_model
sys.path.insert(0, os.path.join({root!r}, "bench"))
from common import touch
touch(load_any_model({path!r}, torch.device("cpu"), torch.bfloat16))
"""


def evict(model_dir: Path) -> None:
    """Drop a model's files from the page cache, so that the next load reads them from the disk."""
    for file in model_dir.iterdir():
        with open(file, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_trajectory(root: Path, config: PretrainedConfig, n_checkpoints: int) -> tuple[Path, list[Path]]:
    """θ_o of the shape and n compact checkpoints of a masked run from it; returns their directories."""
    model = build(config, "meta").to_empty(device="cpu")
    theta_o = root / "theta_o"
    model.save_pretrained(theta_o, max_shard_size="2GB")
    reference = starting_model_reference(str(theta_o))
    adapter = MaskedValues(random_mask(model)).attach(model)
    checkpoints = []
    for step in range(1, n_checkpoints + 1):
        with torch.no_grad():
            for values in adapter.parameters():
                values.add_(STEP)
        path = root / f"checkpoint-{step}"
        path.mkdir()
        save_compact(path, model, reference)
        checkpoints.append(path)
    return theta_o, checkpoints


def fresh_process_seconds(checkpoint: Path) -> float:
    """Wall time of a new Python process that imports the entry point and loads the checkpoint."""
    return run_python("-c", LOAD.format(root=str(ROOT), path=str(checkpoint)), what=f"loading {checkpoint}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama3.1-8b-inst", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    p.add_argument("--divisor", type=int, default=1, help="d_model and d_ff divided by this (smoke tests)")
    p.add_argument("--checkpoints", type=int, default=3, help="compact checkpoints of the run (>= 2)")
    p.add_argument("--dir", default=None, help="where to write the models (default: a temporary directory)")
    args = p.parse_args()
    if args.checkpoints < 2:
        p.error(f"--checkpoints {args.checkpoints}: expected >= 2, a swap needs a checkpoint before it")
    if args.divisor < 1 or (args.layers is not None and args.layers < 1):
        p.error(f"--divisor {args.divisor} / --layers {args.layers}: expected positive integers")
    if args.dir is not None and not Path(args.dir).is_dir():
        p.error(f"--dir {args.dir}: expected an existing directory")
    config = reshaped(SHAPES[args.family], args.divisor, args.layers)
    print_header("a trajectory's checkpoints: a fresh process each (imports + loading) vs swapping values in one")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        theta_o, checkpoints = write_trajectory(Path(tmp), config, args.checkpoints)
        written_s = time.perf_counter() - start
        gc.collect()
        size = sum(f.stat().st_size for f in theta_o.glob("*.safetensors"))
        compact = sum(f.stat().st_size for f in checkpoints[0].iterdir())
        evict(theta_o)
        cold = fresh_process_seconds(checkpoints[0])
        warm = [fresh_process_seconds(c) for c in checkpoints]

        evict(theta_o)
        switcher = ModelSwitcher(torch.device("cpu"), torch.bfloat16)
        start = time.perf_counter()
        touch(switcher.load(str(checkpoints[0])))
        first_s = time.perf_counter() - start
        swaps = []
        for checkpoint in checkpoints[1:]:
            start = time.perf_counter()
            switcher.load(str(checkpoint))
            swaps.append(time.perf_counter() - start)

    swap, warm_mean = sum(swaps) / len(swaps), sum(warm) / len(warm)
    print(f"shape: {args.family}, {config.num_hidden_layers} layers, d_model {config.hidden_size}, bf16; "
          f"θ_o {size / 2**30:.3g} GiB in safetensors, a compact checkpoint {compact / 2**30:.3g} GiB; "
          f"written in {written_s:.0f} s")
    each = ", ".join(f"{s:.1f}" for s in warm)
    print("| per checkpoint | s | / swap |")
    print("|---|---|---|")
    print(f"| a fresh process, θ_o read from the disk: imports + load_any_model | {cold:.2f} | {cold / swap:.0f}x |")
    print(f"| a fresh process, θ_o in the page cache (mean of {len(warm)}: {each}) | {warm_mean:.2f} "
          f"| {warm_mean / swap:.0f}x |")
    print(f"| one process, the first checkpoint: ModelSwitcher loads θ_o from the disk, writes the values "
          f"| {first_s:.2f} | |")
    print(f"| one process, each later one: ModelSwitcher checks θ_o, swaps the values (mean of {len(swaps)}) "
          f"| {swap:.2f} | 1x |")

if __name__ == "__main__":
    main()
