"""Fine-tune, inject or unlearn a model on TOFU, optionally updating only the value vectors of a mask.

    python unlearn.py forget_loss=learn forget_split=full data_path=../shared/data/tofu
    torchrun --nproc_per_node=2 unlearn.py --config-name forget_tofu forget_loss=npo mask_path=mask/...pt
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from checkpointer import Checkpointer
from checkpoints import SAVE_FORMATS, load_any_model, starting_model_reference
from dataloader import LOSSES, LossSpec, UnlearnDataset, get_loss, load_idk, sequence_nll
from io_utils import ConfigError, check_writable, run_main
from layout import RUN_CONFIG, checkpoints, final_checkpoint, run_dir
from masking import MaskedValues, apply_lora
from masks import load_mask
from models import DTYPES, family_config, load_tokenizer, resolve_precision, value_vector_shape
from pretraining import replay_rows, resolve_model_path, resolve_replay
from runtime import init_distributed, is_main, seed_everything, setup_logging
from schema import UnlearnConfig, foreign_knobs, hydra_entry, register, to_dict, unique_knobs, with_family_defaults
from tofu import load_tofu, retain_split_for
from trainer import NonFiniteLoss, TrainSettings, check_report_to, train

log = logging.getLogger("loc_unlearn")

LOSS_KNOBS = unique_knobs(spec.knobs for spec in LOSSES.values())
SCHEMA = register("forget_tofu", UnlearnConfig, LOSS_KNOBS)


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config with the family's defaults filled in and the derived keys set."""
    c = to_dict(cfg)
    c = with_family_defaults(c, family_config(c["model_family"]))
    c["retain_split"] = c["retain_split"] or retain_split_for(c["forget_split"])
    c.update(absolute_paths(c))
    if c["idk_path"] is None and c["data_path"] not in (None, "synthetic"):
        candidate = Path(c["data_path"]) / "idontknow.jsonl"
        c["idk_path"] = str(candidate) if candidate.is_file() else None
    return c


PATH_KEYS = ("data_path", "idk_path", "model_path", "mask_path", "retain_model_path")


def absolute_paths(c: dict[str, Any]) -> dict[str, Any]:
    """Existing local paths made absolute, so one run is recognised whatever directory it was started from."""
    return {k: str(Path(c[k]).resolve()) for k in PATH_KEYS if c.get(k) and Path(c[k]).exists()}


def resolve_loss_knobs(spec: LossSpec, c: dict[str, Any]) -> dict[str, Any]:
    """`c` with the loss's knobs at their declared defaults where unset; a knob the loss would ignore, set away
    from its default, is an error rather than a silent no-op (e.g. retain_weight for grad_diff, whose retain term
    hyper_param weighs)."""
    unused = foreign_knobs(spec.knobs, LOSS_KNOBS, c)
    if spec.hyper_param is None and c["hyper_param"] is not None:
        unused.insert(0, f"hyper_param={c['hyper_param']!r}")
    if unused:
        reads = [f"hyper_param ({spec.hyper_param.name}: {spec.hyper_param.help})"] if spec.hyper_param else []
        reads += [k.name for k in spec.knobs]
        raise ConfigError(f"{', '.join(unused)}: not read by forget_loss={spec.name}, which reads "
                          f"{', '.join(reads) or 'no knob'} (docs/losses.md)")
    return spec.resolve(c)


# Keys that change where or how often a run is saved, not what it computes.
NOT_RESULT_KEYS = {"save_root", "output_dir", "save_checkpoint", "save_steps", "save_each_epoch", "save_format",
                   "deepspeed", "report_to"}


def check_same_run(out: Path, c: dict[str, Any]) -> None:
    """Refuse to resume or skip a run directory that holds a run of another config (e.g. another seed)."""
    existing = [p for _, p in checkpoints(out) if (p / RUN_CONFIG).is_file()]
    if not existing:
        return
    stored = json.loads((existing[-1] / RUN_CONFIG).read_text())
    stored.update(absolute_paths(stored))
    differ = sorted(k for k in c if k not in NOT_RESULT_KEYS and stored.get(k) != c[k])
    if differ:
        settings = ", ".join(f"{k}={stored.get(k)!r}" for k in differ)
        raise ConfigError(f"{out} holds a run with other settings ({settings}); pass another output_dir/save_root or "
                          "delete it")


@torch.no_grad()
def reference_nll(model: torch.nn.Module, dataset: UnlearnDataset, part: str, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """Per-example summed answer NLL under the model before unlearning, computed once for the whole run."""
    view = dataset.part_dataset(part)
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, collate_fn=view.collate)
    model.eval()
    values = [sequence_nll(model, {k: v.to(device) for k, v in b.items()}).float().cpu() for b in loader]
    return torch.cat(values)


def unlearn(cfg: DictConfig) -> None:
    rank, world_size, device = init_distributed()
    setup_logging()
    c = resolve(cfg)
    seed_everything(c["seed"])
    spec = get_loss(c["forget_loss"])
    c = resolve_loss_knobs(spec, c)
    check_report_to(c["report_to"])
    if c["deepspeed"] and not Path(c["deepspeed"]).is_file():
        raise ConfigError(f"deepspeed={c['deepspeed']} does not exist; expected a DeepSpeed JSON "
                          "(config/ds_config.json)")
    if c["mask_path"] and c["lora_r"] > 0:
        raise ConfigError("mask_path and lora_r>0 are exclusive: a mask trains value vectors, LoRA trains adapters")
    if c["mask_path"] and not Path(c["mask_path"]).is_file():
        raise ConfigError(f"mask_path={c['mask_path']} does not exist; expected a mask file from generate_mask.py")
    if spec.resident_ref and c["forget_loss"] == "rt_diff" and not c["retain_model_path"]:
        raise ConfigError("forget_loss=rt_diff needs retain_model_path=<model trained on the retain split>")
    if c["save_format"] not in (*SAVE_FORMATS, None):
        raise ConfigError(f"save_format={c['save_format']!r}; expected one of {list(SAVE_FORMATS)} or null (compact "
                          f"for masked runs, full otherwise)")
    if c["save_format"] == "compact" and not c["mask_path"]:
        raise ConfigError("save_format=compact holds the masked values only, so it needs mask_path; LoRA and "
                          "full-parameter runs save full checkpoints")
    c["save_format"] = c["save_format"] or ("compact" if c["mask_path"] else "full")
    masked_or_lora = bool(c["mask_path"] or c["lora_r"] > 0)
    c["replay"] = resolve_replay(c["model_family"], c["forget_loss"], masked_or_lora, c["replay"])
    c["precision"] = resolve_precision(c["precision"], device)
    if c["precision"] != "fp32" and not (masked_or_lora or c["deepspeed"]):
        raise ConfigError(f"full-parameter training with precision={c['precision']} and no fp32 master weights loses "
                          "most small updates; pass deepspeed=config/ds_config.json (ZeRO keeps fp32 masters, also "
                          "on one GPU) or precision=fp32")
    out = run_dir(c, world_size)
    check_writable(out)
    check_same_run(out, c)
    if (final := final_checkpoint(out)) is not None:
        log.info("run already complete: %s", final)
        return

    model_path = resolve_model_path(c["model_family"], c["model_path"], c["data_path"])
    family = family_config(c["model_family"])
    forget_rows = load_tofu(c["forget_split"], c["data_path"])
    replayed = replay_rows(c["model_family"], c["data_path"], c["replay"], c["seed"])
    forget_rows += replayed
    retain_rows = load_tofu(c["retain_split"], c["data_path"]) if "retain" in spec.parts else []
    tokenizer = load_tokenizer(c["model_family"], model_path)
    dataset = UnlearnDataset(forget_rows, retain_rows, load_idk(c["idk_path"]), tokenizer, family,
                             c["max_length"], spec.parts, c["seed"])
    log.info("loaded %d %s examples%s%s from %s", len(dataset), c["forget_split"],
             f" (+ {c['retain_split']})" if retain_rows else "",
             f" (incl. {len(replayed)} replayed pretraining rows)" if replayed else "",
             c["data_path"] or "the hub")

    model = load_any_model(model_path, device, DTYPES[c["precision"]])
    # After loading, which fetches a hub model into the local cache the reference then points to.
    starting = starting_model_reference(model_path) if c["save_format"] == "compact" else None
    for part in spec.cached_ref:
        dataset.ref_nll[part] = reference_nll(model, dataset, part, c["batch_size"], device)
    ref_model = None
    if spec.resident_ref:
        ref_path = c["retain_model_path"] if c["forget_loss"] == "rt_diff" else model_path
        ref_model = load_any_model(ref_path, device, DTYPES[c["precision"]]).eval().requires_grad_(False)

    mask_indices = None
    if c["mask_path"]:
        try:
            mask_indices, meta = load_mask(c["mask_path"], *value_vector_shape(model))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        log.info("mask %s: %d value vectors (%s) trainable", c["mask_path"], sum(len(i) for i in mask_indices),
                 meta.get("method"))

    def make_trainable(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        if mask_indices is not None:
            return model, MaskedValues(mask_indices).attach(model).parameters()
        if c["lora_r"] > 0:
            return apply_lora(model, c["lora_r"], c["lora_alpha"], c["lora_dropout"], family["lora_target_modules"])
        return model, list(model.parameters())

    checkpointer = Checkpointer(out, tokenizer, {**c, "resolved_model_path": model_path}, starting,
                                merged_adapters=c["lora_r"] > 0)
    model, trainable = checkpointer.resume(model, make_trainable)
    loss_cfg = {k: c[k] for k in ("hyper_param", "seed", *(knob.name for knob in spec.knobs))}

    settings = TrainSettings(**{k: c[k] for k in ("lr", "weight_decay", "epochs", "batch_size", "grad_accum",
                                                  "warmup_ratio", "lr_scheduler", "max_grad_norm", "seed",
                                                  "save_checkpoint", "save_steps", "save_each_epoch",
                                                  "group_by_length", "deepspeed", "report_to")})
    log.info("training %d tensors (%d values) with %s; writing to %s", len(trainable),
             sum(p.numel() for p in trainable), c["forget_loss"], out)
    try:
        final = train(model, trainable, dataset, lambda m, b: spec(m, b, ref_model, loss_cfg), settings,
                      checkpointer, device)
    except NonFiniteLoss as err:
        raise ConfigError(str(err)) from err  # the cause tells a sweep that the setting diverged
    if is_main():
        log.info("final model: %s", final)


@hydra.main(version_base=None, config_path="config", config_name="forget_tofu")
def main(cfg: DictConfig) -> None:
    run_main(lambda: unlearn(cfg))


if __name__ == "__main__":
    hydra_entry(main, SCHEMA)
