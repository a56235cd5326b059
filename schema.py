"""The typed configs of the entry points, and the knobs the loss and attribution registries declare.

Torch-free (imports no model code), so the config layer can be checked and documented without loading a model.

Where each default lives, stated once:
- an entry point's own keys: its YAML in config/ (with a comment per key); the dataclasses here give their types only
  (every field MISSING), so a YAML key the schema lacks, or a schema key the YAML does not set, fails composition;
- a loss's or an attribution method's knobs: the `Knob`s declared at its registration (dataloader.py,
  mask_generator.py); the entry point adds them to its schema with `with_knobs`, and the library fills them in for
  callers that pass a partial config;
- keys left null that the model family defines (lr, max_length, ...): config/model_config.yaml, filled in by
  `with_family_defaults`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Knob:
    """One setting of a registered loss or attribution method: its config key (or, for a loss's `hyper_param`, the
    symbol it stands for), default, meaning and, for strings, the allowed values. `type` defaults to the default's."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    type: type | None = None

    @property
    def value_type(self) -> type:
        return self.type or type(self.default)

    def check(self, value: Any, key: str | None = None) -> Any:
        """`value` if it is one this knob takes (an int for a float knob becomes a float); else a ValueError that
        names it as `key` (default: the knob's name)."""
        kind = self.value_type
        if value is None and self.default is None:
            return None
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
        if self.choices and value not in self.choices:
            ok = False
        if not ok:
            expected = f"one of {list(self.choices)}" if self.choices else _TYPE_NAMES.get(kind, kind.__name__)
            or_null = " or null" if self.default is None else ""
            raise ValueError(f"{key or self.name}={value!r}; expected {expected}{or_null}")
        return float(value) if kind is float else value


def knob_values(knobs: Iterable[Knob], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`cfg` with every knob it lacks set to the knob's default and every knob's value checked."""
    out = dict(cfg)
    for knob in knobs:
        out[knob.name] = knob.check(cfg.get(knob.name, knob.default))
    return out


def unique_knobs(groups: Iterable[Iterable[Knob]]) -> list[Knob]:
    """The knobs of several registrations, each once; a name declared twice must be the same knob."""
    seen: dict[str, Knob] = {}
    for knob in (k for group in groups for k in group):
        if seen.setdefault(knob.name, knob) != knob:
            raise ValueError(f"knob {knob.name!r} is declared twice with different settings: {seen[knob.name]} vs "
                             f"{knob}")
    return list(seen.values())


def foreign_knobs(own: Iterable[Knob], every: Iterable[Knob], cfg: Mapping[str, Any]) -> list[str]:
    """`key=value` of the knobs in `cfg` that are set away from their default but are not in `own`: settings the
    chosen loss or method would silently ignore."""
    mine = {k.name for k in own}
    return [f"{k.name}={cfg[k.name]!r}" for k in every
            if k.name not in mine and k.name in cfg and cfg[k.name] != k.default]


# ---- the entry points' schemas: types only, the values come from config/<name>.yaml ----


@dataclass
class TofuRunConfig:
    """The keys every entry point has, with one meaning: the model family, the data, the forget split, the token
    budget per example and the seed."""

    model_family: str = MISSING
    data_path: str | None = MISSING
    forget_split: str = MISSING
    max_length: int | None = MISSING
    seed: int = MISSING


@dataclass
class UnlearnConfig(TofuRunConfig):
    model_path: str | None = MISSING
    retain_split: str | None = MISSING
    forget_loss: str = MISSING
    hyper_param: float | None = MISSING
    replay: float | None = MISSING
    idk_path: str | None = MISSING
    retain_model_path: str | None = MISSING
    mask_path: str | None = MISSING
    lora_r: int = MISSING
    lora_alpha: float = MISSING
    lora_dropout: float = MISSING
    lr: float | None = MISSING
    weight_decay: float | None = MISSING
    epochs: int | None = MISSING
    batch_size: int | None = MISSING
    grad_accum: int | None = MISSING
    warmup_ratio: float | None = MISSING
    group_by_length: bool | None = MISSING
    lr_scheduler: str = MISSING
    max_grad_norm: float = MISSING
    precision: str | None = MISSING
    save_root: str | None = MISSING
    output_dir: str | None = MISSING
    save_checkpoint: bool = MISSING
    save_steps: int = MISSING
    save_each_epoch: bool = MISSING
    save_format: str | None = MISSING
    deepspeed: str | None = MISSING
    report_to: str = MISSING


@dataclass
class MaskConfig(TofuRunConfig):
    model_path: str | None = MISSING
    retain_split: str | None = MISSING
    retain_subset: int = MISSING
    attribution: str = MISSING
    variant: str = MISSING
    target_mask_path: str | None = MISSING
    ratio: float = MISSING
    per_layer: bool = MISSING
    mask_root: str = MISSING
    overwrite: bool = MISSING
    batch_size: int = MISSING


@dataclass
class EvalConfig(TofuRunConfig):
    model_path: Any = MISSING  # a path, a hub id, null, or a list of paths (OmegaConf has no Union type)
    retain_eval_split: str = MISSING
    splits: list[str] = MISSING
    batch_size: int = MISSING
    generation_batch_size: int = MISSING
    max_new_tokens: int = MISSING
    es_convention: str = MISSING
    mia: bool = MISSING
    mia_k: float = MISSING
    mia_reference_model: str | None = MISSING
    max_samples: int | None = MISSING
    retain_result: str | None = MISSING
    output_dir: str | None = MISSING
    overwrite: bool = MISSING


@dataclass
class SweepConfig(TofuRunConfig):
    model_path: str | None = MISSING
    mask_path: str | None = MISSING
    retain_result: str | None = MISSING
    forget_loss: str = MISSING
    lr: float | None = MISSING
    hyper_param: float | None = MISSING
    epochs: int | None = MISSING
    unlearn_args: list[str] = MISSING
    eval_args: list[str] = MISSING
    aues: str = MISSING
    mu_threshold: float = MISSING
    select: str = MISSING
    save_root: str = MISSING


def with_knobs(schema: type, knobs: Sequence[Knob]) -> type:
    """`schema` plus one field per knob, typed and defaulted by the knob (the registries' knobs become keys)."""
    fields = [(k.name, k.value_type | None if k.default is None else k.value_type, field(default=k.default))
              for k in knobs]
    return dataclasses.make_dataclass(schema.__name__, fields, bases=(schema,))


def register(config_name: str, schema: type, knobs: Sequence[Knob] = ()) -> type:
    """Store `schema`, plus a field per knob (`with_knobs`), under the name config/<config_name>.yaml lists first in
    its defaults; return the schema stored."""
    schema = with_knobs(schema, knobs) if knobs else schema
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    return schema


def schema_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def with_family_defaults(c: Mapping[str, Any], family: Mapping[str, Any]) -> dict[str, Any]:
    """`c` with every key left null that the model family defines (lr, epochs, max_length, ...) set to the family's
    value: the one place where model_config.yaml's training defaults reach an entry point."""
    return {k: family[k] if v is None and k in family else v for k, v in c.items()}


# ---- one-line errors for what Hydra rejects ----


def error_line(err: Exception, keys: Sequence[str]) -> str:
    """Hydra's composition error as one line that names the key or value and what was expected."""
    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return unknown_key_line(str(cause.full_key), keys)
    if isinstance(err, OverrideParseException):
        return f"cannot parse the overrides: {str(err).splitlines()[0]} (Hydra's override grammar)"
    detail = f": {str(cause.msg).splitlines()[0]}" if getattr(cause, "msg", None) else ""
    return " ".join(f"{str(err).splitlines()[0]}{detail}".split())


def unknown_key_line(key: str, keys: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key!r}{hint}; expected one of {sorted(keys)}"


def added_keys(argv: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Keys that `+key=value` / `++key=value` overrides would add to a config whose schema lacks them: Hydra lets
    `+` bypass a structured config's key check, so it is checked here."""
    added = (a.lstrip("+").split("=", 1)[0] for a in argv if a.startswith("+"))
    return [k for k in added if k.split(".", 1)[0] not in (*keys, "hydra")]


@contextlib.contextmanager
def one_line_errors(keys: Sequence[str]) -> Iterator[None]:
    """Print Hydra's config errors (unknown key, mistyped value, bad override syntax) as `error: ...` and exit with
    status 2, the contract of runtime.run_main's ConfigError, before any work."""
    try:
        yield
    except CompactHydraException as err:
        print(f"error: {error_line(err, keys)}", file=sys.stderr)
        raise SystemExit(2) from None


def hydra_entry(main: Any, schema: type) -> None:
    """Run a @hydra.main function with one-line config errors.

    HYDRA_FULL_ERROR makes Hydra raise its errors instead of printing them over several lines with a stack hint,
    so they reach one_line_errors; errors of the job itself then keep their ordinary Python traceback.
    """
    keys = schema_keys(schema)
    with one_line_errors(keys):
        if bad := added_keys(sys.argv[1:], keys):
            print(f"error: {unknown_key_line(bad[0], keys)}", file=sys.stderr)
            raise SystemExit(2)
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        main()


# ---- the docs' tables, rendered from the registries (`python mask_generator.py knobs`; test_config.py compares) ----


def attribution_table(knobs: Mapping[str, Sequence[Knob]]) -> str:
    """docs/attribution.md's table: every method's knobs, with defaults and meanings."""
    lines = ["| method | key | default | meaning |", "|---|---|---|---|"]
    for method, own in knobs.items():
        if not own:
            lines.append(f"| `{method}` | – | – | no knob (`seed` only) |")
        for knob in own:
            choices = f" ({' / '.join(knob.choices)})" if knob.choices else ""
            lines.append(f"| `{method}` | `{knob.name}` | {_yaml(knob.default)} | {knob.help}{choices} |")
    return "\n".join(lines)


def loss_table(specs: Iterable[Any]) -> str:
    """docs/losses.md's table from LossSpecs: what `hyper_param` means per loss, and which read retain_weight."""
    lines = ["| name | `hyper_param` | default | meaning | reads `retain_weight` | other knobs |",
             "|---|---|---|---|---|---|"]
    for spec in specs:
        hp = spec.hyper_param
        cells = [hp.name, _yaml(hp.default), hp.help] if hp else ["–", "–", "(none: setting it is an error)"]
        others = ", ".join(f"`{k.name}` ({_yaml(k.default)}: {k.help})" for k in spec.knobs
                           if k.name != "retain_weight")
        name = "rmu_<layer>" if spec.name == "rmu" else spec.name
        reads_retain_weight = "yes" if spec.uses_retain_weight else "no"
        lines.append(f"| `{name}` | {' | '.join(cells)} | {reads_retain_weight} | {others or '–'} |")
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

