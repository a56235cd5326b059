"""Save and resume of a run's checkpoints, in one object.

A checkpoint-N directory (names: layout.py) holds the model (a full HF directory, or a compact one: checkpoints.py),
the tokenizer, run_config.json, trainer_state.json (step, final flag, loss history) and, in the newest checkpoint
only, the optimizer state: trainer_state.pt (with the trainable fp32 masters), or under DeepSpeed its own checkpoint
in deepspeed/ (partitioned optimizer state, scheduler) beside the trainable values in trainer_state.pt. Rank 0 writes
it into a temporary directory that is renamed into place when complete (every rank adds its DeepSpeed partition
first), so a killed run leaves only complete checkpoints and resumes from the newest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoints import load_plain_weights, save_compact
from layout import INFO_FILE, RUN_CONFIG, STATE_FILE, checkpoint_path, checkpoints, resumable_checkpoint
from masking import base_model, plain_state_dict
from runtime import ConfigError, atomic_path, barrier, broadcast_object, is_main

log = logging.getLogger("loc_unlearn")

DEEPSPEED_DIR = "deepspeed"

MakeTrainable = Callable[[nn.Module], tuple[nn.Module, list[nn.Parameter]]]


class Checkpointer:
    """Writes a run's checkpoints and prepares a model to continue from the newest one.

    `compact_reference` (checkpoints.starting_model_reference): compact checkpoints of a masked model; None: full
    ones. `merged_adapters`: the checkpoints hold LoRA adapters merged into the weights, which a resume must not load
    (the restored adapters would then count twice).
    """

    def __init__(self, run_dir: str | Path, tokenizer: Any = None, run_config: dict[str, Any] | None = None,
                 compact_reference: dict[str, str] | None = None, merged_adapters: bool = False):
        self.run_dir = Path(run_dir)
        self.tokenizer, self.run_config = tokenizer, run_config
        self.compact_reference, self.merged_adapters = compact_reference, merged_adapters
        self._resume_state: dict[str, Any] | None = None

    def resume(self, model: nn.Module, make_trainable: MakeTrainable) -> tuple[nn.Module, list[nn.Parameter]]:
        """`make_trainable(model)` (mask, LoRA or every parameter), continuing from the newest resumable checkpoint.

        The order is the point: a checkpoint's plain weights go into the model before it is made trainable (a
        full-parameter run's every weight; a masked run's trained columns, rounded to the model's dtype), and the
        trainable fp32 masters are restored after, over those rounded values. Every rank resumes from the
        checkpoint rank 0 found.
        """
        checkpoint = broadcast_object(resumable_checkpoint(self.run_dir) if is_main() else None)
        if checkpoint is not None:
            self._resume_state = {**torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True),
                                  "checkpoint": str(checkpoint)}
            if not self.merged_adapters:
                load_plain_weights(model, checkpoint)
        model, trainable = make_trainable(model)
        if self._resume_state is not None:
            params = dict(model.named_parameters())
            for name, value in self._resume_state["trainable"].items():
                params[name].data.copy_(value)
        return model, trainable

    def restore_optimizer(self, optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any = None
                          ) -> tuple[int, list[dict[str, Any]]]:
        """(step, loss history) to continue from, with the optimizer and scheduler (or DeepSpeed engine) restored;
        (0, []) when resume() found no checkpoint."""
        state = self._resume_state
        if state is None:
            return 0, []
        # The two paths keep the optimizer state in different formats (DeepSpeed's partitions vs a torch state dict).
        written_with = "optimizer" not in state
        if written_with != (engine is not None):
            how = "with" if written_with else "without"
            raise ConfigError(f"{state['checkpoint']} was written {how} DeepSpeed and holds its optimizer state in "
                              f"that format; resume {how} deepspeed=, or delete the run directory")
        if engine is None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        else:
            engine.load_checkpoint(Path(state["checkpoint"]) / DEEPSPEED_DIR, load_module_strict=False)
        return state["step"], state["history"]

    def save(self, model: nn.Module, step: int, total_steps: int, history: list[dict[str, Any]], final: bool,
             optimizer: torch.optim.Optimizer, scheduler: Any, engine: Any = None) -> Path:
        """Write checkpoint-<step> (every rank calls it); older checkpoints keep their model but lose their optimizer
        state, which only the newest needs."""
        path = checkpoint_path(self.run_dir, step)
        # Every rank writes its DeepSpeed partition into rank 0's temporary directory, renamed when all are done.
        with atomic_path(path) if is_main() else contextlib.nullcontext() as tmp:
            if is_main():
                tmp.mkdir()
            tmp = Path(broadcast_object(str(tmp) if is_main() else None))
            if engine is not None:
                engine.save_checkpoint(tmp / DEEPSPEED_DIR, exclude_frozen_parameters=True)
            if is_main():
                self._save_model(model, tmp)
                state = {"step": step, "history": history, "trainable": _trainable_by_name(model)}
                if engine is None:
                    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
                torch.save(state, tmp / STATE_FILE)
                (tmp / INFO_FILE).write_text(json.dumps({"step": step, "total_steps": total_steps, "final": final,
                                                          "history": history}, indent=1))
        if is_main():
            for _, older in checkpoints(self.run_dir):
                if older != path and (older / STATE_FILE).exists():
                    (older / STATE_FILE).unlink()
                    shutil.rmtree(older / DEEPSPEED_DIR, ignore_errors=True)
            log.info("saved %s", path)
        barrier()
        return path

    def _save_model(self, model: nn.Module, path: Path) -> None:
        if self.compact_reference is not None:
            save_compact(path, model, self.compact_reference)
        else:
            base_model(model).save_pretrained(path, state_dict=plain_state_dict(model))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if self.run_config is not None:
            (path / RUN_CONFIG).write_text(json.dumps(self.run_config, indent=1))


def _trainable_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masked values and LoRA adapters as trained (fp32 masters); full-parameter runs restore from the weights."""
    params = list(model.named_parameters())
    if all(p.requires_grad for _, p in params):
        return {}
    return {n: p.detach().cpu().clone() for n, p in params if p.requires_grad}
