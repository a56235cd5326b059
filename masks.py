"""The mask as an artifact: per-layer value-vector indices, their file format, selection and comparison.

A mask names value vectors by (layer, index): column ``index`` of layer ``layer``'s MLP down-projection. Nothing
here touches a model; the shape a mask must fit is passed as ``(n_layers, d_ff)`` (models.value_vector_shape), so
a mask can be read, checked and compared without loading weights or transformers. Attribution methods, which
produce the scores ``select_top`` ranks, live in mask_generator.py.

    python masks.py compare MASK [MASK ...] --out DIR     # Jaccard table, per-layer distribution plot, JSON
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

MASK_FORMAT = "loc-unlearn-mask/1"

__all__ = [
    "MASK_FORMAT",
    "MaskFileNotFoundError",
    "compare_masks",
    "jaccard_markdown",
    "load_mask",
    "make_meta",
    "mask_names",
    "n_select",
    "plot_layer_distribution",
    "random_complement",
    "random_like",
    "save_mask",
    "select_top",
]


# --------------------------------------------------------------------------- selection


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1] (fraction of value vectors to select), got {ratio!r}")
    return float(ratio)


def n_select(ratio: float, total: int) -> int:
    """round(ratio * total) (Python round); ValueError if the ratio is outside (0, 1] or the budget is 0."""
    k = round(_check_ratio(ratio) * total)
    if k < 1:
        raise ValueError(f"ratio {ratio} of {total} value vectors selects 0 vectors; use a larger ratio")
    return k


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor (n_layers, d_ff), got "
                         f"{getattr(scores, 'shape', type(scores))}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; cannot rank")
    return scores.detach().cpu().double()


def _top_order(flat: torch.Tensor) -> torch.Tensor:
    # stable sort on -score: equal scores keep ascending index order (lower index first)
    return torch.sort(-flat, stable=True).indices


def select_top(scores: torch.Tensor, ratio: float, per_layer: bool = False, finite_only: bool = False
               ) -> list[torch.Tensor]:
    """Top value vectors by score: per layer, sorted int64 indices.

    Exactly round(ratio * n_layers * d_ff) vectors in total, or with ``per_layer`` round(ratio * d_ff) in
    every layer.  Ties: the lower (flat, i.e. layer-major) index wins.  ``finite_only``: vectors scored -inf
    are never selected, so fewer may come back; this is how MemFlex's threshold rule (memflex_rule=
    "threshold", which scores failing vectors -inf) flows through: ratio=1.0 keeps every passing vector,
    a smaller ratio caps the count (passing vectors ranked by mean |g_f|)."""
    s = _check_scores(scores)
    n_layers, d_ff = s.shape
    if per_layer:
        k = n_select(ratio, d_ff)
        out = []
        for row in s:
            idx = _top_order(row)[:k]
            if finite_only:
                idx = idx[row[idx] > -math.inf]
            out.append(torch.sort(idx).values.to(torch.int64))
        return out
    k = n_select(ratio, n_layers * d_ff)
    flat = s.reshape(-1)
    idx = _top_order(flat)[:k]
    if finite_only:
        idx = idx[flat[idx] > -math.inf]
    return _split_flat(idx, n_layers, d_ff)


def _split_flat(flat_idx: torch.Tensor, n_layers: int, d_ff: int) -> list[torch.Tensor]:
    flat_idx = torch.sort(flat_idx.to(torch.int64)).values
    layers = flat_idx // d_ff
    return [flat_idx[layers == layer] - layer * d_ff for layer in range(n_layers)]


def _check_indices(indices: Any, what: str, n_layers: int | None = None, d_ff: int | None = None) -> list[torch.Tensor]:
    if not isinstance(indices, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in indices):
        raise ValueError(f"{what}: indices must be a list of 1-D integer tensors (one per layer)")
    if n_layers is not None and len(indices) != n_layers:
        raise ValueError(f"{what}: has {len(indices)} layers but the model has {n_layers}; it was made for a "
                         "different model")
    out = []
    for layer, t in enumerate(indices):
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{what}: layer {layer} indices must be a 1-D integer tensor, got dtype {t.dtype} "
                             f"shape {tuple(t.shape)}")
        t = t.detach().cpu().to(torch.int64)
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or (d_ff is not None and hi >= d_ff):
                bad = lo if lo < 0 else hi
                raise ValueError(f"{what}: layer {layer} has index {bad} out of range "
                                 f"[0, {d_ff if d_ff is not None else 'd_ff'})")
        uniq, counts = torch.unique(t, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{what}: layer {layer} has duplicated indices {uniq[counts > 1].tolist()[:10]}")
        out.append(t)
    return out


def random_complement(target: Sequence[torch.Tensor], d_ff: int, n_layers: int, count: int, seed: int
                      ) -> list[torch.Tensor]:
    """``count`` value vectors drawn uniformly at random (torch.Generator seeded with ``seed``) from outside
    ``target``."""
    tgt = _check_indices(list(target), "random_complement target", n_layers, d_ff)
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    taken = torch.zeros(n_layers * d_ff, dtype=torch.bool)
    for layer, t in enumerate(tgt):
        taken[layer * d_ff + t] = True
    free = (~taken).nonzero().flatten()
    if count > free.numel():
        raise ValueError(f"cannot draw {count} complement vectors: only {free.numel()} of {n_layers * d_ff} are "
                         "outside the target")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = free[torch.randperm(free.numel(), generator=gen)[: int(count)]]
    return _split_flat(chosen, n_layers, d_ff)


def random_like(mask: Sequence[torch.Tensor], d_ff: int, seed: int) -> list[torch.Tensor]:
    """A uniformly random mask with ``mask``'s size in every layer (torch.Generator seeded with ``seed``).

    Per layer, not just in total: layers differ in how much an ablation of their values costs, so a control of
    the same total size but another layer split would compare layers as well as the selection."""
    checked = _check_indices(list(mask), "random_like mask", None, d_ff)
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.sort(torch.randperm(d_ff, generator=gen)[: t.numel()]).values for t in checked]


# --------------------------------------------------------------------------- mask files


class MaskFileNotFoundError(ValueError, FileNotFoundError):
    """A mask path that does not exist (a ValueError, and a FileNotFoundError)."""


def _primitive(obj: Any) -> Any:
    """Plain dict/list/str/int/float/bool/None copy (OmegaConf configs and tuples included)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): _primitive(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted((_primitive(v) for v in obj), key=repr)
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and hasattr(obj, "__len__")
                                          and not isinstance(obj, (bytes, torch.Tensor))):
        return [_primitive(v) for v in obj]
    return str(obj)


def make_meta(method: str, variant: str, ratio: float, seed: int, model_family: str, n_layers: int, d_ff: int,
              forget_split: str, data_source: str, config: Mapping[str, Any] | None = None, **extra: Any
              ) -> dict[str, Any]:
    """The metadata dict stored in a mask file (plain primitives)."""
    meta = {
        "method": method, "variant": variant, "ratio": ratio, "seed": seed, "model_family": model_family,
        "n_layers": n_layers, "d_ff": d_ff, "forget_split": forget_split, "data_source": data_source,
        "config": config or {},
    }
    meta.update(extra)
    return _primitive(meta)


def save_mask(path: str | os.PathLike, indices: Sequence[torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write {"format", "indices": [int64 per layer, sorted], "meta"} (torch.save; weights_only-loadable).

    Same inputs -> identical bytes (serialized in memory, independent of the path)."""
    path = os.fspath(path)
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a mapping, got {type(meta).__name__}")
    meta = _primitive(meta)
    d_ff = meta.get("d_ff")
    n_layers = meta.get("n_layers")
    idx = _check_indices(list(indices), f"save_mask({path})", n_layers if isinstance(n_layers, int) else None,
                         d_ff if isinstance(d_ff, int) else None)
    idx = [torch.sort(t).values.contiguous().clone() for t in idx]
    meta.setdefault("n_layers", len(idx))
    meta["n_selected"] = int(sum(t.numel() for t in idx))
    buffer = io.BytesIO()
    torch.save({"format": MASK_FORMAT, "indices": idx, "meta": meta}, buffer)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_mask(path: str | os.PathLike, n_layers: int | None = None, d_ff: int | None = None
              ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Load and validate a mask file; returns (indices per layer as int64, meta).  Every problem is a ValueError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MaskFileNotFoundError(f"mask file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / BadZipFile ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"mask file {path} is unreadable (corrupt or truncated?): {type(exc).__name__}: "
                         f"{first_line}") from exc
    if not isinstance(obj, dict) or "indices" not in obj or "meta" not in obj or "format" not in obj:
        raise ValueError(f"{path} is not a loc-unlearn mask (expected a dict with 'format', 'indices', 'meta')")
    if obj["format"] != MASK_FORMAT:
        raise ValueError(f"{path} has unsupported mask format {obj['format']!r} (expected {MASK_FORMAT!r})")
    meta = obj["meta"]
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a loc-unlearn mask: 'meta' is {type(meta).__name__}, not a dict")
    indices = obj["indices"]
    if not isinstance(indices, list):
        raise ValueError(f"{path} is not a loc-unlearn mask: 'indices' is {type(indices).__name__}, not a list")
    family = meta.get("model_family", "?")
    if isinstance(meta.get("n_layers"), int) and meta["n_layers"] != len(indices):
        raise ValueError(f"mask {path} is inconsistent (corrupt?): meta says {meta['n_layers']} layers, "
                         f"indices has {len(indices)}")
    if n_layers is not None and len(indices) != n_layers:
        raise ValueError(f"mask {path} has {len(indices)} layers but the model has {n_layers}: "
                         f"it was generated for another model (model_family={family!r})")
    meta_d_ff = meta.get("d_ff")
    if d_ff is not None and meta_d_ff is not None and meta_d_ff != d_ff:
        raise ValueError(f"mask {path} was generated for d_ff={meta_d_ff} but the model has d_ff={d_ff} "
                         f"(model_family={family!r})")
    return _check_indices(indices, f"mask {path}", None, d_ff if d_ff is not None else meta_d_ff), meta


# --------------------------------------------------------------------------- diagnostics


def _flat_set(mask: Sequence[torch.Tensor], d_ff: int) -> set[int]:
    return {layer * d_ff + int(i) for layer, t in enumerate(mask) for i in t.tolist()}


def compare_masks(named_masks: Mapping[str, Sequence[torch.Tensor]], d_ff: int) -> dict[str, Any]:
    """{"names", "n_layers", "d_ff", "sizes", "jaccard": {a: {b: J}}, "per_layer_fraction": {name: [f_l]}}.
    J = |A & B| / |A | B| over (layer, index) pairs (1.0 for two empty masks)."""
    if not named_masks:
        raise ValueError("compare_masks needs at least one mask")
    names = list(named_masks)
    layer_counts = {len(named_masks[n]) for n in names}
    if len(layer_counts) != 1:
        raise ValueError(f"masks have different layer counts: { {n: len(named_masks[n]) for n in names} }")
    n_layers = layer_counts.pop()
    checked = {n: _check_indices(list(named_masks[n]), f"mask {n!r}", n_layers, d_ff) for n in names}
    sets = {n: _flat_set(checked[n], d_ff) for n in names}
    jac = {}
    for a in names:
        jac[a] = {}
        for b in names:
            union = len(sets[a] | sets[b])
            jac[a][b] = 1.0 if union == 0 else len(sets[a] & sets[b]) / union
    return {
        "names": names,
        "n_layers": n_layers,
        "d_ff": d_ff,
        "sizes": {n: len(sets[n]) for n in names},
        "jaccard": jac,
        "per_layer_fraction": {n: [t.numel() / d_ff for t in checked[n]] for n in names},
    }


def jaccard_markdown(comparison: Mapping[str, Any]) -> str:
    names = comparison["names"]
    lines = ["| mask | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for a in names:
        cells = " | ".join(f"{comparison['jaccard'][a][b]:.3f}" for b in names)
        lines.append(f"| {a} | {comparison['sizes'][a]} | {cells} |")
    return "\n".join(lines)


def plot_layer_distribution(named_masks: Mapping[str, Sequence[torch.Tensor]], d_ff: int,
                            png_path: str | os.PathLike) -> None:
    """PNG of the fraction of each layer's value vectors selected, one line per mask (Agg, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    comp = compare_masks(named_masks, d_ff)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    layers = list(range(comp["n_layers"]))
    for name in comp["names"]:
        ax.plot(layers, comp["per_layer_fraction"][name], marker="o", markersize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of value vectors selected")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    png_path = os.fspath(png_path)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)


def mask_names(paths: Sequence[str]) -> list[str]:
    """A display name per mask file: its stem, or its path when two stems are the same."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [os.path.normpath(p) for p in paths]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masks.py", description="Mask diagnostics.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_ = sub.add_parser("compare", help="Jaccard overlap table + per-layer distribution of mask files")
    cmp_.add_argument("masks", nargs="+", metavar="MASK")
    cmp_.add_argument("--out", required=True, metavar="DIR",
                      help="writes DIR/layer_distribution.png and DIR/compare.json")
    args = parser.parse_args(argv)
    try:
        return _compare_cli(args.masks, args.out)
    except ValueError as exc:
        parser.error(str(exc))
        return 2  # unreachable: parser.error exits


def _compare_cli(mask_files: Sequence[str], out_dir: str) -> int:
    loaded, metas = {}, {}
    d_ffs = set()
    for path, name in zip(mask_files, mask_names(mask_files)):
        indices, meta = load_mask(path)
        loaded[name], metas[name] = indices, meta
        if meta.get("d_ff") is None:
            raise ValueError(f"mask {path} has no d_ff in its meta")
        d_ffs.add(meta["d_ff"])
    if len(d_ffs) != 1:
        raise ValueError(f"masks were made for different d_ff {sorted(d_ffs)}")
    d_ff = d_ffs.pop()
    comp = compare_masks(loaded, d_ff)
    print(jaccard_markdown(comp))
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "layer_distribution.png")
    plot_layer_distribution(loaded, d_ff, png)
    out_json = os.path.join(out_dir, "compare.json")
    with open(out_json, "w") as fh:
        json.dump({**comp, "files": dict(zip(comp["names"], mask_files)), "meta": metas}, fh, indent=2)
    print(f"\nwrote {png} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
