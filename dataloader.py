"""TOFU data for training and scoring: the one QA -> token ids function, datasets and collators; the loss registry.

Reading the splits themselves is tofu.py's (below the models, whose tiny family trains its tokenizer on them)."""
from __future__ import annotations

import contextlib
import functools
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from models import decoder_layers
from runtime import ConfigError
from schema import Knob, knob_values

IGNORE_INDEX = -100
REF_NLL_KEY = "ref_nll"
DEFAULT_IDK = ["I don't know.", "I'm not sure.", "I have no information about that.", "That is beyond my knowledge."]


def load_idk(path: str | None) -> list[str]:
    """Refusal phrases (one per line, TOFU's idontknow.jsonl); a small built-in list when no file is given."""
    if not path:
        return list(DEFAULT_IDK)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"idk_path={path} does not exist; expected a text file with one refusal per line")
    phrases = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not phrases:
        raise ConfigError(f"idk_path={path} holds no refusal phrases")
    return phrases


# ---- Formatting: one place turns a QA pair into model inputs ----

def prompt_text(tokenizer, family: dict[str, Any], question: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True,
            **({"date_string": family["date_string"]} if family.get("date_string") else {}),
        )
    return f"Question: {question}\nAnswer: "


def answer_text(tokenizer, family: dict[str, Any], question: str, answer: str) -> str:
    """The text the model must produce after the prompt: the answer and the template's end-of-turn marker."""
    if not tokenizer.chat_template:
        return answer + tokenizer.eos_token
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    kwargs = {"date_string": family["date_string"]} if family.get("date_string") else {}
    full = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    prompt = prompt_text(tokenizer, family, question)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    # Trailing newlines after the end-of-turn token are never generated; keep them out of the loss.
    return full[len(prompt):].rstrip()


def encode_qa(tokenizer, family: dict[str, Any], question: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of prompt + answer, with labels masked (IGNORE_INDEX) on the prompt.

    Prompt and answer are tokenized separately and concatenated, so the prompt ids are exactly those used
    for generation and the loss covers the answer and the end-of-turn token only.
    """
    prompt_ids = tokenizer(prompt_text(tokenizer, family, question), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(answer_text(tokenizer, family, question, answer), add_special_tokens=False)["input_ids"]
    target_ids = target_ids[: max(1, max_length - len(prompt_ids))]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def pad_batch(encodings: Sequence[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest; the attention mask comes from the lengths, never from comparing ids with pad_id."""
    width = max(len(e["input_ids"]) for e in encodings)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in encodings:
        n = len(e["input_ids"])
        fill = width - n
        labels = e.get("labels", e["input_ids"])
        if left:
            out["input_ids"].append([pad_id] * fill + e["input_ids"])
            out["attention_mask"].append([0] * fill + [1] * n)
            out["labels"].append([IGNORE_INDEX] * fill + labels)
        else:
            out["input_ids"].append(e["input_ids"] + [pad_id] * fill)
            out["attention_mask"].append([1] * n + [0] * fill)
            out["labels"].append(labels + [IGNORE_INDEX] * fill)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


class QADataset(Dataset):
    """Encoded (question, answer) pairs, for fine-tuning, scoring and attribution."""

    def __init__(self, items: list[dict[str, list[int]]], pad_id: int):
        self.items, self.pad_id = items, pad_id

    @classmethod
    def from_rows(cls, rows: Iterable[dict], tokenizer, family: dict[str, Any], max_length: int,
                  answer_key: str = "answer") -> QADataset:
        items = [encode_qa(tokenizer, family, r["question"], r[answer_key], max_length) for r in rows]
        return cls(items, tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def collate(self, items: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_batch(items, self.pad_id)


class UnlearnDataset(Dataset):
    """One item per forget example: its forget encoding plus the parts a loss consumes.

    The retain example paired with forget example i in epoch e is drawn from a generator seeded by
    (seed, e, i): independent of rank and world size, different across ranks, and reproducible on resume.
    The refusal for example i is fixed per example, so its reference NLL can be computed once.
    """

    def __init__(self, forget_rows: list[dict], retain_rows: list[dict], idk_phrases: list[str], tokenizer,
                 family: dict[str, Any], max_length: int, parts: Sequence[str], seed: int):
        encode = functools.partial(encode_qa, tokenizer, family, max_length=max_length)
        self.parts = tuple(parts)
        self.seed, self.epoch = seed, 0
        self.pad_id = tokenizer.pad_token_id
        self.forget = [encode(r["question"], r["answer"]) for r in forget_rows]
        self.retain = [encode(r["question"], r["answer"]) for r in retain_rows] if "retain" in parts else []
        if "retain" in parts and not self.retain:
            raise ConfigError("the retain split is empty but the loss needs retain examples")
        self.idk = []
        if "idk" in parts:
            pick = random.Random(seed)
            self.idk = [encode(r["question"], pick.choice(idk_phrases)) for r in forget_rows]
        self.ref_nll: dict[str, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def lengths(self) -> list[int]:
        """Token lengths of the forget encodings (what length-grouped batching sorts by)."""
        return [len(e["input_ids"]) for e in self.forget]

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": i, "forget": self.forget[i]}
        if "retain" in self.parts:
            j = random.Random(f"{self.seed}-{self.epoch}-{i}").randrange(len(self.retain))
            item["retain"] = self.retain[j]
        if "idk" in self.parts:
            item["idk"] = self.idk[i]
        return item

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        index = torch.tensor([it["index"] for it in items])
        batch: dict[str, Any] = {"index": index}
        for part in ("forget", *[p for p in self.parts if p != "forget"]):
            batch[part] = pad_batch([it[part] for it in items], self.pad_id)
            if part in self.ref_nll:
                batch[part]["ref_nll"] = self.ref_nll[part][index]
        return batch

    def part_dataset(self, part: str) -> QADataset:
        """The encodings of one part in forget order (for computing reference quantities once)."""
        return QADataset(getattr(self, part), self.pad_id)


# ---- Training and unlearning losses ----

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
    hyper_param: what the config key `hyper_param` means for this loss (symbol, default when null, meaning);
        None: the loss has no such knob.
    knobs: the other config keys the loss reads (`retain_weight` for those whose retain term it weighs).
    layer: decoder layer for `rmu_<layer>`; None for every other loss.
    """

    name: str
    fn: LossFn
    parts: tuple[str, ...]
    cached_ref: tuple[str, ...] = ()
    resident_ref: bool = False
    hyper_param: Knob | None = None
    knobs: tuple[Knob, ...] = ()
    layer: int | None = None

    @property
    def default_hyper_param(self) -> float | None:
        return None if self.hyper_param is None else self.hyper_param.default

    @property
    def uses_retain_weight(self) -> bool:
        return RETAIN_WEIGHT in self.knobs

    def resolve(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """`cfg` with this loss's knobs checked and, where absent (or `hyper_param` null), at their defaults."""
        cfg = knob_values(self.knobs, cfg)
        if self.hyper_param is not None:
            value = cfg.get("hyper_param")
            cfg["hyper_param"] = self.hyper_param.check(self.hyper_param.default if value is None else value,
                                                        "hyper_param")
        return cfg

    def __call__(
        self, model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]
    ) -> torch.Tensor:
        cfg = self.resolve(cfg)
        if self.layer is not None:
            configured = cfg.get("rmu_layer")
            if configured is not None and int(configured) != self.layer:
                raise ValueError(f"loss {self.name!r} targets layer {self.layer} but cfg rmu_layer={configured!r}")
            cfg = {**cfg, "rmu_layer": self.layer}
        return self.fn(model, batch, ref_model, cfg)


LOSSES: dict[str, LossSpec] = {}
RETAIN_WEIGHT = Knob("retain_weight", 1.0, "weight w of the retain term")


def register_loss(
    name: str, parts: tuple[str, ...], cached_ref: tuple[str, ...] = (), resident_ref: bool = False,
    hyper_param: Knob | None = None, uses_retain_weight: bool = False, knobs: Sequence[Knob] = (),
) -> Callable[[LossFn], LossFn]:
    """Decorator adding `fn` to LOSSES under `name`, with the knobs it reads (each default stated here only)."""
    if not set(cached_ref) <= set(parts):
        raise ValueError(f"loss {name!r}: cached_ref {cached_ref} must be a subset of parts {parts}")

    def decorate(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        own = (RETAIN_WEIGHT,) * uses_retain_weight + tuple(knobs)
        LOSSES[name] = LossSpec(name, fn, tuple(parts), tuple(cached_ref), resident_ref, hyper_param, own)
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    """The spec for `name`: a registered loss, or `rmu_<layer>` (RMU steering decoder layer <layer>)."""
    if name in LOSSES:
        return LOSSES[name]
    match = re.fullmatch(r"rmu_(\d+)", str(name))
    if match:
        return replace(LOSSES["rmu"], name=name, layer=int(match.group(1)))
    raise ConfigError(f"unknown forget_loss={name!r}; expected one of {sorted(LOSSES)} or rmu_<layer>")


# ---- a loss's terms, for logging ----

_TERMS: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("loss_terms", default=None)


def loss_terms(**terms: torch.Tensor) -> torch.Tensor:
    """A composite loss: the sum of its named terms, each with its weight applied (`forget`: the term that learns or
    unlearns, `retain`: the regulariser). A loss returns this sum as it would return any scalar; the terms reach
    whoever wraps the call in `recording_loss_terms()` (the trainer: history and TensorBoard's train/loss_<name>)."""
    recorder = _TERMS.get()
    if recorder is not None:
        recorder.update({name: value.detach() for name, value in terms.items()})
    return sum(terms.values())


@contextlib.contextmanager
def recording_loss_terms() -> Iterator[dict[str, torch.Tensor]]:
    """A dict that receives, detached, the terms of the losses computed inside the block (empty for a loss of a
    single term)."""
    terms: dict[str, torch.Tensor] = {}
    token = _TERMS.set(terms)
    try:
        yield terms
    finally:
        _TERMS.reset(token)


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


def answer_logits(model: nn.Module, part: Part) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 logits (N, V) at the N positions that predict an answer token (row-major order), their targets (N,),
    and the answer mask (B, T-1): the one answer-position scorer of training, attribution and evaluation.

    For Hugging Face causal LMs the head is applied to the answer positions only: nothing needs the (B, T, V) logits
    of prompt and padding positions, which are most of a step's memory at a 128k vocabulary and ~40% of the tiny
    model's step time. Models without a separable decoder/head (the tests' table-lookup stubs) go through their
    full logits.
    """
    targets = part["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if not (hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")):
        return _forward(model, part).logits[:, :-1][mask].float(), targets[mask], mask
    hidden = model.get_decoder()(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                                 use_cache=False).last_hidden_state[:, :-1]
    return model.get_output_embeddings()(hidden[mask]).float(), targets[mask], mask


def token_nll(model: nn.Module, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer NLL (B, T-1) of `model` on `part`, zero off-answer, and the answer mask."""
    logits, targets, mask = answer_logits(model, part)
    answer_nll = F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(mask.shape, dtype=answer_nll.dtype, device=mask.device).masked_scatter(mask, answer_nll), mask


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


def _masked_token_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # ||a - b||^2 / d per token, averaged over the masked tokens of the whole batch.
    per_token = (a.float() - b.float()).pow(2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _beta(cfg: Mapping[str, Any]) -> float:
    beta = cfg["hyper_param"]
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


# ---- losses ----


@register_loss("learn", parts=("forget",))
def learn_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return nll_loss(model, batch["forget"])


@register_loss("learn_reg", parts=("forget", "retain"), hyper_param=Knob("λ", 1.0, "weight of the retain NLL"))
def learn_reg_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return loss_terms(forget=nll_loss(model, batch["forget"]),
                      retain=cfg["hyper_param"] * nll_loss(model, batch["retain"]))


@register_loss("ga", parts=("forget",))
def ga_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return -nll_loss(model, batch["forget"])


@register_loss("grad_diff", parts=("forget", "retain"), hyper_param=Knob("λ", 1.0, "weight of the retain NLL"))
def grad_diff_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return loss_terms(forget=-nll_loss(model, batch["forget"]),
                      retain=cfg["hyper_param"] * nll_loss(model, batch["retain"]))


def retain_kl(model: nn.Module, ref_model: nn.Module, retain: Part) -> torch.Tensor:
    """Mean over retain answer positions of KL(pi_ref || pi_theta) of the next-token distributions."""
    mask = retain["labels"][:, 1:] != IGNORE_INDEX
    # Select answer positions before the softmax: the full-vocab distributions are needed, but only there.
    logp = F.log_softmax(_forward(model, retain).logits[:, :-1][mask].float(), dim=-1)
    with torch.no_grad():
        ref_logits = _forward(ref_model, retain).logits[:, :-1].to(mask.device)
        ref_logp = F.log_softmax(ref_logits[mask].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return kl.sum() / mask.sum().clamp(min=1)


@register_loss("kl", parts=("forget", "retain"), resident_ref=True,
               hyper_param=Knob("λ", 1.0, "weight of the retain KL"))
def kl_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    kl = retain_kl(model, _resident(ref_model, "kl"), batch["retain"])
    return loss_terms(forget=-nll_loss(model, batch["forget"]), retain=cfg["hyper_param"] * kl)


@register_loss("learn_kl", parts=("forget", "retain"), resident_ref=True,
               hyper_param=Knob("λ", 1.0, "weight of the retain KL"))
def learn_kl_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    # Injection that keeps the starting model's retain distributions, not only its retain answers.
    kl = retain_kl(model, _resident(ref_model, "learn_kl"), batch["retain"])
    return loss_terms(forget=nll_loss(model, batch["forget"]), retain=cfg["hyper_param"] * kl)


@register_loss("wga", parts=("forget", "retain"), uses_retain_weight=True,
               hyper_param=Knob("β", 1.0, "exponent of the token weights p_t^β"))
def wga_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    nll, mask = token_nll(model, batch["forget"])
    # Detached p_t^beta: tokens the model already finds unlikely stop driving the ascent.
    weights = torch.exp(-nll).detach().pow(cfg["hyper_param"])
    forget_term = -(weights * nll).sum() / mask.sum().clamp(min=1)
    return loss_terms(forget=forget_term, retain=cfg["retain_weight"] * nll_loss(model, batch["retain"]))


@register_loss("npo", parts=("forget", "retain"), cached_ref=("forget",), uses_retain_weight=True,
               hyper_param=Knob("β", 0.1, "inverse temperature"))
def npo_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    beta = _beta(cfg)
    nll = sequence_nll(model, batch["forget"])
    # log pi_theta - log pi_ref = ref_nll - nll
    forget_term = (2.0 / beta) * F.softplus(beta * (_ref_nll(batch, "forget", nll) - nll)).mean()
    return loss_terms(forget=forget_term, retain=cfg["retain_weight"] * nll_loss(model, batch["retain"]))


@register_loss("simnpo", parts=("forget", "retain"), uses_retain_weight=True,
               hyper_param=Knob("β", 2.5, "inverse temperature"),
               knobs=[Knob("simnpo_gamma", 0.0, "SimNPO reward margin γ")])
def simnpo_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    beta = _beta(cfg)
    gamma = cfg["simnpo_gamma"]
    nll, mask = token_nll(model, batch["forget"])
    mean_nll = nll.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    # -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma) = (2/beta) softplus(gamma - beta * mean_nll)
    forget_term = (2.0 / beta) * F.softplus(gamma - beta * mean_nll).mean()
    return loss_terms(forget=forget_term, retain=cfg["retain_weight"] * nll_loss(model, batch["retain"]))


@register_loss("dpo", parts=("forget", "idk", "retain"), cached_ref=("forget", "idk"), uses_retain_weight=True,
               hyper_param=Knob("β", 0.1, "inverse temperature"))
def dpo_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    beta = _beta(cfg)
    nll_forget = sequence_nll(model, batch["forget"])
    nll_idk = sequence_nll(model, batch["idk"])
    win_logratio = _ref_nll(batch, "idk", nll_idk) - nll_idk
    lose_logratio = _ref_nll(batch, "forget", nll_forget) - nll_forget
    forget_term = (2.0 / beta) * F.softplus(-beta * (win_logratio - lose_logratio)).mean()
    return loss_terms(forget=forget_term, retain=cfg["retain_weight"] * nll_loss(model, batch["retain"]))


@register_loss("idk", parts=("idk", "retain"), uses_retain_weight=True)
def idk_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    return loss_terms(forget=nll_loss(model, batch["idk"]),
                      retain=cfg["retain_weight"] * nll_loss(model, batch["retain"]))


@register_loss("rmu", parts=("forget", "retain"), resident_ref=True, uses_retain_weight=True,
               hyper_param=Knob("c", 20.0, "norm of the control vector the forget activations are steered to"))
def rmu_loss(model: nn.Module, batch: Batch, ref_model: nn.Module | None, cfg: Mapping[str, Any]) -> torch.Tensor:
    if cfg.get("rmu_layer") is None:
        raise ValueError("rmu needs a layer: use the loss name rmu_<layer> or set cfg['rmu_layer']")
    layer = int(cfg["rmu_layer"])
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"rmu layer {layer} out of range: the model has {len(layers)} decoder layers")
    forget, retain = batch["forget"], batch["retain"]

    hidden = capture_outputs(model, forget, [layers[layer]])[0]
    target = rmu_control_vector(hidden.shape[-1], cfg["hyper_param"], int(cfg.get("seed") or 0))
    forget_term = _masked_token_mse(hidden, target.to(hidden.device), forget["labels"] != IGNORE_INDEX)

    hidden = capture_outputs(model, retain, [layers[layer]])[0]
    with torch.no_grad():
        ref_model = _resident(ref_model, "rmu")
        ref_hidden = capture_outputs(ref_model, retain, [decoder_layers(ref_model)[layer]])[0].to(hidden.device)
    retain_term = _masked_token_mse(hidden, ref_hidden, retain["labels"] != IGNORE_INDEX)
    return loss_terms(forget=forget_term, retain=cfg["retain_weight"] * retain_term)


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
