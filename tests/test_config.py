"""The config layer: the YAMLs agree with their typed schemas, the docs' key and knob tables with the schemas and the
registries, and a bad key or value is one line and exit status 2 before any work."""
from __future__ import annotations

import re

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

import eval_tofu
import generate_mask
import sweep
import unlearn
from dataloader import LOSSES, get_loss
from mask_generator import ATTRIBUTION_KNOBS, compute_scores
from schema import Knob, attribution_table, loss_table, one_line_errors, schema_keys, with_family_defaults

ENTRIES = {"unlearn.py": ("forget_tofu", unlearn.SCHEMA), "generate_mask.py": ("get_mask_tofu", generate_mask.SCHEMA),
           "eval_tofu.py": ("eval_tofu", eval_tofu.EvalConfig), "sweep.py": ("sweep_tofu", sweep.SCHEMA)}


@pytest.mark.parametrize("entry", ENTRIES)
def test_yaml_sets_exactly_the_schema_keys(entry):
    """Composition fails on a YAML key the schema lacks; a schema key the YAML leaves unset stays MISSING."""
    config, schema = ENTRIES[entry]
    cfg = compose_config(config)
    assert not OmegaConf.missing_keys(cfg)
    assert list(cfg) == schema_keys(schema)


def _readme_keys(entry: str) -> set[str]:
    section = re.search(rf"^## `{re.escape(entry)}`.*?(?=^## )", (ROOT / "README.md").read_text(), re.M | re.S)
    table = re.search(r"^\| key \| meaning \(default\) \|\n\|---\|---\|\n((?:\|.*\n)+)", section.group(0), re.M)
    return {key for row in table.group(1).splitlines() for key in re.findall(r"`(\w+)`", row.split("|")[1])}


@pytest.mark.parametrize("entry", ENTRIES)
def test_readme_key_table_is_the_schema(entry):
    config, schema = ENTRIES[entry]
    assert _readme_keys(entry) == set(schema_keys(schema))


def test_docs_knob_tables_are_the_registries():
    assert loss_table(LOSSES.values()) in (ROOT / "docs" / "losses.md").read_text()
    assert attribution_table(ATTRIBUTION_KNOBS) in (ROOT / "docs" / "attribution.md").read_text()


def test_a_library_caller_gets_the_declared_defaults():
    assert get_loss("npo").resolve({})["hyper_param"] == 0.1
    assert get_loss("simnpo").resolve({"hyper_param": None}) == {"hyper_param": 2.5, "retain_weight": 1.0,
                                                                 "simnpo_gamma": 0.0}
    with pytest.raises(ValueError, match=r"hyper_param='big'; expected a number"):
        get_loss("npo").resolve({"hyper_param": "big"})
    with pytest.raises(ValueError, match=r"ig_mode='none'; expected one of \['layer', 'all'\]"):
        compute_scores("ig_down", None, [], None, {"ig_mode": "none"})


def test_knob_checks():
    assert Knob("k", 1.0, "").check(2) == 2.0 and isinstance(Knob("k", 1.0, "").check(2), float)
    for knob, bad in ((Knob("k", 1, ""), 1.5), (Knob("k", 1.0, ""), True), (Knob("k", "a", "", ("a",)), "b"),
                      (Knob("k", True, ""), 1)):
        with pytest.raises(ValueError, match=f"k={bad!r}; expected"):
            knob.check(bad)
    assert Knob("k", None, "", type=int).check(None) is None


def test_family_defaults_fill_only_null_keys_the_family_defines():
    family = {"lr": 1e-5, "max_length": 512, "hf_key": "x"}
    assert with_family_defaults({"lr": None, "max_length": 64, "seed": None}, family) == {
        "lr": 1e-5, "max_length": 64, "seed": None}


@pytest.mark.parametrize("override, line", [
    ("lrr=1", "unknown key 'lrr' (did you mean lr?)"),
    ("lr=abc", "Error merging override lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("epochs=2.5", "Error merging override epochs=2.5: Value '2.5' of type 'float' could not be converted to Integer"),
    ("save_checkpoint=maybe", "Error merging override save_checkpoint=maybe: Value 'maybe' is not a valid bool"),
    ("lr=[1", "cannot parse the overrides: no viable alternative at input '[1'"),
])
def test_hydra_errors_are_one_line(capsys, override, line):
    with pytest.raises(SystemExit) as exit_info, one_line_errors(schema_keys(unlearn.SCHEMA)):
        compose_config("forget_tofu", [override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {line}")


@pytest.mark.parametrize("entry, args", [("unlearn.py", ("lr=abc",)), ("generate_mask.py", ("ratioo=1",)),
                                         ("eval_tofu.py", ("+ratioo=1",)), ("sweep.py", ("-m", "lr=abc"))])
def test_entry_point_refuses_a_misspelt_key_in_one_line(run_script, tmp_path, entry, args):
    """The subprocess contract, once per entry point (the cases are in-process in tests/test_hardening.py): Hydra's
    multi-line report becomes one line, status 2, nothing written."""
    result = run_script(str(ROOT / entry), *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert "unknown key 'ratioo'" in result.stderr or "lr=abc" in result.stderr
    assert not list(tmp_path.iterdir())
