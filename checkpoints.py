"""Model checkpoints of either kind: full HF directories, and compact ones that hold only a masked run's changes.

A masked run changes only its masked value vectors (down_proj columns), ≈ 0.35 GiB of a 15 GiB bf16 8B model at
10%, so by default its checkpoints hold just those: the values in the model's dtype and their indices
(`masked_values.safetensors`), and in `compact.json` the starting model's resolved directory with a fingerprint of
its weights. Beside them are config.json, the tokenizer, run_config.json and trainer_state.json, as in a full one.

    python checkpoints.py export <compact checkpoint> <out_dir>     # the same model as a full HF directory

`load_any_model` loads either kind; a compact checkpoint whose starting model is missing or differs is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from layout import STATE_FILE
from masking import masked_modules
from models import load_model
from runtime import ConfigError, atomic_path, run_main

log = logging.getLogger("loc_unlearn")

COMPACT_META = "compact.json"
VALUES_FILE = "masked_values.safetensors"
COMPACT_VERSION = 1
SAVE_FORMATS = ("compact", "full")
# Bytes read per tensor at each of its start, middle and end for the weights fingerprint.
SAMPLE_BYTES = 1 << 16

Undo = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def local_model_dir(model_path: str) -> Path | None:
    """The directory holding a model: the path itself, or a hub id's snapshot in the local hub cache."""
    if Path(model_path).is_dir():
        return Path(model_path).resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_path, "config.json")
    except ValueError:  # not a valid repo id either
        return None
    return Path(found).parent.resolve() if isinstance(found, str) else None


def weights_fingerprint(model_dir: Path) -> str:
    """A digest of a model's weights that costs a few MB of reads, even at 8B.

    Per safetensors file: its name, size and header (tensor names, dtypes, shapes, offsets), and 64 KiB of each
    tensor's bytes at its start, middle and end; for a compact checkpoint also its compact.json, which holds its
    own starting model's fingerprint. Any training of a tensor moves (nearly) all of its values, and a 10% mask
    puts masked columns in every 64 KiB of a row-major down_proj, so another fine-tune, another masked run or a
    rewrite with other values changes the digest, while copying the directory (new mtimes) does not.
    """
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} has no safetensors weights; compact checkpoints need a starting model in "
                          f"safetensors format (pass save_format=full)")
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = f.read(header_size)
            digest.update(header)
            for name, entry in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                start, end = entry["data_offsets"]
                for offset in sorted({start, max(start, (start + end - SAMPLE_BYTES) // 2),
                                      max(start, end - SAMPLE_BYTES)}):
                    f.seek(8 + header_size + offset)
                    digest.update(f.read(min(SAMPLE_BYTES, end - offset)))
    if (model_dir / COMPACT_META).is_file():
        digest.update((model_dir / COMPACT_META).read_bytes())
    return digest.hexdigest()


def compact_meta(path: str | Path) -> dict[str, Any] | None:
    """A compact checkpoint's compact.json, or None for any other model path."""
    file = Path(path) / COMPACT_META
    return json.loads(file.read_text()) if file.is_file() else None


def starting_model_reference(model_path: str) -> dict[str, str]:
    """What a compact checkpoint records of the model its run started from."""
    directory = local_model_dir(model_path)
    if directory is None:
        raise ConfigError(f"model_path={model_path} is not a local directory or a cached hub model; compact "
                          f"checkpoints need one to refer to (pass save_format=full)")
    return {"starting_model": str(directory), "starting_fingerprint": weights_fingerprint(directory)}


def starting_model(checkpoint: str | Path, meta: dict[str, Any]) -> str:
    """The compact checkpoint's starting model, checked to be the one it was trained from."""
    base = Path(meta["starting_model"])
    if not base.is_dir():
        raise ConfigError(f"compact checkpoint {checkpoint} needs its starting model {base}, which does not exist; "
                          f"restore it there, or export the checkpoint where it exists (python checkpoints.py export)")
    if weights_fingerprint(base) != meta["starting_fingerprint"]:
        raise ConfigError(f"compact checkpoint {checkpoint} was trained from other weights than those now in {base} "
                          f"(fingerprint differs); restore the original starting model there")
    return str(base)


def save_compact(path: Path, model: torch.nn.Module, reference: dict[str, str]) -> None:
    """Write a masked model's values (in the model's dtype) and indices, its config and its starting model."""
    tensors = {}
    for name, module in masked_modules(model):
        tensors[f"{name}.values"] = module.masked_values.detach().to(module.weight.dtype).cpu().contiguous()
        tensors[f"{name}.index"] = module.mask_index.cpu()
    if not tensors:
        raise ValueError("save_compact needs a model with a value-vector mask applied")
    save_file(tensors, str(path / VALUES_FILE))
    model.config.save_pretrained(path)  # config.json: a model directory to every entry point
    dtype = next(iter(tensors.values())).dtype
    (path / COMPACT_META).write_text(json.dumps({"version": COMPACT_VERSION, **reference,
                                                 "dtype": str(dtype).removeprefix("torch.")}, indent=1))


def apply_compact(model: torch.nn.Module, checkpoint: str | Path) -> Undo:
    """Write a compact checkpoint's values into their down_proj columns; returns what restore() needs to undo it."""
    tensors = load_file(str(Path(checkpoint) / VALUES_FILE))
    modules = dict(model.named_modules())
    undo = []
    for key, index in tensors.items():
        if not key.endswith(".index"):
            continue
        name = key.removesuffix(".index")
        weight = modules[name].weight
        index = index.to(weight.device)
        undo.append((weight, index, weight.data[:, index].clone()))
        weight.data[:, index] = tensors[f"{name}.values"].to(weight.device, weight.dtype)
    return undo


def restore(undo: Undo) -> None:
    for weight, index, original in reversed(undo):
        weight.data[:, index] = original


def load_any_model(path: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A full checkpoint or hub model as models.load_model loads it; a compact one as its starting model (itself
    loaded this way) with the saved values written into their columns."""
    meta = compact_meta(path)
    if meta is None:
        return load_model(path, device, dtype)
    model = load_any_model(starting_model(path, meta), device, dtype)
    apply_compact(model, path)
    log.info("applied the masked values of compact checkpoint %s", path)
    return model


def load_plain_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's ordinary weights into a (not yet masked) model started from the run's starting model, for
    resuming: a full checkpoint's every weight, or a compact one's values written into their columns."""
    meta = compact_meta(checkpoint)
    if meta is not None:
        starting_model(checkpoint, meta)
        apply_compact(model, checkpoint)
        return
    state = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):  # a tied head is saved once, as the embedding
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


class ModelSwitcher:
    """Loads models one after another for evaluation; compact checkpoints of the starting model already loaded
    swap only their values (its original columns are restored first), so a trajectory loads θ_o once."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None):
        self.device, self.dtype = device, dtype  # dtype None: models.load_model's default for the device
        self.model: torch.nn.Module | None = None
        self.loaded: str | None = None  # the model directory self.model holds once `undo` is restored
        self.undo: Undo = []

    def load(self, path: str) -> torch.nn.Module:
        meta = compact_meta(path)
        base = starting_model(path, meta) if meta is not None else None
        if meta is None or base != self.loaded:
            self.model, self.undo = None, []  # free the old model before loading the next
            self.model = load_any_model(base or path, self.device, self.dtype)
            self.loaded = str(local_model_dir(base or path) or path)
        restore(self.undo)
        self.undo = apply_compact(self.model, path) if meta is not None else []
        return self.model


def export(checkpoint: str, out_dir: str) -> Path:
    """Write a compact checkpoint as a full HF directory (weights in the dtype it was trained in, tokenizer, run
    files); returns out_dir."""
    meta = compact_meta(checkpoint)
    if meta is None:
        raise ConfigError(f"{checkpoint} is not a compact checkpoint (no {COMPACT_META})")
    model = load_any_model(checkpoint, torch.device("cpu"), getattr(torch, meta["dtype"]))
    skip = {COMPACT_META, VALUES_FILE, "config.json", STATE_FILE}  # config.json: save_pretrained writes it
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for item in Path(checkpoint).iterdir():
            if item.is_file() and item.name not in skip:
                shutil.copy2(item, tmp / item.name)
        model.save_pretrained(tmp)
    log.info("exported %s to %s", checkpoint, out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write a compact checkpoint as a full HF directory")
    p.add_argument("checkpoint", help="a compact checkpoint directory (with compact.json)")
    p.add_argument("out_dir", help="the full HF directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    run_main(lambda: print(export(args.checkpoint, args.out_dir)))


if __name__ == "__main__":
    main()
