"""TOFU data: loading every config, the one QA -> token ids function, datasets and collators; the loss registry."""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from runtime import ConfigError

HUB_DATASET = "locuslab/TOFU"
SYNTHETIC = "synthetic"
IGNORE_INDEX = -100

_QA = ("question", "answer")
_PERTURBED = (*_QA, "paraphrased_answer", "perturbed_answer", "paraphrased_question")
_OPTIONS = (*_QA, "option1", "option2", "option3", "option4")
TOFU_CONFIGS: dict[str, tuple[str, ...]] = {
    "full": _QA,
    **{f"forget{p}": _QA for p in ("01", "05", "10")},
    **{f"retain{p}": _QA for p in ("90", "95", "99")},
    **{f"holdout{p}": _QA for p in ("01", "05", "10")},
    **{f"forget{p}_perturbed": _PERTURBED for p in ("01", "05", "10")},
    "retain_perturbed": _PERTURBED,
    "real_authors": _OPTIONS,
    "world_facts": _OPTIONS,
    "real_authors_perturbed": (*_QA, "perturbed_answer"),
    "world_facts_perturbed": (*_QA, "perturbed_answer"),
}
DEFAULT_IDK = ["I don't know.", "I'm not sure.", "I have no information about that.", "That is beyond my knowledge."]


@functools.lru_cache(maxsize=4)
def _synthetic(seed: int) -> dict[str, list[dict]]:
    from synthetic_tofu import generate

    return generate(seed)


def load_tofu(name: str, data_path: str | None = None) -> list[dict[str, Any]]:
    """Rows of one TOFU config from `data_path` (a directory of JSON-lines files), `synthetic`, or the hub."""
    if name not in TOFU_CONFIGS:
        raise ConfigError(f"unknown TOFU split {name!r}; expected one of {sorted(TOFU_CONFIGS)}")
    if data_path == SYNTHETIC:
        return _synthetic(0)[name]
    if data_path:
        rows = _read_jsonl(Path(data_path), name)
    else:
        rows = _load_from_hub(name)
    if not rows:
        raise ConfigError(f"TOFU split {name!r} from {data_path or HUB_DATASET} is empty")
    return rows


def _read_jsonl(directory: Path, name: str) -> list[dict[str, Any]]:
    if not directory.is_dir():
        raise ConfigError(f"data_path={directory} is not a directory; expected a folder of TOFU JSON-lines files")
    path = directory / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"TOFU split {name!r} not found: expected the file {path}")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
            missing = [k for k in TOFU_CONFIGS[name] if k not in row] if isinstance(row, dict) else ["(not an object)"]
            if missing:
                raise ConfigError(f"{path}:{lineno}: missing field(s) {missing}; expected {list(TOFU_CONFIGS[name])}")
            rows.append(row)
    return rows


def _load_from_hub(name: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        return list(load_dataset(HUB_DATASET, name, split="train"))
    except Exception as err:  # the hub raises many types (network, auth, missing config)
        raise ConfigError(
            f"could not load TOFU split {name!r} from the hub dataset {HUB_DATASET} ({type(err).__name__}); "
            f"pass data_path=<directory with {name}.json> or data_path={SYNTHETIC}"
        ) from None


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
                  answer_key: str = "answer") -> "QADataset":
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
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402


@dataclass
class LossSpec:
    fn: Callable
    parts: tuple[str, ...] = ("forget",)
    cached_ref: tuple[str, ...] = ()
    resident_ref: bool = False
    cfg: dict = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name, parts=("forget",), cached_ref=(), resident_ref=False):
    def wrap(fn):
        LOSSES[name] = LossSpec(fn, tuple(parts), tuple(cached_ref), resident_ref)
        return fn
    return wrap


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(f"unknown forget_loss={name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def sequence_nll(model, part):
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1].float()
    labels = part["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    tgt = labels.clamp_min(0).unsqueeze(-1)
    nll = (torch.logsumexp(logits, -1) - torch.gather(logits, -1, tgt).squeeze(-1)) * mask
    return nll.sum(-1)


def nll_loss(model, part):
    mask = part["labels"][:, 1:] != IGNORE_INDEX
    return sequence_nll(model, part).sum() / mask.sum()


@register_loss("learn")
def learn(model, batch, ref_model, cfg):
    return nll_loss(model, batch["forget"])
