"""Score every MLP value vector with an attribution method and save the top `ratio` as a mask file.

    python generate_mask.py attribution=activation data_path=../shared/data/tofu model_path=<checkpoint>
    torchrun --nproc_per_node=2 generate_mask.py --config-name get_mask_tofu attribution=wagle_down ...
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from transformers import AutoConfig, PretrainedConfig

from checkpoints import load_any_model
from dataloader import QADataset
from io_utils import ConfigError, check_writable, run_main
from layout import mask_path
from mask_generator import ATTRIBUTION_KNOBS, ATTRIBUTIONS, SHAPE_ONLY, compute_scores
from masks import load_mask, make_meta, random_complement, save_mask, select_top
from models import family_config, load_tokenizer, value_vector_shape
from pretraining import resolve_model_path
from runtime import init_distributed, is_main, seed_everything, setup_logging, shard
from schema import (
    MaskConfig,
    foreign_knobs,
    hydra_entry,
    knob_values,
    register,
    to_dict,
    unique_knobs,
    with_family_defaults,
)
from tofu import load_tofu, retain_split_for

log = logging.getLogger("loc_unlearn")
VARIANTS = ("normal", "random_complement")
METHOD_KNOBS = unique_knobs(ATTRIBUTION_KNOBS.values())
SCHEMA = register("get_mask_tofu", MaskConfig, METHOD_KNOBS)


def validate(c: dict[str, Any]) -> None:
    if c["attribution"] not in ATTRIBUTIONS:
        raise ConfigError(f"unknown attribution={c['attribution']!r}; expected one of {sorted(ATTRIBUTIONS)}")
    try:
        knob_values(METHOD_KNOBS, c)  # the choices, which the schema types as plain strings
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if unused := foreign_knobs(ATTRIBUTION_KNOBS[c["attribution"]], METHOD_KNOBS, c):
        own = [k.name for k in ATTRIBUTION_KNOBS[c["attribution"]]]
        raise ConfigError(f"{', '.join(unused)}: not read by attribution={c['attribution']}, which reads "
                          f"{', '.join(own) or 'no knob'} (docs/attribution.md)")
    if c["variant"] not in VARIANTS:
        raise ConfigError(f"unknown variant={c['variant']!r}; expected one of {list(VARIANTS)}")
    ratio = c["ratio"]
    if not 0 < ratio <= 1:
        raise ConfigError(f"ratio={ratio!r} must be a number in (0, 1]")
    if c["variant"] == "random_complement" and not c["target_mask_path"]:
        raise ConfigError("variant=random_complement needs target_mask_path=<mask to stay outside of>")
    if c["target_mask_path"] and not Path(c["target_mask_path"]).is_file():
        raise ConfigError(f"target_mask_path={c['target_mask_path']} does not exist")


def shape_only(c: dict[str, Any]) -> bool:
    """Whether the mask follows from the model's shape alone (then no weights are loaded)."""
    return c["variant"] == "random_complement" or c["attribution"] in SHAPE_ONLY


def load_shape(model_path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load a model config from {model_path}: {str(err).splitlines()[0]}") from None


def sharded_loader(dataset: QADataset, batch_size: int) -> DataLoader:
    return DataLoader(Subset(dataset, shard(len(dataset))), batch_size=batch_size, collate_fn=dataset.collate)


def generate(cfg: DictConfig) -> None:
    _, _, device = init_distributed()
    setup_logging()
    c = to_dict(cfg)
    validate(c)
    seed_everything(c["seed"])
    family = family_config(c["model_family"])
    c = with_family_defaults(c, family)
    c["retain_split"] = c["retain_split"] or retain_split_for(c["forget_split"])
    out = Path(mask_path(c["mask_root"], c["attribution"], c["model_family"], c["forget_split"], c["variant"],
                         c["ratio"], c["seed"]))
    check_writable(out.parent)
    if out.exists() and not c["overwrite"]:
        log.info("mask exists, nothing to do (overwrite=true to redo): %s", out)
        return

    model_path = resolve_model_path(c["model_family"], c["model_path"], c["data_path"])
    model = load_shape(model_path) if shape_only(c) else load_any_model(model_path, device)
    n_layers, d_ff = value_vector_shape(model)
    if c["variant"] == "random_complement":
        try:
            target, _ = load_mask(c["target_mask_path"], n_layers, d_ff)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        indices = random_complement(target, d_ff, n_layers, sum(len(t) for t in target), c["seed"])
    else:
        tokenizer = load_tokenizer(c["model_family"], model_path)
        forget_rows = load_tofu(c["forget_split"], c["data_path"])
        retain_rows = load_tofu(c["retain_split"], c["data_path"])
        picked = sorted(random.Random(c["seed"]).sample(range(len(retain_rows)),
                                                        min(c["retain_subset"], len(retain_rows))))
        make = lambda rows: QADataset.from_rows(rows, tokenizer, family, c["max_length"])  # noqa: E731
        forget, retain = make(forget_rows), make([retain_rows[i] for i in picked])
        log.info("scoring %d x %d value vectors with %s on %d %s + %d %s examples", n_layers, d_ff,
                 c["attribution"], len(forget), c["forget_split"], len(retain), c["retain_split"])
        scores = compute_scores(c["attribution"], model, sharded_loader(forget, c["batch_size"]),
                                sharded_loader(retain, c["batch_size"]), c)
        threshold_rule = c["attribution"] == "memflex_down" and c["memflex_rule"] == "threshold"
        indices = select_top(scores, c["ratio"], per_layer=c["per_layer"], finite_only=threshold_rule)
    if is_main():
        meta = make_meta(c["attribution"], c["variant"], c["ratio"], c["seed"], c["model_family"], n_layers, d_ff,
                         c["forget_split"], c["data_path"] or "hub", config={**c, "resolved_model_path": model_path})
        save_mask(out, indices, meta)
        log.info("saved mask of %d value vectors to %s", sum(len(i) for i in indices), out)


@hydra.main(version_base=None, config_path="config", config_name="get_mask_tofu")
def main(cfg: DictConfig) -> None:
    run_main(lambda: generate(cfg))


if __name__ == "__main__":
    hydra_entry(main, SCHEMA)
