"""Value-vector attribution: the ATTRIBUTIONS registry and its methods (the scores a mask is selected from).

The unit of localization is an MLP *value vector*: column ``i`` of layer ``l``'s
``mlp.down_proj.weight`` (shape d_model x d_ff) in a Hugging Face Llama / OLMo-2
causal LM.  The neuron activation that multiplies value vector ``i`` is the i-th
input feature of ``down_proj`` (``act_fn(gate_proj(x)) * up_proj(x)``), captured
with a forward pre-hook on ``down_proj`` (``models.value_vectors``).  Selecting the top
scores and the mask file itself are masks.py's.

Every attribution method is registered in ``ATTRIBUTIONS`` and has the signature
``fn(model, forget_batches, retain_batches, cfg) -> Tensor (n_layers, d_ff)``
(float64, on CPU; higher = more "stores the forget knowledge").  Batches are dicts
with ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the answer).

Token convention (shared with the losses module): ``logits[:, t]`` predicts
``labels[:, t+1]``.  The *prediction positions* of a sequence are the ``t`` with
``labels[:, t+1] != -100``; activations are read (and, for IG, scaled) there.

Data-driven methods are written as ``accumulate`` (sums and counts over the
batches this process sees) + ``finalize`` (divide / combine).  Under
``torch.distributed`` the statistics are all-reduced (summed) between the two, so
sharded data gives the same scores as one process over all the data.

See docs/attribution.md for the formulas and the adaptation choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from dataloader import IGNORE_INDEX, token_nll
from models import decoder_layers, value_vector_shape, value_vectors
from runtime import is_main
from schema import Knob, knob_values

Batch = Mapping[str, torch.Tensor]
Stats = dict[str, torch.Tensor]
AttributionFn = Callable[[nn.Module, Iterable[Batch] | None, Iterable[Batch] | None, Mapping[str, Any]], torch.Tensor]

__all__ = [
    "ATTRIBUTIONS",
    "ATTRIBUTION_KNOBS",
    "SHAPE_ONLY",
    "STATISTICS",
    "accumulate_statistics",
    "all_reduce_statistics",
    "compute_scores",
    "corrupt_answers",
    "finalize_statistics",
    "get_attribution",
    "ig_token_attributions",
    "memflex_statistics",
    "method_config",
    "merge_statistics",
    "register_attribution",
]


# --------------------------------------------------------------------------- registry

ATTRIBUTIONS: dict[str, AttributionFn] = {}
# The config keys each method reads besides seed; their defaults are stated here only (generate_mask.py's schema
# takes them from here, docs/attribution.md's knob table is checked against them).
ATTRIBUTION_KNOBS: dict[str, tuple[Knob, ...]] = {}
PROGRESS = Knob("progress", True, "a progress bar over the batches (rank 0)")


def register_attribution(name: str, knobs: Sequence[Knob] = ()) -> Callable[[AttributionFn], AttributionFn]:
    """Decorator adding ``fn`` to ``ATTRIBUTIONS`` under ``name``, with the knobs it reads."""

    def decorate(fn: AttributionFn) -> AttributionFn:
        if name in ATTRIBUTIONS:
            raise ValueError(f"attribution {name!r} is already registered")
        ATTRIBUTIONS[name] = fn
        ATTRIBUTION_KNOBS[name] = tuple(knobs)
        return fn

    return decorate


def get_attribution(name: str) -> AttributionFn:
    try:
        return ATTRIBUTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attribution {name!r}; available: {sorted(ATTRIBUTIONS)}") from None


def method_config(name: str, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cfg`` with method ``name``'s knobs checked, the absent ones at their declared defaults."""
    get_attribution(name)
    return knob_values(ATTRIBUTION_KNOBS[name], cfg or {})


def compute_scores(
    name: str,
    model: nn.Module,
    forget_batches: Iterable[Batch] | None,
    retain_batches: Iterable[Batch] | None,
    cfg: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Run the registered attribution ``name``; returns (n_layers, d_ff) float64 scores on CPU."""
    return get_attribution(name)(model, forget_batches, retain_batches, method_config(name, cfg))


@dataclass(frozen=True)
class StatMethod:
    """Two-phase form of a data-driven attribution: per-shard sums, then scores."""

    accumulate: Callable[[nn.Module, Iterable[Batch] | None, Iterable[Batch] | None, Mapping[str, Any]], Stats]
    finalize: Callable[[nn.Module, Stats, Mapping[str, Any]], torch.Tensor]


STATISTICS: dict[str, StatMethod] = {}


def accumulate_statistics(
    name: str, model: nn.Module, forget_batches: Iterable[Batch] | None, retain_batches: Iterable[Batch] | None,
    cfg: Mapping[str, Any] | None = None,
) -> Stats:
    """Sums/counts of method ``name`` over the given batches only (no all-reduce)."""
    return _stat_method(name).accumulate(model, forget_batches, retain_batches, method_config(name, cfg))


def finalize_statistics(name: str, model: nn.Module, stats: Stats, cfg: Mapping[str, Any] | None = None
                        ) -> torch.Tensor:
    """Scores from (already merged / all-reduced) statistics."""
    return _stat_method(name).finalize(model, stats, method_config(name, cfg))


def merge_statistics(*parts: Stats) -> Stats:
    """Sum statistics of disjoint shards (what all_reduce does across ranks)."""
    if not parts:
        raise ValueError("merge_statistics needs at least one statistics dict")
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError(f"statistics have different keys: {sorted(keys)} vs {sorted(p)}")
    return {k: sum((p[k] for p in parts[1:]), parts[0][k].clone()) for k in parts[0]}


def _stat_method(name: str) -> StatMethod:
    try:
        return STATISTICS[name]
    except KeyError:
        raise ValueError(f"attribution {name!r} has no accumulate/finalize form; available: "
                         f"{sorted(STATISTICS)}") from None


def _register_two_phase(name: str, accumulate, finalize, knobs: Sequence[Knob] = ()) -> None:
    STATISTICS[name] = StatMethod(accumulate, finalize)

    def run(model, forget_batches, retain_batches, cfg):
        cfg = dict(cfg or {})
        stats = accumulate(model, forget_batches, retain_batches, cfg)
        return finalize(model, all_reduce_statistics(stats), cfg)

    run.__name__ = f"{name}_scores"
    run.__doc__ = f"{name}: accumulate -> all_reduce -> finalize (see docs/attribution.md)."
    register_attribution(name, (PROGRESS, *knobs))(run)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch lacks {key!r}; got keys {sorted(batch)}")
    out = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
    mask = batch.get("attention_mask")
    out["attention_mask"] = (torch.ones_like(out["input_ids"]) if mask is None else mask).to(device)
    return out


def _prediction_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool (B, T): positions t whose next-token target labels[t+1] is an answer token."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return pos


@contextlib.contextmanager
def _hooks(modules: Sequence[nn.Module], make_hook: Callable[[int], Callable], pre: bool = True) -> Iterator[None]:
    """Forward pre-hooks (or, with pre=False, forward hooks) make_hook(i) on modules[i], removed on exit."""
    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(make_hook(i))
               for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _scoring_scope(model: nn.Module, grad_params: Sequence[nn.Parameter] = ()) -> Iterator[None]:
    """eval(); every parameter frozen except ``grad_params``; grads stashed; all restored on exit."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    keep = {id(p) for p in grad_params}
    model.eval()
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        model.train(was_training)


def _progress(batches: Iterable[Batch], desc: str, cfg: Mapping[str, Any]) -> Iterable[Batch]:
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return tqdm(batches, desc=desc, total=total, disable=not (cfg["progress"] and is_main()))


def _require(batches: Iterable[Batch] | None, what: str, method: str) -> Iterable[Batch]:
    if batches is None:
        raise ValueError(f"attribution {method!r} needs {what} batches, got None")
    return batches


def all_reduce_statistics(stats: Stats) -> Stats:
    """Sum every statistic across ranks when torch.distributed is initialized (in place; returns ``stats``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    # The statistics live on the model's device, which the group built by runtime.init_distributed serves.
    for t in stats.values():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return stats


# --------------------------------------------------------------------------- random_down

# Methods whose scores depend on (n_layers, d_ff) alone: they accept the model's config in place of the model,
# so a caller can skip loading the weights.
SHAPE_ONLY = frozenset({"random_down"})


@register_attribution("random_down")
def random_down(model: nn.Module | PretrainedConfig, forget_batches, retain_batches, cfg: Mapping[str, Any]
                ) -> torch.Tensor:
    """Uniform random scores from a generator seeded with cfg["seed"] (top-k = uniform random subset)."""
    if cfg.get("seed") is None:
        raise ValueError("random_down needs cfg['seed']")
    n_layers, d_ff = value_vector_shape(model)
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    return torch.rand((n_layers, d_ff), generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------- activation (Chang et al., 2024)


def _activation_accumulate(model, forget_batches, retain_batches, cfg) -> Stats:
    forget_batches = _require(forget_batches, "forget", "activation")
    n_layers, d_ff = value_vector_shape(model)
    device = _device(model)
    act_sum = torch.zeros(n_layers, d_ff, dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, args):
            x = args[0]
            act_sum[layer] += x[current["pos"]].double().sum(0)

        return hook

    with _scoring_scope(model), torch.no_grad(), _hooks(value_vectors(model), make_hook):
        for raw in _progress(forget_batches, "activation", cfg):
            batch = _to_device(raw, device)
            current["pos"] = _prediction_positions(batch["labels"])
            n_tok += current["pos"].sum()
            token_nll(model, batch)  # only the hooks' captures are wanted; this forward builds no (B, T, V) logits
    return {"act_sum": act_sum, "n_tok": n_tok}


def _activation_finalize(model, stats, cfg) -> torch.Tensor:
    if stats["n_tok"].item() == 0:
        raise ValueError("activation: the forget batches contain no answer tokens")
    mean = stats["act_sum"] / stats["n_tok"]
    norms = torch.stack([down.weight.detach().double().norm(dim=0).to(mean.device) for down in value_vectors(model)])
    return (mean.abs() * norms).cpu()


_register_two_phase("activation", _activation_accumulate, _activation_finalize)


# --------------------------------------------------------------------------- gradients of down_proj


LossTerms = Callable[[nn.Module, dict[str, torch.Tensor]], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _grad_sum(model: nn.Module, batches: Iterable[Batch], desc: str, cfg: Mapping[str, Any],
              loss_terms: LossTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over batches of d(sum of loss_terms)/d(down_proj.weight), stacked (n_layers, d_model, d_ff) float32,
    and the summed count.  Each (loss, count) term is backpropagated as it comes, so only one term's graph is
    alive at a time."""
    weights = [down.weight for down in value_vectors(model)]
    device = _device(model)
    buf = torch.zeros((len(weights), *weights[0].shape), dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)

    def add_to_buf(layer: int):
        def hook(w: nn.Parameter) -> None:
            # into the float32 sum as soon as backward has it: no model-sized .grad lives beside the sum
            buf[layer] += w.grad.float()
            w.grad = None

        return hook

    handles = [w.register_post_accumulate_grad_hook(add_to_buf(layer)) for layer, w in enumerate(weights)]
    try:
        with _scoring_scope(model, weights), torch.enable_grad():
            for raw in _progress(batches, desc, cfg):
                batch = _to_device(raw, device)
                for loss, n in loss_terms(model, batch):
                    count += n
                    if n.item() > 0:
                        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return buf, count


def _summed_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    nll, valid = token_nll(model, batch)
    yield nll.sum(), valid.sum().double()


def _loss_scale(stats: Stats, count_key: str, cfg: Mapping[str, Any]) -> torch.Tensor | float:
    if cfg["loss_reduction"] == "sum":
        return 1.0
    n = stats[count_key]
    if n.item() == 0:
        raise ValueError("loss_reduction='mean' but the batches contain no answer tokens")
    return 1.0 / n.float()


def _grad_down_accumulate(model, forget_batches, retain_batches, cfg) -> Stats:
    g, n = _grad_sum(model, _require(forget_batches, "forget", "grad_down"), "grad_down", cfg, _summed_nll)
    return {"grad_f": g, "n_tok_f": n}


def _grad_down_finalize(model, stats, cfg) -> torch.Tensor:
    g = stats["grad_f"] * _loss_scale(stats, "n_tok_f", cfg)
    return g.double().norm(dim=1).cpu()


LOSS_REDUCTION = Knob("loss_reduction", "sum", "forget/retain NLL summed over answer tokens, or their mean",
                      choices=("sum", "mean"))
_register_two_phase("grad_down", _grad_down_accumulate, _grad_down_finalize, [LOSS_REDUCTION])


def _wagle_accumulate(model, forget_batches, retain_batches, cfg) -> Stats:
    gf, nf = _grad_sum(model, _require(forget_batches, "forget", "wagle_down"), "wagle_down forget", cfg, _summed_nll)
    gr, nr = _grad_sum(model, _require(retain_batches, "retain", "wagle_down"), "wagle_down retain", cfg, _summed_nll)
    return {"grad_f": gf, "n_tok_f": nf, "grad_r": gr, "n_tok_r": nr}


def _wagle_finalize(model, stats, cfg) -> torch.Tensor:
    mu = cfg["wagle_mu"]
    if mu <= 0:
        raise ValueError(f"cfg['wagle_mu'] must be > 0, got {mu}")
    sf = _loss_scale(stats, "n_tok_f", cfg)
    sr = _loss_scale(stats, "n_tok_r", cfg)
    out = []
    # Per layer: bounded temporaries on big models.
    for layer, w in enumerate([down.weight for down in value_vectors(model)]):
        theta = w.detach().double().to(stats["grad_f"].device)
        gf = stats["grad_f"][layer].double() * sf
        gr = stats["grad_r"][layer].double() * sr
        out.append(((theta - gr / mu) * gf).abs().sum(dim=0))
    return torch.stack(out).cpu()


_register_two_phase("wagle_down", _wagle_accumulate, _wagle_finalize,
                    [Knob("wagle_mu", 1e-6, "μ of the retain-gradient step θ − g_r/μ"), LOSS_REDUCTION])


# --------------------------------------------------------------------------- MemFlex (Tian et al., 2024)


def _example_seed(seed: int, copy: int, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> int:
    """Seed that depends only on (seed, copy, the example's real tokens) -> independent of batching/sharding/padding."""
    keep = mask.bool()
    data = torch.stack([input_ids[keep], labels[keep]]).to(torch.int64).cpu().numpy().tobytes()
    digest = hashlib.blake2b(f"{int(seed)}:{int(copy)}:".encode() + data, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def corrupt_answers(batch: Batch, vocab_size: int, seed: int, copy: int, corrupt_inputs: bool = True
                    ) -> dict[str, torch.Tensor]:
    """MemFlex random-label copy: in each example, floor(n/2) distinct answer tokens (labels != -100) are replaced
    by uniform random ids in [0, vocab_size).  The draw depends only on (seed, copy, the example's real tokens).
    ``corrupt_inputs``: also write the random ids into input_ids (the reference implementation corrupts the
    answer text, i.e. inputs and labels); otherwise only the labels change.  Returns a new batch dict."""
    input_ids = batch["input_ids"].clone()
    labels = batch["labels"].clone()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    for b in range(labels.shape[0]):
        answer = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        k = answer.numel() // 2
        if k == 0:
            continue
        gen = torch.Generator().manual_seed(_example_seed(seed, copy, batch["input_ids"][b], batch["labels"][b],
                                                          mask[b]))
        pick = answer[torch.randperm(answer.numel(), generator=gen)[:k].to(answer.device)]
        new = torch.randint(0, int(vocab_size), (k,), generator=gen).to(labels.device)
        labels[b, pick] = new
        if corrupt_inputs:
            input_ids[b, pick] = new
    return {"input_ids": input_ids, "attention_mask": mask.clone(), "labels": labels}


def _memflex_vocab(model: nn.Module, cfg: Mapping[str, Any]) -> int:
    if cfg["memflex_vocab_size"] is not None:
        return cfg["memflex_vocab_size"]
    return int(model.get_input_embeddings().weight.shape[0])


MEMFLEX_MICRO_BATCH = 2  # examples per backward: at batch 8, 2 held the wide bench under half the reference's peak


def _memflex_loss_terms(cfg: Mapping[str, Any], vocab: int) -> LossTerms:
    seed = int(cfg["seed"])
    copies = cfg["memflex_copies"]
    if copies < 1:
        raise ValueError(f"cfg['memflex_copies'] must be >= 1, got {copies}")
    micro = cfg["memflex_micro_batch"]
    if micro < 1:
        raise ValueError(f"cfg['memflex_micro_batch'] must be >= 1, got {micro}")
    corrupt_inputs = cfg["memflex_corrupt_inputs"]

    def loss_terms(model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for c in range(copies):
            cb = corrupt_answers(batch, vocab, seed, c, corrupt_inputs)
            # One term per micro-batch of each copy: _grad_sum frees each term's graph before building the next, so
            # only `micro` examples' activations are alive at a time.  The loss is a sum of per-example terms (and
            # the corruption is per example), so the split changes the sums by float rounding only.
            for start in range(0, cb["input_ids"].shape[0], micro):
                part = {key: t[start:start + micro] for key, t in cb.items()}
                answers = part["labels"] != IGNORE_INDEX
                if not answers.any():
                    continue  # no answer token: its term would be 0 with a count of 0
                # Columns past the micro-batch's last real token or label are padding that nothing before them
                # attends to (causal): dropping them saves their compute and memory without changing the loss.
                used = (part["attention_mask"].bool() | answers).any(dim=0).nonzero()
                part = {key: t[:, : int(used.max()) + 1] for key, t in part.items()}
                nll, valid = token_nll(model, part)
                n = valid.sum(dim=1)
                has = n > 0
                per_example = nll.sum(dim=1)[has] / n[has]  # token-mean NLL of each example
                yield per_example.sum(), has.sum().double()

    return loss_terms


def _memflex_accumulate(model, forget_batches, retain_batches, cfg) -> Stats:
    vocab = _memflex_vocab(model, cfg)
    loss_terms = _memflex_loss_terms(cfg, vocab)
    gf, nf = _grad_sum(model, _require(forget_batches, "forget", "memflex_down"), "memflex_down forget", cfg,
                       loss_terms)
    gr, nr = _grad_sum(model, _require(retain_batches, "retain", "memflex_down"), "memflex_down retain", cfg,
                       loss_terms)
    return {"grad_f": gf, "n_f": nf, "grad_r": gr, "n_r": nr}


_FINALIZE_BLOCK_BYTES = 8 << 20  # float64 bytes of one block of value vectors in memflex's finalize


def _memflex_stats_from(stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    for key in ("n_f", "n_r"):
        if stats[key].item() == 0:
            raise ValueError(f"memflex_down: no example with an answer token in the "
                             f"{'forget' if key == 'n_f' else 'retain'} set")
    n_layers, d_model, d_ff = stats["grad_f"].shape
    # Every statistic is per value vector (column), so the float64 copies are made a block of columns at a time:
    # the temporaries stay at a few times _FINALIZE_BLOCK_BYTES instead of several layers' worth, which was the
    # method's peak memory (the float32 sums are all that must be held whole).
    width = max(1, _FINALIZE_BLOCK_BYTES // (d_model * 8))
    cosines, mean_abs = [], []
    for layer in range(n_layers):
        layer_cos, layer_mag = [], []
        for first in range(0, d_ff, width):
            cols = slice(first, first + width)
            gf = stats["grad_f"][layer, :, cols].double().div_(stats["n_f"])
            gr = stats["grad_r"][layer, :, cols].double().div_(stats["n_r"])
            layer_mag.append(torch.linalg.vector_norm(gf, 1, dim=0) / d_model)
            denom = torch.linalg.vector_norm(gf, dim=0) * torch.linalg.vector_norm(gr, dim=0)
            dot = gf.mul_(gr).sum(dim=0)  # after the norms, in place of gf: no third block-sized temporary
            layer_cos.append(torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny),
                                         torch.zeros_like(dot)))
        cosines.append(torch.cat(layer_cos))
        mean_abs.append(torch.cat(layer_mag))
    return torch.stack(cosines).cpu(), torch.stack(mean_abs).cpu()


def _memflex_finalize(model, stats, cfg) -> torch.Tensor:
    cosine, mag = _memflex_stats_from(stats)
    mu, sigma, rule = cfg["memflex_mu"], cfg["memflex_sigma"], cfg["memflex_rule"]
    passing = cosine < mu
    if rule == "threshold":
        keep = passing & (mag > sigma)
        return torch.where(keep, mag, torch.full_like(mag, -math.inf))
    # budget: every cosine-passing vector (ranked by magnitude) above every other one (ranked by lowest cosine)
    return torch.where(passing, 3.0 + mag, 1.0 - cosine)


MEMFLEX_KNOBS = (
    Knob("memflex_mu", 0.92, "kept: cosine(g_f, g_r) below μ"),
    Knob("memflex_sigma", 6e-4, "kept: mean absolute g_f above σ"),
    Knob("memflex_copies", 3, "random-label copies of each example"),
    Knob("memflex_rule", "budget", "budget: exactly round(ratio x total); threshold: the vectors passing both tests",
         choices=("budget", "threshold")),
    Knob("memflex_vocab_size", None, "random labels drawn from [0, this); null: the input-embedding size", type=int),
    Knob("memflex_corrupt_inputs", True, "random labels also written into input_ids (false: labels only)"),
    Knob("memflex_micro_batch", MEMFLEX_MICRO_BATCH, "examples per backward (memory, not results)"),
)
_register_two_phase("memflex_down", _memflex_accumulate, _memflex_finalize, MEMFLEX_KNOBS)


def memflex_statistics(model: nn.Module, forget_batches: Iterable[Batch], retain_batches: Iterable[Batch],
                       cfg: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine(g_f, g_r), mean |g_f|), each (n_layers, d_ff) float64, per value vector (all-reduced when
    distributed)."""
    cfg = method_config("memflex_down", cfg)
    stats = all_reduce_statistics(_memflex_accumulate(model, forget_batches, retain_batches, cfg))
    return _memflex_stats_from(stats)


# --------------------------------------------------------------------------- integrated gradients (Dai et al., 2022)


@contextlib.contextmanager
def _start_at_layer(model: nn.Module, start: int, hidden: torch.Tensor, copies: int) -> Iterator[None]:
    """Forwards of ``model`` skip decoder layers below ``start``; layer ``start`` gets ``hidden`` (B, T, d_model),
    repeated ``copies`` times along the batch, as its input.

    The decoder's layer list is swapped for its tail, so the layers below are not run at all (their outputs do
    not change with what is scaled above them); the embedding still runs, its output is discarded."""
    layers = decoder_layers(model)
    if start == 0:
        yield
        return
    owner_name = next(name for name, m in model.named_modules() if m is layers).rpartition(".")[0]
    owner = model.get_submodule(owner_name)
    hidden = hidden.repeat(copies, 1, 1)

    def inject(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[start].register_forward_pre_hook(inject, with_kwargs=True)
    owner.layers = nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        owner.layers = layers
        handle.remove()


class _Replay(nn.Module):
    """Stands in for a module whose output is fixed for a pass: returns ``output`` whatever its inputs."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextlib.contextmanager
def _replay(layer: nn.Module, attn_output: torch.Tensor | None, mlp_output: torch.Tensor) -> Iterator[None]:
    """Passes through decoder ``layer`` take its attention and MLP outputs as given instead of computing them.
    The layer's own code (norms, residual sums) still runs, so any Llama/OLMo-2 layer layout works."""
    swaps: dict[str, nn.Module] = {"mlp": _Replay(mlp_output)}
    if attn_output is not None:
        # HF attention modules return (hidden states, attention weights); the layers discard the weights
        swaps["self_attn"] = _Replay((attn_output, None))
    originals = {name: getattr(layer, name) for name in swaps}
    for name, module in swaps.items():
        setattr(layer, name, module)
    try:
        yield
    finally:
        for name, module in originals.items():
            setattr(layer, name, module)


IG_ALPHA_BATCH = 5  # alpha steps per pass: on CPU 5 x the batch beat both 1 and all 20 (docs/BENCHMARKS.md)


def ig_token_attributions(model: nn.Module, batch: Batch, steps: int, mode: str = "layer",
                          alpha_batch: int = IG_ALPHA_BATCH) -> torch.Tensor:
    """Signed IG attributions (n_layers, N, d_ff) float32 for the N prediction positions of ``batch``
    (row-major over (example, position)).  F = sum over answer tokens of log p(answer token).

    At layer l the down_proj input at prediction positions is replaced by alpha_k * a (a = the unscaled
    activation, baseline 0), alpha_k = k/steps, k = 1..steps; attribution = a * mean_k dF/d(input).
    mode "layer": one layer scaled at a time (others untouched) -> sum over a layer ~ F(1) - F(layer zeroed).
    mode "all": all layers scaled together (one path) -> sum over all layers ~ F(1) - F(all zeroed).
    ``alpha_batch`` alpha steps run as one forward+backward over that many copies of the batch (fewer: less
    memory).  Only what alpha changes is recomputed per step: down_proj is affine, so its output at the scaled
    input is b + alpha * (y - b) with y its clean output, and dF/d(input) = dF/d(output) @ W; a pass starts
    with the scaled layer's residual sums, and the layers below it and its attention and MLP run once per batch."""
    if steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {steps}")
    if mode not in ("layer", "all"):
        raise ValueError(f"ig mode must be 'layer' or 'all', got {mode!r}")
    if alpha_batch < 1:
        raise ValueError(f"ig_alpha_batch must be >= 1, got {alpha_batch}")
    downs = value_vectors(model)
    layers = decoder_layers(model)
    n_layers = len(downs)
    device = _device(model)
    b = _to_device(batch, device)
    pos = _prediction_positions(b["labels"])
    n = int(pos.sum())
    d_ff = downs[0].weight.shape[1]
    out = torch.zeros(n_layers, n, d_ff, dtype=torch.float32, device=device)
    if n == 0:
        return out
    with _scoring_scope(model):
        acts: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        inputs: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        down_outputs: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        attn_outputs: list[torch.Tensor | None] = [None] * n_layers

        def capture_input(store: list[torch.Tensor], layer: int):
            def hook(_module, args, kwargs):
                store[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

            return hook

        def capture_output(store: list[torch.Tensor | None], layer: int):
            def hook(_module, _args, output):
                store[layer] = (output[0] if isinstance(output, tuple) else output).detach()

            return hook

        handles = [m.register_forward_pre_hook(capture_input(store, i), with_kwargs=True)
                   for store, modules in ((acts, downs), (inputs, layers)) for i, m in enumerate(modules)]
        handles += [m.register_forward_hook(capture_output(down_outputs, i)) for i, m in enumerate(downs)]
        handles += [layer.self_attn.register_forward_hook(capture_output(attn_outputs, i))
                    for i, layer in enumerate(layers) if hasattr(layer, "self_attn")]
        try:
            with torch.no_grad():
                token_nll(model, b)
        finally:
            for h in handles:
                h.remove()
        missing = [i for i, x in enumerate(inputs) if x is None]
        if missing:  # its layers' code runs without the modules' hooks: a forward cannot be started at a layer
            raise RuntimeError(f"{type(model).__name__} never called decoder layer {missing[0]} as a module")
        # down_proj's output without its bias, the part that alpha scales
        linear_part = [y if d.bias is None else y - d.bias for y, d in zip(down_outputs, downs)]
        groups = [[layer] for layer in range(n_layers)] if mode == "layer" else [list(range(n_layers))]
        for group in groups:
            gsum = {layer: torch.zeros_like(linear_part[layer], dtype=torch.float32) for layer in group}
            for first in range(1, steps + 1, alpha_batch):
                ks = range(first, min(first + alpha_batch, steps + 1))
                r = len(ks)
                # r copies of the batch stacked along dim 0, copy j scaled by alpha = ks[j] / steps
                alpha = torch.tensor([k / steps for k in ks], device=device).view(r, 1, 1, 1)
                copies = {key: t.repeat(r, 1) for key, t in b.items()}
                pos3 = pos.repeat(r, 1).unsqueeze(-1)
                # The scaled linear parts are leaves: at prediction positions, where they make down_proj's output,
                # their gradient is dF/d(output); elsewhere it is 0 and never read.
                scaled = {layer: (linear_part[layer] * alpha).to(linear_part[layer].dtype).flatten(0, 1)
                          .requires_grad_() for layer in group}
                start, above = group[0], group[1:]

                def scaled_output(layer: int, output: torch.Tensor, scaled=scaled, pos3=pos3) -> torch.Tensor:
                    bias = downs[layer].bias
                    return torch.where(pos3, scaled[layer] if bias is None else scaled[layer] + bias, output)

                def replace(i: int, above=above, scaled_output=scaled_output):
                    return lambda _module, _args, output: scaled_output(above[i], output)

                with torch.enable_grad():
                    # the lowest scaled layer's input is the clean one: its attention output, and its MLP's output
                    # (a Llama/OLMo-2 MLP returns down_proj's) away from the prediction positions, are the clean pass's
                    mlp_output = scaled_output(start, down_outputs[start].repeat(r, 1, 1))
                    attn_output = None if attn_outputs[start] is None else attn_outputs[start].repeat(r, 1, 1)
                    with (_hooks([downs[layer] for layer in above], replace, pre=False),
                          _start_at_layer(model, start, inputs[start], r),
                          _replay(layers[start], attn_output, mlp_output)):
                        nll, _ = token_nll(model, copies)
                    grads = torch.autograd.grad(-nll.sum(), [scaled[layer] for layer in group])
                for layer, g in zip(group, grads):
                    gsum[layer] += g.float().view(r, *linear_part[layer].shape).sum(0)
            for layer in group:
                # dF/d(input) = dF/d(output) @ W, summed over the steps before the product
                grad_input = gsum[layer][pos] @ downs[layer].weight.detach().float()
                out[layer] = acts[layer][pos].float() * grad_input / steps
    return out


def _ig_accumulate(model, forget_batches, retain_batches, cfg) -> Stats:
    forget_batches = _require(forget_batches, "forget", "ig_down")
    steps, alpha_batch, mode, agg = (cfg[k] for k in ("ig_steps", "ig_alpha_batch", "ig_mode", "ig_aggregate"))
    n_layers, d_ff = value_vector_shape(model)
    device = _device(model)
    attr_sum = torch.zeros(n_layers, d_ff, dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    for raw in _progress(forget_batches, "ig_down", cfg):
        attr = ig_token_attributions(model, raw, steps, mode, alpha_batch).double()
        if agg == "abs":
            attr = attr.abs()
        elif agg == "pos":
            attr = attr.clamp_min(0)
        attr_sum += attr.sum(dim=1)
        n_tok += attr.shape[1]
    return {"attr_sum": attr_sum, "n_tok": n_tok}


def _ig_finalize(model, stats, cfg) -> torch.Tensor:
    if stats["n_tok"].item() == 0:
        raise ValueError("ig_down: the forget batches contain no answer tokens")
    return (stats["attr_sum"] / stats["n_tok"]).cpu()


_register_two_phase("ig_down", _ig_accumulate, _ig_finalize, [
    Knob("ig_steps", 20, "α steps of the Riemann sum"),
    Knob("ig_alpha_batch", IG_ALPHA_BATCH, "α steps per forward+backward (copies of the batch); lower saves memory"),
    Knob("ig_mode", "layer", "layer: one layer scaled at a time; all: every layer along one path",
         choices=("layer", "all")),
    Knob("ig_aggregate", "abs", "per-token attributions summed as absolute values, signed, or positive parts",
         choices=("abs", "signed", "pos")),
])




if __name__ == "__main__":
    # Here, not in schema.py: printing the tables needs both registries, and schema.py sits below them.
    if sys.argv[1:] != ["knobs"]:
        raise SystemExit("usage: python mask_generator.py knobs   "
                         "# the knob tables of docs/losses.md and docs/attribution.md")
    from dataloader import LOSSES
    from schema import attribution_table, loss_table

    print(f"docs/losses.md:\n\n{loss_table(LOSSES.values())}\n\ndocs/attribution.md:\n\n"
          f"{attribution_table(ATTRIBUTION_KNOBS)}")
