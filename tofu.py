"""TOFU's splits as rows: from a directory of JSON-lines files, the synthetic stand-in, or the hub.

This sits below models.py (the tiny family trains its tokenizer on these rows) and dataloader.py (which turns them
into token ids), so neither has to import the other to read the data.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from io_utils import ConfigError

HUB_DATASET = "locuslab/TOFU"
SYNTHETIC = "synthetic"

_QA = ("question", "answer")
_PERTURBED = (*_QA, "paraphrased_answer", "perturbed_answer", "paraphrased_question")
_OPTIONS = (*_QA, "option1", "option2", "option3", "option4")
TOFU_CONFIGS: dict[str, tuple[str, ...]] = {
    "full": _QA,
    **{f"forget{p}": _QA for p in ("01", "05", "10")},
    **{f"retain{p}": _QA for p in ("90", "95", "99")},
    **{f"holdout{p}": _QA for p in ("01", "05", "10")},
    **{f"forget{p}_perturbed": _PERTURBED for p in ("01", "05", "10")},
    "retain_perturbed": _PERTURBED,
    "real_authors": _OPTIONS,
    "world_facts": _OPTIONS,
    "real_authors_perturbed": (*_QA, "perturbed_answer"),
    "world_facts_perturbed": (*_QA, "perturbed_answer"),
}


@functools.lru_cache(maxsize=4)
def _synthetic(seed: int, n_authors: int) -> dict[str, list[dict]]:
    from synthetic_tofu import generate

    return generate(seed, n_authors)


def synthetic_authors(data_path: str | None) -> int | None:
    """The number of authors of a synthetic `data_path` (`synthetic`: TOFU's 200, `synthetic:N`: N), else None."""
    from synthetic_tofu import MIN_AUTHORS, N_AUTHORS

    if data_path == SYNTHETIC:
        return N_AUTHORS
    if not (data_path or "").startswith(SYNTHETIC + ":"):
        return None
    count = data_path.split(":", 1)[1]
    if not count.isdigit() or int(count) < MIN_AUTHORS:
        raise ConfigError(f"data_path={data_path}: expected {SYNTHETIC}:N with N >= {MIN_AUTHORS} authors")
    return int(count)


def load_tofu(name: str, data_path: str | None = None) -> list[dict[str, Any]]:
    """Rows of one TOFU config from `data_path` (a directory of JSON-lines files), `synthetic[:N]`, or the hub."""
    if name not in TOFU_CONFIGS:
        raise ConfigError(f"unknown TOFU split {name!r}; expected one of {sorted(TOFU_CONFIGS)}")
    n_authors = synthetic_authors(data_path)
    if n_authors is not None:
        return _synthetic(0, n_authors)[name]
    if data_path:
        rows = _read_jsonl(Path(data_path), name)
    else:
        rows = _load_from_hub(name)
    if not rows:
        raise ConfigError(f"TOFU split {name!r} from {data_path or HUB_DATASET} is empty")
    return rows


def _read_jsonl(directory: Path, name: str) -> list[dict[str, Any]]:
    if not directory.is_dir():
        raise ConfigError(f"data_path={directory} is not a directory; expected a folder of TOFU JSON-lines files")
    path = directory / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"TOFU split {name!r} not found: expected the file {path}")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
            missing = [k for k in TOFU_CONFIGS[name] if k not in row] if isinstance(row, dict) else ["(not an object)"]
            if missing:
                raise ConfigError(f"{path}:{lineno}: missing field(s) {missing}; expected {list(TOFU_CONFIGS[name])}")
            rows.append(row)
    return rows


def _load_from_hub(name: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        return list(load_dataset(HUB_DATASET, name, split="train"))
    except Exception as err:  # the hub raises many types (network, auth, missing config)
        raise ConfigError(
            f"could not load TOFU split {name!r} from the hub dataset {HUB_DATASET} ({type(err).__name__}); "
            f"pass data_path=<directory with {name}.json> or data_path={SYNTHETIC}"
        ) from None


def retain_split_for(forget_split: str) -> str:
    """The retain split that, with `forget_split`, makes up `full` (retain90 for anything else)."""
    return {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}.get(forget_split, "retain90")
