"""Compact checkpoints: the same weights as a full checkpoint, and refused without their starting model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import unlearn
from checkpoints import COMPACT_META, export, load_any_model, save_compact, starting_model_reference, weights_fingerprint
from conftest import ROOT
from masking import apply_value_vector_mask, plain_state_dict
from models import load_model, load_tokenizer
from runtime import ConfigError, run_main

CPU = torch.device("cpu")


@pytest.fixture
def theta_o(tiny_path, tmp_path) -> Path:
    """A writable copy of the tiny model, the starting model of the checkpoints below."""
    path = tmp_path / "theta_o"
    shutil.copytree(tiny_path, path, ignore=shutil.ignore_patterns("eval_results"))
    return path


def _trained(theta_o: Path, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """theta_o with a random 10% of its value vectors masked and moved, as a masked run leaves it."""
    model = load_model(str(theta_o), CPU, dtype)
    generator = torch.Generator().manual_seed(seed)
    d_ff = model.config.intermediate_size
    trainable = apply_value_vector_mask(model, [torch.randperm(d_ff, generator=generator)[: d_ff // 10]
                                                for _ in range(model.config.num_hidden_layers)])
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def _save(model: torch.nn.Module, theta_o: Path, path: Path, compact: bool) -> Path:
    path.mkdir(parents=True)
    if compact:
        save_compact(path, model, starting_model_reference(str(theta_o)))
    else:
        model.save_pretrained(path, state_dict=plain_state_dict(model))
    load_tokenizer("tiny", str(theta_o)).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_round_trip_equals_the_full_checkpoint(theta_o, tmp_path, dtype):
    model = _trained(theta_o, seed=1, dtype=dtype)
    full = load_file(str(_save(model, theta_o, tmp_path / "full", compact=False) / "model.safetensors"))
    compact = _save(model, theta_o, tmp_path / "compact", compact=True)
    assert not list(compact.glob("model*.safetensors"))
    loaded = load_any_model(str(compact), CPU, dtype).state_dict()
    assert loaded.keys() == full.keys() and all(torch.equal(loaded[k], full[k]) for k in full)
    exported = load_file(str(export(str(compact), str(tmp_path / "exported")) / "model.safetensors"))
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)
    assert (tmp_path / "exported" / "tokenizer.json").is_file() and not (tmp_path / "exported" / COMPACT_META).exists()


def test_fingerprint_survives_a_copy_and_sees_a_masked_change(theta_o, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in theta_o.iterdir():
        shutil.copy(file, copy / file.name)  # new modification times
    assert weights_fingerprint(copy) == weights_fingerprint(theta_o)
    # A masked run saved in full: only 10% of one layer's down_proj columns differ.
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][:, ::10] += 1e-3
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(copy) != weights_fingerprint(theta_o)


def _unlearn_exit(overrides: list[str], capsys) -> tuple[int, str]:
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = compose(config_name="forget_tofu", overrides=overrides)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: unlearn.unlearn(cfg))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_compact_checkpoint_without_its_starting_model_is_refused(theta_o, tmp_path, capsys):
    compact = _save(_trained(theta_o, seed=2), theta_o, tmp_path / "compact", compact=True)
    other = _trained(theta_o, seed=3)
    other.save_pretrained(theta_o, state_dict=plain_state_dict(other))  # theta_o's path now holds other weights
    with pytest.raises(ConfigError, match=r"was trained from other weights than those now in .*theta_o \(fingerprint"):
        load_any_model(str(compact), CPU)
    shutil.rmtree(theta_o)
    args = ["model_family=tiny", f"model_path={compact}", "data_path=synthetic", "forget_split=forget01",
            f"output_dir={tmp_path / 'run'}", "epochs=1"]
    code, line = _unlearn_exit(args, capsys)
    assert code == 2 and line.startswith(f"error: compact checkpoint {compact} needs its starting model")
    assert "which does not exist" in line
