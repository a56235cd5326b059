"""generate_mask.py as users run it: files, determinism, the complement, 1 vs 2 processes (torchrun); bad input is in
tests/test_hardening.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_entry

from masks import load_mask, save_mask


def _args(tiny_path: Path, root: Path, *extra: str) -> list[str]:
    return ["model_family=tiny", f"model_path={tiny_path}", "data_path=synthetic",
            "forget_split=forget01", "retain_subset=16", "batch_size=4", f"mask_root={root}", *extra]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _only_mask(root: Path) -> Path:
    (path,) = root.rglob("*.pt")
    return path


def _generate(capsys, *args: str) -> None:
    assert run_entry("generate_mask.py", args, capsys) == (0, "")


def test_same_seed_same_bytes_other_seed_other_mask(tiny_path, tmp_path, capsys):
    files = []
    for seed in (1, 1, 2):
        _generate(capsys, *_args(tiny_path, tmp_path, "attribution=random_down", f"seed={seed}", "overwrite=true"))
        path = _only_mask(tmp_path)
        files.append((path.name, path.read_bytes()))
        path.unlink()
    (name_a, a), (name_b, b), (_, c) = files
    assert name_a == name_b == "random_down_mask_normal_0.1_s1.pt"
    assert a == b
    ia, ic = load_mask(_write(tmp_path / "a.pt", a))[0], load_mask(_write(tmp_path / "c.pt", c))[0]
    assert sum(len(i) for i in ia) == round(0.1 * 2 * 512) == sum(len(i) for i in ic)
    assert any(not torch.equal(x, y) for x, y in zip(ia, ic))


def test_one_and_two_processes_give_the_same_mask(run_script, tiny_path, tmp_path, capsys):
    _generate(capsys, *_args(tiny_path, tmp_path / "one", "attribution=wagle_down"))
    two = run_script("generate_mask.py", *_args(tiny_path, tmp_path / "two", "attribution=wagle_down"), nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    i1, i2 = load_mask(_only_mask(tmp_path / "one"))[0], load_mask(_only_mask(tmp_path / "two"))[0]
    assert all(torch.equal(x, y) for x, y in zip(i1, i2))


def test_complement_is_disjoint_and_same_size(tiny_path, tmp_path, capsys):
    _generate(capsys, *_args(tiny_path, tmp_path, "attribution=activation"))
    target = _only_mask(tmp_path)
    _generate(capsys, *_args(tiny_path, tmp_path, "attribution=activation", "variant=random_complement",
                             f"target_mask_path={target}"))
    comp = next(p for p in tmp_path.rglob("*.pt") if "random_complement" in p.name)
    (t, _), (c, meta) = load_mask(target), load_mask(comp)
    assert meta["variant"] == "random_complement"
    assert sum(map(len, t)) == sum(map(len, c))
    assert all(not set(x.tolist()) & set(y.tolist()) for x, y in zip(t, c))


@pytest.mark.parametrize("extra", [(), ("variant=random_complement", "target_mask_path=TARGET")])
def test_shape_only_masks_load_no_weights(tiny_path, tmp_path, monkeypatch, extra):
    """random_down, and any random_complement, read the model's config only; the mask is the one the model gives."""
    from omegaconf import OmegaConf

    import generate_mask
    from mask_generator import compute_scores
    from masks import select_top
    from models import load_model

    model = load_model(str(tiny_path), torch.device("cpu"))
    target = tmp_path / "target.pt"
    save_mask(target, [torch.tensor([0, 1]), torch.tensor([2])], {"n_layers": 2, "d_ff": 512})

    def refuse(*args, **kwargs):
        raise AssertionError("model weights loaded for a shape-only mask")

    monkeypatch.setattr(generate_mask, "load_any_model", refuse)
    cfg = OmegaConf.load(Path(generate_mask.__file__).parent / "config" / "get_mask_tofu.yaml")
    del cfg["hydra"], cfg["defaults"]
    args = (*_args(tiny_path, tmp_path / "m"), "attribution=random_down", *extra)
    overrides = [a.replace("TARGET", str(target)) for a in args]
    generate_mask.generate(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))
    indices, _ = load_mask(_only_mask(tmp_path / "m"))
    if not extra:
        expected = select_top(compute_scores("random_down", model, None, None, {"seed": 42}), 0.1)
        assert all(torch.equal(a, b) for a, b in zip(indices, expected))
    else:
        assert sum(map(len, indices)) == 3 and not set(indices[0].tolist()) & {0, 1}


def test_unreadable_config_is_a_config_error(tmp_path):
    import generate_mask
    from runtime import ConfigError

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not load a model config from"):
        generate_mask.load_shape(str(tmp_path))
