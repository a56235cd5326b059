"""Bad input to the entry points, in-process: one clear line, exit status 2, nothing half-written.
tests/test_config.py runs each entry point once as a subprocess for the same contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_entry

from masks import save_mask
from synthetic_tofu import generate

TINY_MASK = [torch.tensor([0, 5]), torch.tensor([7])]


@pytest.fixture
def base(tiny_path, tmp_path):
    return ["model_family=tiny", f"model_path={tiny_path}", "data_path=synthetic", "forget_split=forget01",
            f"save_root={tmp_path / 'runs'}", "epochs=1", "batch_size=8"]


def _mask_variants(tmp_path: Path) -> dict[str, Path]:
    """One mask file refused before the model loads, one unreadable, one that needs the model's shape to refuse:
    every other refusal of masks.load_mask is tests/test_masks.py's."""
    files = {kind: tmp_path / f"{kind}.pt" for kind in ("missing", "corrupt", "other_shape")}
    files["corrupt"].write_bytes(b"not a zip file at all")
    save_mask(files["other_shape"], TINY_MASK + [torch.tensor([1])], {"method": "hand", "n_layers": 3, "d_ff": 512})
    return files


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("corrupt", "mask"),
                                           ("other_shape", "layer")])
def test_bad_mask_files(base, tmp_path, capsys, kind, message):
    path = _mask_variants(tmp_path)[kind]
    code, line = run_entry("unlearn.py", [*base, f"mask_path={path}"], capsys)
    assert code == 2 and line.startswith("error:") and message in line.lower() and str(path.name) in line
    assert not list((tmp_path / "runs").rglob("checkpoint-*"))


@pytest.mark.parametrize("override, message", [
    ("forget_loss=forget_everything", "unknown forget_loss='forget_everything'"),
    ("model_family=gpt5", "unknown model_family='gpt5'"),
    ("forget_split=forget50", "unknown TOFU split 'forget50'"),
    ("retain_split=retain50", "unknown TOFU split 'retain50'"),
    ("data_path=/nonexistent/tofu", "data_path=/nonexistent/tofu is not a directory"),
    ("hyper_param=big", "override hyper_param=big: Value 'big' of type 'str' could not be converted to Float"),
    ("lrr=1", "unknown key 'lrr' (did you mean lr?)"),
    ("+ratioo=1", "unknown key 'ratioo'"),
    ("precision=fp16", "precision='fp16'; expected one of ['bf16', 'fp32']"),
    ("precision=bf16", "full-parameter training with precision=bf16 and no fp32 master weights"),
    ("forget_loss=grad_diff retain_weight=2", "retain_weight=2.0: not read by forget_loss=grad_diff, which reads "
                                              "hyper_param (λ: weight of the retain NLL)"),
    ("forget_loss=learn hyper_param=3", "hyper_param=3.0: not read by forget_loss=learn, which reads no knob"),
    ("forget_loss=npo simnpo_gamma=1", "simnpo_gamma=1.0: not read by forget_loss=npo"),
    ("model_path=/etc", "model_path=/etc is not a model directory"),
    ("save_root=/etc/hostname/runs", "/etc/hostname is not a directory"),
    ("deepspeed=missing.json", "deepspeed=missing.json does not exist"),
    ("forget_loss=rt_diff", "needs retain_model_path"),
    ("save_format=zip", "save_format='zip'; expected one of ['compact', 'full'] or null"),
    ("save_format=compact", "save_format=compact holds the masked values only, so it needs mask_path"),
])
def test_bad_unlearn_config(base, tmp_path, capsys, override, message):
    code, line = run_entry("unlearn.py", [*base, *override.split()], capsys)
    assert code == 2 and line.startswith("error:") and message in line
    assert not list((tmp_path / "runs").rglob("checkpoint-*"))


def _synthetic_directory(path: Path) -> Path:
    """The synthetic data written as a TOFU directory of JSON-lines files."""
    path.mkdir()
    for split, rows in generate(0).items():
        (path / f"{split}.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bad_data_directory(base, tmp_path, capsys):
    data = _synthetic_directory(tmp_path / "tofu")
    lines = (data / "forget01.json").read_text().splitlines()
    (data / "forget01.json").unlink()
    code, line = run_entry("unlearn.py", [*base, f"data_path={data}"], capsys)
    assert code == 2 and f"expected the file {data / 'forget01.json'}" in line
    (data / "forget01.json").write_text("")
    code, line = run_entry("unlearn.py", [*base, f"data_path={data}"], capsys)
    assert code == 2 and "is empty" in line
    lines[6] = lines[6][:-5]
    (data / "forget01.json").write_text("\n".join(lines))
    code, line = run_entry("unlearn.py", [*base, f"data_path={data}"], capsys)
    assert code == 2 and f"{data / 'forget01.json'}:7: malformed JSON" in line


@pytest.mark.parametrize("override, message", [
    ("ratio=1.01", "ratio=1.01 must be a number in (0, 1]"),
    ("ratio=0", "ratio=0.0 must be a number in (0, 1]"),
    ("ratio=-0.1", "ratio=-0.1 must be a number in (0, 1]"),
    ("ratio=all", "override ratio=all: Value 'all' of type 'str' could not be converted to Float"),
    ("memflex_rule=strict", "memflex_rule='strict'; expected one of ['budget', 'threshold']"),
    ("ig_steps=2", "ig_steps=2: not read by attribution=activation, which reads progress (docs/attribution.md)"),
    ("attribution=magic", "unknown attribution='magic'"),
    ("variant=opposite", "unknown variant='opposite'"),
    ("variant=random_complement", "needs target_mask_path"),
    ("target_mask_path=nowhere.pt", "target_mask_path=nowhere.pt does not exist"),
    ("mask_root=/etc/hostname/masks", "is not a directory"),
])
def test_bad_mask_config(tiny_path, tmp_path, capsys, override, message):
    args = ["model_family=tiny", f"model_path={tiny_path}", "data_path=synthetic", "forget_split=forget01",
            f"mask_root={tmp_path}", override]
    code, line = run_entry("generate_mask.py", args, capsys)
    assert code == 2 and line.startswith("error:") and message in line
    assert not list(tmp_path.rglob("*.pt"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path, capsys):
    args = [*base, "forget_loss=ga", "lr=1e30", "max_grad_norm=0", "save_steps=1", "epochs=3"]
    code, line = run_entry("unlearn.py", args, capsys)
    assert code == 2 and "loss became" in line and "at step" in line
    step = int(line.split("at step ")[1].split(";")[0])
    kept = sorted((tmp_path / "runs").rglob("checkpoint-*"))
    assert kept and all(int(p.name.split("-")[1]) < step for p in kept)
    assert not any(json.loads((p / "trainer_state.json").read_text())["final"] for p in kept)


def test_a_run_directory_of_another_config_is_not_reused(base, tmp_path, capsys):
    out = f"output_dir={tmp_path / 'run'}"
    assert run_entry("unlearn.py", [*base, out, "seed=1"], capsys)[0] == 0
    code, line = run_entry("unlearn.py", [*base, out, "seed=2"], capsys)
    assert code == 2 and "holds a run with other settings (seed=1)" in line
