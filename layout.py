"""Where every artifact of the pipeline lives: run directories, their checkpoints, mask files and eval results.

Torch-free (it imports no module that imports torch), so that shell scripts can ask it for names instead of
rebuilding them:

    python layout.py final RUN_DIR                          # the checkpoint marked final (exit 1 if none)
    python layout.py checkpoints RUN_DIR [RUN_DIR ...]      # complete checkpoints, by step, one per line
    python layout.py eval-path --forget-split S MODEL_DIR [MODEL_DIR ...]   # eval_tofu.py's JSON, one per line
    python layout.py mask-path --mask-root R --attribution A --model-family F --forget-split S \\
        --variant V --ratio X --seed N                      # the file generate_mask.py writes

Whether an eval result is current is decided by eval_tofu.py, not here: it compares the resolved eval config
(family defaults, canonical split order) and the evaluator's format version, which need the model and evaluator
modules (torch).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from io_utils import ConfigError, run_main

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
INFO_FILE = "trainer_state.json"  # step, final flag, loss history
STATE_FILE = "trainer_state.pt"  # optimizer state and trainable fp32 masters, in the newest checkpoint only
RUN_CONFIG = "run_config.json"  # the resolved unlearn.py config
TENSORBOARD_DIR = "tensorboard"  # report_to=tensorboard: the training scalars' event files, in the run directory
EVAL_DIR = "eval_results"
SWEEP_RESULT = "sweep_result.json"  # sweep.py: one setting's scores, in its run directory
SWEEP_TABLE = "sweep"  # aggregate.py sweep: sweep.md, sweep.csv and sweep.json
EVAL_RESULT_RE = re.compile(r"eval_.*\.json")


def run_dir(c: Mapping[str, Any], world_size: int) -> Path:
    """`output_dir` if given, else the original suite's layout under `save_root`.

    A save_root the user set is always honoured; left at null, a run from a checkpoint-N model nests under it (so
    unlearning runs sit beside the model they start from), any other run under the working directory.
    """
    if c["output_dir"]:
        return Path(c["output_dir"])
    masked = Path(c["mask_path"]).stem if c["mask_path"] else "False"
    effective_bs = c["batch_size"] * c["grad_accum"] * world_size
    leaf = Path(c["forget_split"], c["forget_loss"], f"lora_r{c['lora_r']}", f"masked_{masked}",
                f"lr_{c['lr']}_wd_{c['weight_decay']}_ep_{c['epochs']}_bs_{effective_bs}")
    if c["save_root"] is None and c["model_path"] and CHECKPOINT_RE.match(Path(c["model_path"]).name):
        return Path(c["model_path"]) / leaf
    return Path(c["save_root"] or ".", c["model_family"], "TOFU", "default") / leaf


def sweep_run_dir(save_root: str | os.PathLike, c: Mapping[str, Any]) -> Path:
    """{save_root}/{forget_loss}/masked_{False|<mask file stem>}/lr_{lr}_hp_{hyper_param}_ep_{epochs}_s{seed}: one
    directory per grid point of a sweep (the resolved unlearn.py config `c`). Unlike run_dir it names hyper_param and
    seed, the axes a sweep varies that the run directory scheme leaves out."""
    masked = Path(c["mask_path"]).stem if c["mask_path"] else "False"
    leaf = f"lr_{c['lr']}_hp_{c['hyper_param']}_ep_{c['epochs']}_s{c['seed']}"
    return Path(save_root, c["forget_loss"], f"masked_{masked}", leaf)


def checkpoint_path(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / f"checkpoint-{step}"


def checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """A run's complete checkpoints, by step as a number (checkpoint-10 after checkpoint-9).

    Complete: it has its trainer_state.json, which the checkpointer writes inside the temporary directory that is
    renamed into place, so a directory without one was not written by a finished save.
    """
    run = Path(run)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / INFO_FILE).is_file()]
    return sorted(found)


def final_checkpoint(run: str | os.PathLike) -> Path | None:
    """The checkpoint marked final: the run finished (not merely the highest step of an interrupted run)."""
    for _, path in reversed(checkpoints(run)):
        if json.loads((path / INFO_FILE).read_text()).get("final"):
            return path
    return None


def resumable_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest checkpoint that still holds its optimizer state."""
    resumable = [p for _, p in checkpoints(run) if (p / STATE_FILE).is_file()]
    return resumable[-1] if resumable else None


def _fmt_ratio(ratio: float | str) -> str:
    return ratio if isinstance(ratio, str) else repr(float(ratio))


def mask_path(mask_root: str | os.PathLike, attribution: str, model_family: str, forget_split: str, variant: str,
              ratio: float | str, seed: int) -> str:
    """{mask_root}/{attribution}/{model_family}/TOFU/default/{forget_split}/{attribution}_mask_{variant}_{ratio}_s{seed}.pt
    (ratio written as repr(float(ratio)), e.g. 0.1 -> "0.1", 1 -> "1.0")."""
    name = f"{attribution}_mask_{variant}_{_fmt_ratio(ratio)}_s{seed}.pt"
    return os.path.join(os.fspath(mask_root), attribution, model_family, "TOFU", "default", forget_split, name)


def eval_path(model_dir: str | os.PathLike, forget_split: str, output_dir: str | os.PathLike | None = None) -> Path:
    """Where eval_tofu.py writes a model's results: <output_dir or model_dir/eval_results>/eval_<forget_split>.json."""
    directory = Path(output_dir) if output_dir else Path(model_dir) / EVAL_DIR
    return directory / f"eval_{forget_split}.json"  # matches EVAL_RESULT_RE


def _cmd_final(args: argparse.Namespace) -> None:
    final = final_checkpoint(args.run_dir)
    if final is None:
        raise SystemExit(f"error: {args.run_dir} holds no checkpoint marked final (the run has not finished)")
    print(final)


def _cmd_checkpoints(args: argparse.Namespace) -> None:
    for run in args.run_dirs:
        if not Path(run).is_dir():
            raise ConfigError(f"run directory {run} does not exist")
        for _, path in checkpoints(run):
            print(path)


def _cmd_eval_path(args: argparse.Namespace) -> None:
    for model in args.model_dirs:
        print(eval_path(model, args.forget_split))


def _cmd_mask_path(args: argparse.Namespace) -> None:
    print(mask_path(args.mask_root, args.attribution, args.model_family, args.forget_split, args.variant,
                    args.ratio, args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    final = commands.add_parser("final", help="the run's checkpoint marked final; exit status 1 if none")
    final.add_argument("run_dir", metavar="RUN_DIR")
    final.set_defaults(func=_cmd_final)
    ckpts = commands.add_parser("checkpoints", help="complete checkpoints of each run, by step, one per line")
    ckpts.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ckpts.set_defaults(func=_cmd_checkpoints)
    evals = commands.add_parser("eval-path", help="each model's eval_tofu.py result JSON, one per line")
    evals.add_argument("--forget-split", required=True)
    evals.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    evals.set_defaults(func=_cmd_eval_path)
    masks = commands.add_parser("mask-path", help="the mask file generate_mask.py writes for these settings")
    for option in ("--mask-root", "--attribution", "--model-family", "--forget-split"):
        masks.add_argument(option, required=True)
    masks.add_argument("--variant", default="normal", help="normal or random_complement (default: normal)")
    masks.add_argument("--ratio", type=float, required=True)
    masks.add_argument("--seed", type=int, required=True)
    masks.set_defaults(func=_cmd_mask_path)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
