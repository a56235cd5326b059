"""Compact checkpoints: the same weights as a full checkpoint, refused without their starting model, and a trajectory
evaluated in one process with the same numbers as one process per checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_entry
from safetensors.torch import load_file, save_file

import checkpoints
import eval_tofu
from checkpoints import (
    COMPACT_META,
    ModelSwitcher,
    export,
    load_any_model,
    save_compact,
    starting_model_reference,
    weights_fingerprint,
)
from masking import MaskedValues, plain_state_dict
from masks import load_mask
from models import load_model, load_tokenizer
from runtime import ConfigError

CPU = torch.device("cpu")
SMALL_EVAL = ["model_family=tiny", "data_path=synthetic", "forget_split=forget01", "max_samples=4", "max_new_tokens=4",
              "batch_size=4", "generation_batch_size=4", "splits=[forget,retain]"]


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
    trainable = MaskedValues([torch.randperm(d_ff, generator=generator)[: d_ff // 10]
                              for _ in range(model.config.num_hidden_layers)]).attach(model).parameters()
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


def test_a_bf16_swap_equals_loading_the_checkpoint_alone(theta_o, tmp_path):
    # The GPU's dtype: the switcher loads theta_o in bf16 and swaps bf16 values in and back out exactly.
    first, second = (_save(_trained(theta_o, seed=s, dtype=torch.bfloat16), theta_o, tmp_path / f"c{s}", compact=True)
                     for s in (1, 2))
    switcher = ModelSwitcher(CPU, torch.bfloat16)
    switcher.load(str(first))
    swapped = switcher.load(str(second)).state_dict()
    alone = load_any_model(str(second), CPU, torch.bfloat16).state_dict()
    assert {t.dtype for t in swapped.values()} == {torch.bfloat16}
    assert swapped.keys() == alone.keys() and all(torch.equal(swapped[k], alone[k]) for k in alone)
    down = "model.layers.0.mlp.down_proj.weight"  # and the first checkpoint's values are gone
    assert not torch.equal(swapped[down], load_any_model(str(first), CPU, torch.bfloat16).state_dict()[down])


def test_export_of_a_full_directory_is_one_clear_error(theta_o, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        checkpoints.main(["export", str(theta_o), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip() == f"error: {theta_o} is not a compact checkpoint (no {COMPACT_META})"


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


def test_a_compact_checkpoint_without_its_starting_model_is_refused(theta_o, tmp_path, capsys):
    compact = _save(_trained(theta_o, seed=2), theta_o, tmp_path / "compact", compact=True)
    other = _trained(theta_o, seed=3)
    other.save_pretrained(theta_o, state_dict=plain_state_dict(other))  # theta_o's path now holds other weights
    with pytest.raises(ConfigError, match=r"was trained from other weights than those now in .*theta_o \(fingerprint"):
        load_any_model(str(compact), CPU)
    shutil.rmtree(theta_o)
    args = ["model_family=tiny", f"model_path={compact}", "data_path=synthetic", "forget_split=forget01",
            f"output_dir={tmp_path / 'run'}", "epochs=1"]
    code, line = run_entry("unlearn.py", args, capsys)
    assert code == 2 and line.startswith(f"error: compact checkpoint {compact} needs its starting model")
    assert "which does not exist" in line


def _activation_mask(model: Path, mask_root: Path, capsys) -> list[torch.Tensor]:
    assert run_entry("generate_mask.py", ["model_family=tiny", f"model_path={model}", "data_path=synthetic",
                                          "forget_split=forget01", "attribution=activation", "batch_size=8",
                                          f"mask_root={mask_root}"], capsys) == (0, "")
    (path,) = mask_root.rglob("*.pt")
    return load_mask(path)[0]


def test_generate_mask_scores_a_compact_checkpoint_as_its_export(theta_o, tmp_path, capsys):
    compact = _save(_trained(theta_o, seed=5), theta_o, tmp_path / "compact", compact=True)
    exported = export(str(compact), str(tmp_path / "exported"))
    from_compact = _activation_mask(compact, tmp_path / "masks_compact", capsys)
    from_export = _activation_mask(exported, tmp_path / "masks_full", capsys)
    assert all(torch.equal(a, b) for a, b in zip(from_compact, from_export))
    # Not the starting model's mask: the checkpoint's values were used.
    from_theta_o = _activation_mask(theta_o, tmp_path / "masks_o", capsys)
    assert not all(torch.equal(a, b) for a, b in zip(from_compact, from_theta_o))


def _evaluate(*overrides: str) -> list[dict]:
    cfg = compose_config("eval_tofu", [*SMALL_EVAL, *overrides])
    return [json.loads(path.read_text()) for path in eval_tofu.evaluate(cfg)]


def test_a_trajectory_in_one_process_equals_one_evaluation_per_model(theta_o, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    models = [theta_o, *(_save(_trained(theta_o, seed=s), theta_o, run / f"checkpoint-{s}", compact=True)
                         for s in (1, 2)),
              _save(_trained(theta_o, seed=3), theta_o, run / "checkpoint-3", compact=False),
              _save(_trained(theta_o, seed=4), theta_o, run / "checkpoint-4", compact=True)]
    separate = [_evaluate(f"model_path={m}", f"output_dir={tmp_path / 'separate' / m.name}")[0] for m in models]

    loads = []
    real_load = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model",
                        lambda path, *a: loads.append(Path(path).name) or real_load(path, *a))
    listed = "model_path=[" + ",".join(f"'{m}'" for m in models) + "]"
    together = _evaluate(listed)
    # theta_o once for checkpoints 1 and 2, the full checkpoint 3, then theta_o again for checkpoint 4.
    assert loads == ["theta_o", "checkpoint-3", "theta_o"]
    for one, alone, model in zip(together, separate, models):
        assert one["config"]["model_path"] == str(model)
        assert one["model"]["fingerprint"] == alone["model"]["fingerprint"]
        for split, values in alone["per_sample"].items():
            for key, value in values.items():
                if key in ("question", "generation"):
                    assert one["per_sample"][split][key] == value
                else:
                    np.testing.assert_allclose(one["per_sample"][split][key], value, rtol=1e-6, atol=1e-6)
    assert len({json.dumps(r["per_sample"]["forget"]["prob"]) for r in together}) == len(models)

    capsys.readouterr()
    loads.clear()
    assert _evaluate(listed) == together  # resumable: current results are reused, no model is loaded
    assert loads == [] and capsys.readouterr().out.count("reusing the per-sample results") == len(models)
