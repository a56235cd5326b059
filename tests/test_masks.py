"""Tests for masks.py: selection, the random complement, the mask file's validation and the compare CLI."""
from __future__ import annotations

import json

import pytest
import torch

import masks

D_FF = 24


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_select_top_exact_counts(ratio):
    scores = torch.rand(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sel = masks.select_top(scores, ratio)
    assert sum(len(t) for t in sel) == round(ratio * 120)
    chosen = {(l, int(i)) for l, t in enumerate(sel) for i in t}
    others = [scores[l, i].item() for l in range(3) for i in range(40) if (l, i) not in chosen]
    if others:
        assert min(scores[l, i].item() for l, i in chosen) >= max(others)
    per = masks.select_top(scores, ratio, per_layer=True)
    assert [len(t) for t in per] == [round(ratio * 40)] * 3
    for l, t in enumerate(per):
        assert t.dtype == torch.int64 and torch.equal(t, torch.sort(t).values)
        rest = [scores[l, i].item() for i in range(40) if i not in set(t.tolist())]
        if rest:
            assert scores[l, t].min().item() >= max(rest)


def test_select_top_ties_and_bad_ratio():
    scores = torch.zeros(2, 5)
    assert [t.tolist() for t in masks.select_top(scores, 0.3)] == [[0, 1, 2], []]  # ties: lowest flat index first
    assert [t.tolist() for t in masks.select_top(scores, 0.4, per_layer=True)] == [[0, 1], [0, 1]]
    for bad in (0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
            masks.select_top(scores, bad)
    with pytest.raises(ValueError, match="selects 0 vectors"):
        masks.select_top(scores, 0.01)
    with pytest.raises(ValueError, match="NaN"):
        masks.select_top(torch.tensor([[float("nan"), 1.0]]), 0.5)


def test_random_complement():
    target = [torch.tensor([0, 3, 5]), torch.tensor([], dtype=torch.long), torch.tensor([9])]
    comp = masks.random_complement(target, d_ff=10, n_layers=3, count=12, seed=7)
    assert sum(len(t) for t in comp) == 12
    for t, c in zip(target, comp):
        assert not set(t.tolist()) & set(c.tolist())
        assert len(set(c.tolist())) == len(c) and all(0 <= i < 10 for i in c.tolist())
    assert all(torch.equal(a, b) for a, b in zip(comp, masks.random_complement(target, 10, 3, 12, 7)))
    assert not all(torch.equal(a, b) for a, b in zip(comp, masks.random_complement(target, 10, 3, 12, 8)))
    full = masks.random_complement(target, 10, 3, 26, 0)  # everything that is left
    assert sum(len(t) for t in full) == 26
    with pytest.raises(ValueError, match="only 26"):
        masks.random_complement(target, 10, 3, 27, 0)


def test_load_mask_rejections(tmp_path):
    good = [torch.tensor([1, 2]), torch.tensor([0])]
    meta = masks.make_meta("x", "global", 0.1, 0, "fam", 2, D_FF, "forget10", "t")
    path = tmp_path / "m.pt"
    masks.save_mask(path, good, meta)
    with pytest.raises(ValueError, match="has 2 layers but the model has 3"):
        masks.load_mask(path, n_layers=3, d_ff=D_FF)
    with pytest.raises(ValueError, match="d_ff=24 but the model has d_ff=32"):
        masks.load_mask(path, n_layers=2, d_ff=32)
    with pytest.raises(ValueError, match="mask file not found"):
        masks.load_mask(tmp_path / "missing.pt")
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        masks.load_mask(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="unreadable"):
        masks.load_mask(tmp_path / "junk.pt")
    torch.save({"indices": good}, tmp_path / "notmask.pt")
    with pytest.raises(ValueError, match="not a loc-unlearn mask"):
        masks.load_mask(tmp_path / "notmask.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a loc-unlearn mask"):
        masks.load_mask(tmp_path / "list.pt")
    raw = {"format": masks.MASK_FORMAT, "meta": {"d_ff": D_FF}}
    torch.save({**raw, "indices": [torch.tensor([1, D_FF]), torch.tensor([0])]}, tmp_path / "range.pt")
    with pytest.raises(ValueError, match=r"layer 0 has index 24 out of range \[0, 24\)"):
        masks.load_mask(tmp_path / "range.pt")
    torch.save({**raw, "indices": [torch.tensor([1]), torch.tensor([-1])]}, tmp_path / "neg.pt")
    with pytest.raises(ValueError, match="out of range"):
        masks.load_mask(tmp_path / "neg.pt")
    torch.save({**raw, "indices": [torch.tensor([1, 4, 1]), torch.tensor([0])]}, tmp_path / "dup.pt")
    with pytest.raises(ValueError, match=r"layer 0 has duplicated indices \[1\]"):
        masks.load_mask(tmp_path / "dup.pt")
    torch.save({**raw, "indices": [torch.tensor([0.5]), torch.tensor([0])]}, tmp_path / "float.pt")
    with pytest.raises(ValueError, match="integer"):
        masks.load_mask(tmp_path / "float.pt")
    with pytest.raises(ValueError, match="duplicated"):
        masks.save_mask(tmp_path / "bad.pt", [torch.tensor([2, 2]), torch.tensor([0])], meta)
    assert not (tmp_path / "bad.pt").exists()


def test_compare_and_cli(tmp_path, capsys):
    a = [torch.tensor([0, 1, 2]), torch.tensor([5])]
    b = [torch.tensor([1, 2]), torch.tensor([5, 6])]
    comp = masks.compare_masks({"a": a, "b": b}, d_ff=10)
    assert comp["jaccard"]["a"]["b"] == pytest.approx(3 / 5) and comp["jaccard"]["a"]["a"] == 1.0
    assert comp["per_layer_fraction"]["a"] == [0.3, 0.1]
    for name, idx in (("a", a), ("b", b)):
        masks.save_mask(tmp_path / f"{name}.pt", idx, masks.make_meta(name, "global", 0.2, 0, "fam", 2, 10, "f", "t"))
    out = tmp_path / "out"
    assert masks.main(["compare", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| a | 4 | 1.000 | 0.600 |" in printed
    assert (out / "layer_distribution.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "compare.json").read_text())
    assert data["jaccard"]["b"]["a"] == pytest.approx(0.6)
