"""Evaluate models on TOFU: forget / retain / real authors / world facts metrics, extraction strength, forget
quality against a retain model's results, model utility, and membership inference (forget vs holdout) with privleak.

    python eval_tofu.py model_path=runs/.../checkpoint-50 data_path=../shared/data/tofu forget_split=forget10
    python eval_tofu.py model_path=... retain_result=<retain model dir>/eval_results/eval_forget10.json
    python eval_tofu.py "model_path=[<theta_o>,<run>/checkpoint-5,<run>/checkpoint-10]" ...   # a trajectory
    torchrun --nproc_per_node=2 eval_tofu.py model_path=... data_path=...

Writes <output_dir or model_path/eval_results>/eval_<forget_split>.json (rank 0) per model. An existing JSON for the
same model (path and file fingerprint) and config is reused: only its summary is recomputed, e.g. with a new
retain_result. A list of models is evaluated in one process, each result as its own run would write it; compact
checkpoints of the starting model already loaded only swap their masked values in.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import metrics as M
from checkpoints import ModelSwitcher, load_any_model, local_model_dir
from evaluator import (
    HOLDOUT,
    MIA_KEYS,
    RETAIN_ES,
    SPLIT_DATA,
    SPLITS,
    EvalSettings,
    mia_aucs,
    reference_attack,
    run_evaluation,
    summarize,
)
from io_utils import ConfigError, check_writable, run_main, write_json
from layout import EVAL_RESULT_RE, eval_path
from models import family_config, load_tokenizer
from pretraining import resolve_model_path
from runtime import broadcast_object, init_distributed, is_main, seed_everything, setup_logging
from schema import EvalConfig, hydra_entry, register, to_dict, with_family_defaults
from tofu import load_tofu

log = logging.getLogger("loc_unlearn")

FORGET_SPLITS = ("forget01", "forget05", "forget10")
# Keys that never change per-sample values: a result with other values here is still reused.
NOT_CACHE_KEYS = ("overwrite", "retain_result")
# Bumped whenever the evaluator's per-sample values change meaning, so older JSONs are not reused.
# 2: generation also stops at the chat template's end-of-turn; MIA scores; es_convention=open_unlearning leaves
# the final label token out, as open-unlearning does.
FORMAT_VERSION = 2
# Files up to this size are fingerprinted by content; larger weight shards by size and modification time.
HASHED_FILE_BYTES = 64 << 20
register("eval_tofu", EvalConfig)


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The validated config with the family's max_length filled in and the splits in canonical order."""
    c = to_dict(cfg)
    c = with_family_defaults(c, family_config(c["model_family"]))
    if c["forget_split"] not in FORGET_SPLITS:
        raise ConfigError(f"unknown forget_split={c['forget_split']!r}; expected one of {list(FORGET_SPLITS)}")
    splits = c["splits"]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ConfigError(f"splits={splits} must be a non-empty subset of {list(SPLITS)}")
    c["splits"] = [s for s in SPLITS if s in splits]
    if str(c["retain_eval_split"]).startswith("forget"):
        raise ConfigError(f"retain_eval_split={c['retain_eval_split']} is a forget split; Retain Strength needs "
                          f"retained knowledge, e.g. retain_perturbed")
    if c["es_convention"] not in M.ES_CONVENTIONS:
        raise ConfigError(f"es_convention={c['es_convention']!r}; expected one of {list(M.ES_CONVENTIONS)}")
    for key in ("batch_size", "generation_batch_size", "max_new_tokens"):
        if c[key] < 1:
            raise ConfigError(f"{key}={c[key]!r} must be a positive integer")
    if c["max_samples"] is not None and c["max_samples"] < 1:
        raise ConfigError(f"max_samples={c['max_samples']!r} must be a positive integer or null")
    if c["retain_result"] and "forget" not in c["splits"]:
        raise ConfigError("retain_result gives forget quality, which needs `forget` in splits")
    if not 0 < c["mia_k"] <= 1:
        raise ConfigError(f"mia_k={c['mia_k']!r} must be a fraction in (0, 1]")
    if c["mia_reference_model"] and not (c["mia"] and "forget" in c["splits"]):
        raise ConfigError("mia_reference_model is for the reference attack: it needs mia=true and `forget` in splits")
    if isinstance(c["model_path"], list) and not (c["model_path"] and all(isinstance(m, str) for m in c["model_path"])):
        raise ConfigError(f"model_path={c['model_path']!r}; expected a model directory, a hub id, null, or a "
                          f"non-empty list of model directories")
    if len(model_paths(c)) > 1 and c["output_dir"]:
        raise ConfigError(f"output_dir={c['output_dir']} with {len(model_paths(c))} models; each writes into its own "
                          f"<model_path>/eval_results, so leave output_dir null")
    return c


def model_paths(c: dict[str, Any]) -> list[str | None]:
    return c["model_path"] if isinstance(c["model_path"], list) else [c["model_path"]]


def output_file(c: dict[str, Any]) -> Path:
    return eval_path(c["resolved_model_path"], c["forget_split"], c["output_dir"])


def model_fingerprint(model_path: str) -> str | None:
    """A digest of the files that define a model (weights, config, tokenizer); None when they cannot be found.

    Small files are hashed by content; large weight shards by size and modification time, which change whenever
    the weights are rewritten. A hub id is looked up in the local hub cache (whose snapshot path holds the commit).
    Evaluation results (eval_*.json) are skipped, so that output_dir may be the model directory itself.
    """
    directory = local_model_dir(model_path)
    if directory is None:
        return None
    digest = hashlib.sha256(str(directory).encode())
    files = sorted(p for p in directory.iterdir() if p.is_file() and not EVAL_RESULT_RE.fullmatch(p.name))
    for path in files:
        stat = path.stat()
        digest.update(path.name.encode())
        if stat.st_size <= HASHED_FILE_BYTES:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def holdout_split(forget_split: str) -> str:
    """The holdout split of a forget split's size: TOFU pairs forgetNN with holdoutNN for membership inference."""
    return forget_split.replace("forget", "holdout")


def load_data(c: dict[str, Any]) -> dict[str, list[dict]]:
    """The rows of every requested evaluation (first max_samples of each), keyed as run_evaluation expects."""
    names = {"forget": f"{c['forget_split']}_perturbed", **SPLIT_DATA}
    data = {split: load_tofu(names[split], c["data_path"]) for split in c["splits"]}
    if "retain" in c["splits"] and c["retain_eval_split"] != SPLIT_DATA["retain"]:
        data[RETAIN_ES] = load_tofu(c["retain_eval_split"], c["data_path"])
        names[RETAIN_ES] = c["retain_eval_split"]
    if c["mia"] and "forget" in c["splits"]:
        names[HOLDOUT] = holdout_split(c["forget_split"])
        data[HOLDOUT] = load_tofu(names[HOLDOUT], c["data_path"])
    data = {split: rows[: c["max_samples"]] for split, rows in data.items()}
    log.info("loaded %s from %s", ", ".join(f"{len(rows)} {names[s]}" for s, rows in data.items()),
             c["data_path"] or "the hub")
    return data


def load_retain_result(path: str, forget_split: str, questions: list[str]) -> dict[str, Any]:
    """The retain model's eval JSON, checked to score the same forget questions as this run."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"retain_result={path} does not exist; expected the retain model's eval JSON")
    try:
        other = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"retain_result={path} is not valid JSON ({err.msg})") from None
    theirs = other.get("config", {}).get("forget_split")
    if theirs != forget_split:
        raise ConfigError(f"retain_result={path} evaluates forget_split={theirs}, but this run evaluates "
                          f"forget_split={forget_split}; forget quality compares the same forget split")
    forget = other.get("per_sample", {}).get("forget", {})
    if "truth_ratio" not in forget:
        raise ConfigError(f"retain_result={path} has no forget-split truth ratios (run it with `forget` in splits)")
    if len(forget["question"]) != len(questions):
        raise ConfigError(f"retain_result={path} has {len(forget['question'])} {forget_split} samples, but this run "
                          f"has {len(questions)}; use the same data_path and max_samples for both")
    if forget["question"] != questions:
        raise ConfigError(f"retain_result={path} scores other {forget_split} questions than this run; "
                          f"use the same data_path for both")
    log.info("forget quality against the retain model's results in %s", path)
    return other


def retain_privleak_auc(other: dict[str, Any], path: str, c: dict[str, Any], holdout_questions: list[str]) -> float:
    """The retain model's AUC of the privleak attack (metrics.PRIVLEAK_ATTACK) from its stored per-sample scores,
    checked to be for the same holdout questions and min-k fraction as this run."""
    per_sample = other.get("per_sample", {})
    key = MIA_KEYS[M.PRIVLEAK_ATTACK]
    if key not in per_sample.get("forget", {}) or key not in per_sample.get(HOLDOUT, {}):
        raise ConfigError(f"retain_result={path} has no MIA scores, which privleak needs; evaluate the retain model "
                          f"with mia=true")
    theirs = other.get("config", {}).get("mia_k")
    if theirs != c["mia_k"]:
        raise ConfigError(f"retain_result={path} used mia_k={theirs}, this run mia_k={c['mia_k']}; privleak "
                          f"compares the same attack")
    if per_sample[HOLDOUT]["question"] != holdout_questions:
        raise ConfigError(f"retain_result={path} scores other {holdout_split(c['forget_split'])} questions than this "
                          f"run; use the same data_path and max_samples for both")
    auc = mia_aucs(per_sample)[M.PRIVLEAK_ATTACK]
    if auc >= 1.0:
        raise ConfigError(f"retain_result={path}: the retain model's own AUC is 1, so privleak is undefined")
    return auc


def cached_result(out: Path, c: dict[str, Any], fingerprint: str | None) -> dict[str, Any] | None:
    """The existing JSON at `out` if it was computed from this model and config, else None (with the reason logged)."""
    if c["overwrite"] or not out.is_file():
        return None
    if fingerprint is None:
        log.info("not reusing %s: the model files of %s cannot be fingerprinted", out, c["resolved_model_path"])
        return None
    try:
        old = json.loads(out.read_text())
    except json.JSONDecodeError:
        log.warning("not reusing %s: it is not valid JSON", out)
        return None
    if old.get("format_version") != FORMAT_VERSION or old.get("model", {}).get("fingerprint") != fingerprint:
        log.info("not reusing %s: it was computed from other model files or an older evaluator", out)
        return None
    if _cache_view(old.get("config", {})) != _cache_view(c):
        log.info("not reusing %s: it was computed with another config", out)
        return None
    return old


def _cache_view(c: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in c.items() if k not in NOT_CACHE_KEYS}


def evaluate(cfg: DictConfig) -> list[Path]:
    """Run the evaluations the config describes (every rank) and write their JSONs (rank 0); returns their paths."""
    _, world_size, device = init_distributed()
    setup_logging()
    c = resolve(cfg)
    configs = [{**c, "model_path": m, "resolved_model_path": resolve_model_path(c["model_family"], m, c["data_path"])}
               for m in model_paths(c)]
    for one in configs:
        check_writable(output_file(one).parent)
    data = load_data(c)
    retain = {"ratios": None, "auc": None}
    if c["retain_result"]:
        other = load_retain_result(c["retain_result"], c["forget_split"], [r["question"] for r in data["forget"]])
        retain["ratios"] = other["per_sample"]["forget"]["truth_ratio"]
        if HOLDOUT in data:
            retain["auc"] = retain_privleak_auc(other, c["retain_result"], c, [r["question"] for r in data[HOLDOUT]])
    reference_path = None
    if c["mia_reference_model"]:
        reference_path = resolve_model_path(c["model_family"], c["mia_reference_model"], c["data_path"])
    switcher = ModelSwitcher(device)
    return [evaluate_model(one, data, retain, reference_path, switcher, world_size) for one in configs]


def evaluate_model(c: dict[str, Any], data: dict[str, list[dict]], retain: dict[str, Any], reference_path: str | None,
                   switcher: ModelSwitcher, world_size: int) -> Path:
    """One model's evaluation, or its stored per-sample values when they are current; its JSON is written by rank 0."""
    seed_everything(c["seed"])
    out = output_file(c)
    fingerprint = model_fingerprint(c["resolved_model_path"]) if is_main() else None
    if reference_path and fingerprint:
        # The reference attack's scores depend on the reference model's files as well.
        other_print = model_fingerprint(reference_path)
        fingerprint = hashlib.sha256(f"{fingerprint}:{other_print}".encode()).hexdigest() if other_print else None
    cached = cached_result(out, c, fingerprint) if is_main() else None

    if broadcast_object(cached is not None):
        if not is_main():
            return out
        per_sample, timing = cached["per_sample"], cached["timing"]
        log.info("reusing the per-sample results in %s (same model files and config); recomputing the summary", out)
    else:
        family = family_config(c["model_family"])
        tokenizer = load_tokenizer(c["model_family"], c["resolved_model_path"])
        model = switcher.load(c["resolved_model_path"])
        settings = EvalSettings(**{k: c[k] for k in ("batch_size", "generation_batch_size", "max_new_tokens",
                                                     "max_length", "es_convention", "mia_k")})
        log.info("evaluating %s on %s with %d process(es)", c["resolved_model_path"], ", ".join(data), world_size)
        per_sample, timing = run_evaluation(model, tokenizer, family, data, settings)
        if reference_path:
            # The reference only adds its answer NLLs to the stored loss scores; it is released right after.
            start = time.perf_counter()
            reference = load_any_model(reference_path, switcher.device)
            for split, scores in reference_attack(reference, tokenizer, family, data, per_sample, settings).items():
                per_sample[split][MIA_KEYS["reference"]] = scores
            del reference
            seconds = time.perf_counter() - start
            n = len(data["forget"]) + len(data[HOLDOUT])
            timing["mia_reference"] = {"seconds": seconds, "samples": n, "samples_per_s": n / seconds}
        if not is_main():
            return out

    summary = summarize(per_sample, retain["ratios"], retain["auc"])
    write_json(out, {"format_version": FORMAT_VERSION, "config": c,
                     "model": {"path": c["resolved_model_path"], "fingerprint": fingerprint},
                     "summary": summary, "timing": timing, "per_sample": per_sample})
    log.info("summary: %s", ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if v is not None))
    log.info("wrote %s", out)
    return out


@hydra.main(version_base=None, config_path="config", config_name="eval_tofu")
def main(cfg: DictConfig) -> None:
    run_main(lambda: evaluate(cfg))


if __name__ == "__main__":
    hydra_entry(main, EvalConfig)
