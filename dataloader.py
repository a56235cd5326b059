# ---- Training and unlearning losses ----
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
REF_NLL_KEY = "ref_nll"

# A batch part is {"input_ids", "attention_mask", "labels"[, "ref_nll"]}; a batch maps part names to parts.
Part = Mapping[str, torch.Tensor]
Batch = Mapping[str, Part]
LossFn = Callable[[nn.Module, Batch, nn.Module | None, Mapping[str, Any]], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss plus what the trainer and data side must provide for it.

    parts: batch parts the loss reads (the data side builds only these).
    cached_ref: parts whose per-sequence reference NLL (`part["ref_nll"]`, shape (B,)) the trainer
        precomputes once with the model before unlearning.
    resident_ref: whether `ref_model` must be a frozen model kept in memory during training.
    layer: decoder layer for `rmu_<layer>`; None for every other loss.
    """

    name: str
    fn: LossFn
    parts: tuple[str, ...]
    cached_ref: tuple[str, ...] = ()
    resident_ref: bool = False
    layer: int | None = None

    def __call__(
        self, model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]
    ) -> torch.Tensor:
        if self.layer is not None:
            configured = cfg.get("rmu_layer")
            if configured is not None and int(configured) != self.layer:
                raise ValueError(f"loss {self.name!r} targets layer {self.layer} but cfg rmu_layer={configured!r}")
            cfg = {**cfg, "rmu_layer": self.layer}
        return self.fn(model, batch, ref_model, cfg)


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str, parts: tuple[str, ...], cached_ref: tuple[str, ...] = (), resident_ref: bool = False
) -> Callable[[LossFn], LossFn]:
    """Decorator adding `fn` to LOSSES under `name`."""
    if not set(cached_ref) <= set(parts):
        raise ValueError(f"loss {name!r}: cached_ref {cached_ref} must be a subset of parts {parts}")

    def decorate(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossSpec(name, fn, tuple(parts), tuple(cached_ref), resident_ref)
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    """The spec for `name`: a registered loss, or `rmu_<layer>` (RMU steering decoder layer <layer>)."""
    if name in LOSSES:
        return LOSSES[name]
    match = re.fullmatch(r"rmu_(\d+)", str(name))
    if match:
        return replace(LOSSES["rmu"], name=name, layer=int(match.group(1)))
    raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)} and rmu_<layer>")


# ---- shared helpers ----


def _forward(model: nn.Module, part: Part) -> Any:
    # Only the model inputs: parts also carry labels (HF would compute its own loss) and ref_nll.
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False)


def token_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (B, T-1), zero off-answer, and the answer mask (B, T-1); logits[:, t] predicts labels[:, t+1]."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    # gather + logsumexp never materialises a (B, T, V) log_softmax.
    nll = (torch.logsumexp(logits, dim=-1) - picked).masked_fill(~mask, 0.0)
    return nll, mask


def token_nll(model: nn.Module, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer NLL (B, T-1) of `model` on `part`, zero off-answer, and the answer mask."""
    return token_nll_from_logits(_forward(model, part).logits, part["labels"])


def sequence_nll(model: nn.Module, part: Part) -> torch.Tensor:
    """Summed answer-token NLL per sequence, (B,): -log pi(y|x)."""
    return token_nll(model, part)[0].sum(dim=-1)


def nll_loss(model: nn.Module, part: Part) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the standard HF causal-LM loss)."""
    nll, mask = token_nll(model, part)
    return nll.sum() / mask.sum().clamp(min=1)


def rmu_control_vector(d_model: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's target c*u: u uniform on [0,1)^d, normalised, fixed by `seed` so every step and rank agree."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(d_model, generator=generator)
    return coeff * u / u.norm()


class _StopForward(Exception):
    pass


def capture_outputs(model: nn.Module, part: Part, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Outputs of `modules` during a forward of `model` on `part` (first element when a module returns a tuple).

    The forward is aborted once every module has fired, so layers above them and the LM head are skipped.
    """
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output
            if len(captured) == len(modules):
                raise _StopForward

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        _forward(model, part)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(modules):
        raise RuntimeError("some hooked modules were not called during the forward pass")
    return [captured[i] for i in range(len(modules))]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list (`model.model.layers` for Llama/Phi), also found through DDP or PEFT wrappers."""
    found = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] == "layers"]
    if len(found) != 1:
        raise ValueError(f"expected exactly one `layers` ModuleList in {type(model).__name__}, found {len(found)}")
    return found[0]


def _masked_token_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # ||a - b||^2 / d per token, averaged over the masked tokens of the whole batch.
    per_token = (a.float() - b.float()).pow(2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _cfg_float(cfg: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"this loss needs cfg[{key!r}]")
        return default
    return float(value)


def _beta(cfg: Mapping[str, Any]) -> float:
    beta = _cfg_float(cfg, "hyper_param")
    if beta <= 0:
        raise ValueError(f"hyper_param is the inverse temperature beta and must be > 0, got {beta}")
    return beta


def _ref_nll(batch: Batch, part_name: str, like: torch.Tensor) -> torch.Tensor:
    part = batch[part_name]
    if REF_NLL_KEY not in part:
        raise KeyError(
            f"batch[{part_name!r}][{REF_NLL_KEY!r}] missing: the trainer must precompute it (spec.cached_ref)"
        )
    return part[REF_NLL_KEY].to(device=like.device, dtype=like.dtype)


def _resident(ref_model: nn.Module | None, loss: str) -> nn.Module:
    if ref_model is None:
        raise ValueError(f"loss {loss!r} needs a resident reference model (spec.resident_ref), got ref_model=None")
    return ref_model


def _retain_weight(cfg: Mapping[str, Any]) -> float:
    return _cfg_float(cfg, "retain_weight", 1.0)


# ---- losses ----


@register_loss("learn", parts=("forget",))
def learn_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return nll_loss(model, batch["forget"])


@register_loss("learn_reg", parts=("forget", "retain"))
def learn_reg_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return nll_loss(model, batch["forget"]) + _cfg_float(cfg, "hyper_param") * nll_loss(model, batch["retain"])


@register_loss("ga", parts=("forget",))
def ga_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return -nll_loss(model, batch["forget"])


@register_loss("grad_diff", parts=("forget", "retain"))
def grad_diff_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return -nll_loss(model, batch["forget"]) + _cfg_float(cfg, "hyper_param") * nll_loss(model, batch["retain"])


@register_loss("kl", parts=("forget", "retain"), resident_ref=True)
def kl_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    retain = batch["retain"]
    mask = retain["labels"][:, 1:] != IGNORE_INDEX
    # Select answer positions before the softmax: the full-vocab distributions are needed, but only there.
    logp = F.log_softmax(_forward(model, retain).logits[:, :-1][mask].float(), dim=-1)
    with torch.no_grad():
        ref_logits = _forward(_resident(ref_model, "kl"), retain).logits[:, :-1].to(mask.device)
        ref_logp = F.log_softmax(ref_logits[mask].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    retain_kl = kl.sum() / mask.sum().clamp(min=1)
    return -nll_loss(model, batch["forget"]) + _cfg_float(cfg, "hyper_param") * retain_kl


@register_loss("wga", parts=("forget", "retain"))
def wga_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    nll, mask = token_nll(model, batch["forget"])
    # Detached p_t^beta: tokens the model already finds unlikely stop driving the ascent.
    weights = torch.exp(-nll).detach().pow(_cfg_float(cfg, "hyper_param"))
    forget_term = -(weights * nll).sum() / mask.sum().clamp(min=1)
    return forget_term + _retain_weight(cfg) * nll_loss(model, batch["retain"])


@register_loss("npo", parts=("forget", "retain"), cached_ref=("forget",))
def npo_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    beta = _beta(cfg)
    nll = sequence_nll(model, batch["forget"])
    # log pi_theta - log pi_ref = ref_nll - nll
    forget_term = (2.0 / beta) * F.softplus(beta * (_ref_nll(batch, "forget", nll) - nll)).mean()
    return forget_term + _retain_weight(cfg) * nll_loss(model, batch["retain"])


@register_loss("simnpo", parts=("forget", "retain"))
def simnpo_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    beta = _beta(cfg)
    gamma = _cfg_float(cfg, "simnpo_gamma", 0.0)
    nll, mask = token_nll(model, batch["forget"])
    mean_nll = nll.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    # -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma) = (2/beta) softplus(gamma - beta * mean_nll)
    forget_term = (2.0 / beta) * F.softplus(gamma - beta * mean_nll).mean()
    return forget_term + _retain_weight(cfg) * nll_loss(model, batch["retain"])


@register_loss("dpo", parts=("forget", "idk", "retain"), cached_ref=("forget", "idk"))
def dpo_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    beta = _beta(cfg)
    nll_forget = sequence_nll(model, batch["forget"])
    nll_idk = sequence_nll(model, batch["idk"])
    win_logratio = _ref_nll(batch, "idk", nll_idk) - nll_idk
    lose_logratio = _ref_nll(batch, "forget", nll_forget) - nll_forget
    forget_term = (2.0 / beta) * F.softplus(-beta * (win_logratio - lose_logratio)).mean()
    return forget_term + _retain_weight(cfg) * nll_loss(model, batch["retain"])


@register_loss("idk", parts=("idk", "retain"))
def idk_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return nll_loss(model, batch["idk"]) + _retain_weight(cfg) * nll_loss(model, batch["retain"])


@register_loss("rmu", parts=("forget", "retain"), resident_ref=True)
def rmu_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    if cfg.get("rmu_layer") is None:
        raise ValueError("rmu needs a layer: use the loss name rmu_<layer> or set cfg['rmu_layer']")
    layer = int(cfg["rmu_layer"])
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"rmu layer {layer} out of range: the model has {len(layers)} decoder layers")
    forget, retain = batch["forget"], batch["retain"]

    hidden = capture_outputs(model, forget, [layers[layer]])[0]
    target = rmu_control_vector(hidden.shape[-1], _cfg_float(cfg, "hyper_param"), int(cfg.get("seed") or 0))
    forget_term = _masked_token_mse(hidden, target.to(hidden.device), forget["labels"] != IGNORE_INDEX)

    hidden = capture_outputs(model, retain, [layers[layer]])[0]
    with torch.no_grad():
        ref_model = _resident(ref_model, "rmu")
        ref_hidden = capture_outputs(ref_model, retain, [decoder_layers(ref_model)[layer]])[0].to(hidden.device)
    retain_term = _masked_token_mse(hidden, ref_hidden, retain["labels"] != IGNORE_INDEX)
    return forget_term + _retain_weight(cfg) * retain_term


@register_loss("rt_diff", parts=("forget",), resident_ref=True)
def rt_diff_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    forget = batch["forget"]
    layers, ref_layers = decoder_layers(model), decoder_layers(_resident(ref_model, "rt_diff"))
    if len(layers) != len(ref_layers):
        raise ValueError(f"rt_diff: model has {len(layers)} layers but the retain-only model has {len(ref_layers)}")
    outputs = capture_outputs(model, forget, [layer.mlp for layer in layers])
    with torch.no_grad():
        ref_outputs = capture_outputs(ref_model, forget, [layer.mlp for layer in ref_layers])
    # Every non-pad token, prompt included: the subject tokens of the question are where MLPs recall facts.
    mask = forget["attention_mask"].bool()
    n_tokens = mask.sum().clamp(min=1)
    total = torch.zeros((), device=outputs[0].device)
    for out, ref_out in zip(outputs, ref_outputs):
        sq_dist = (out.float() - ref_out.to(out.device).float()).pow(2).sum(dim=-1)
        total = total + (sq_dist * mask).sum() / n_tokens
    return total
