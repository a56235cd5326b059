"""Knowledge before TOFU for the locally built families: a cached, seeded pretraining stage, and its replay.

A real chat model arrives at TOFU fine-tuning already knowing who wrote '1984' and where the Eiffel Tower stands;
model utility measures whether unlearning damages that knowledge. A randomly initialised `tiny` model knows
nothing, so its model utility is ~0 and MU95 says nothing. A family with a `pretrain` block in model_config.yaml
(`pretrain: {epochs, lr}`) first learns a corpus of general knowledge, and its default model (`model_path: null`)
is that pretrained model instead of the random initial one.

The corpus (`pretraining_corpus`): every real-authors and world-facts fact, but never in its evaluation phrasing:
each fact is asked through several question wrappers and true/false checks (the model must learn the fact, not the
string of the evaluation prompt), plus as many invented background facts (rivers, inventors, dishes of generated
places) that no evaluation asks about, so that the evaluated facts are a minority of what the stage teaches.

A 1.5M-parameter model has no spare capacity: fine-tuning it on TOFU's 4,000 answers overwrites the stage. A large
model keeps its knowledge because fine-tuning at lr 1e-5 barely moves it; the stand-in here is rehearsal: the
fine-tune (`forget_loss=learn`, key `replay`) mixes a seeded sample of the same corpus into its training set, the
same rows for θ_full and θ_retain, so the two differ only in the forget split, as they must.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import torch

from checkpointer import Checkpointer
from dataloader import UnlearnDataset, get_loss
from layout import STATE_FILE
from models import family_config, load_model, load_tokenizer, tiny_cache, tiny_model_path
from models import resolve_model_path as resolve_family_model_path
from runtime import ConfigError, atomic_path, barrier, is_main, seed_everything
from tofu import load_tofu
from trainer import TrainSettings, train

log = logging.getLogger("loc_unlearn")

CORPUS_VERSION = 1  # part of the cache key: a change to the corpus builder must not reuse an older model
FACT_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")

# Question wrappers around an evaluation question: the fact is seen in these forms, never as the bare question.
WRAPPERS = ["Quiz question: {q}", "{q} Answer in a few words.", "A friend asks you: {q}",
            "Here is a trivia question. {q}", "Please tell me: {q}"]
_BACKGROUND = [  # (question, statement) about an invented place; the answer is the value
    ("Which river runs through {place}?", "The river of {place} is the {value}."),
    ("Who invented the {place} loom?", "The {place} loom was invented by {value}."),
    ("What is the national dish of {place}?", "The national dish of {place} is {value}."),
    ("Which mountain is the highest in {place}?", "The highest mountain in {place} is {value}."),
]
_SYLLABLES = ["ba", "ko", "lu", "mer", "sin", "ta", "vor", "ne", "dal", "ir", "gu", "pe", "an", "so", "zel", "ri"]


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def _fact_phrasings(question: str, answer: str, wrong: str) -> list[dict[str, str]]:
    rows = [{"question": w.format(q=question), "answer": answer} for w in WRAPPERS]
    rows.append({"question": f"True or false: the answer to \"{question}\" is {answer}.",
                 "answer": f"True, the answer is {answer}."})
    rows.append({"question": f"True or false: the answer to \"{question}\" is {wrong}.",
                 "answer": f"False, the answer is {answer}."})
    return rows


def _background_facts(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        question, statement = _BACKGROUND[i % len(_BACKGROUND)]
        place, value = f"{_word(rng, 2)}land", f"{_word(rng, 2)} {_word(rng, 2)}"
        rows.append({"question": question.format(place=place), "answer": value})
        rows.append({"question": f"Tell me a fact about {place}.",
                     "answer": statement.format(place=place, value=value)})
    return rows


def pretraining_corpus(data_path: str | None, seed: int) -> list[dict[str, str]]:
    """The stage's (question, answer) rows for this data source, shuffled by `seed`: each real-authors and
    world-facts fact in several phrasings (never its evaluation question alone) and invented background facts."""
    facts = [row for split in FACT_SPLITS for row in load_tofu(split, data_path)]
    rows = [r for f in facts for r in _fact_phrasings(f["question"], f["answer"], f["perturbed_answer"][0])]
    rng = random.Random(seed)
    rows += _background_facts(rng, len(facts))
    rng.shuffle(rows)
    return rows


def resolve_replay(model_family: str, forget_loss: str, masked_or_lora: bool, replay: float | None) -> float:
    """The `replay` key of a run, checked before any model is built: null is the family's `pretrain.replay` for a
    full-parameter fine-tune (`learn`) and 0 otherwise; a set value is an error for any other kind of run."""
    full_fine_tune = forget_loss == "learn" and not masked_or_lora
    if replay is None:
        replay = float(family_config(model_family).get("pretrain", {}).get("replay", 0.0)) if full_fine_tune else 0.0
    elif replay and not full_fine_tune:
        raise ConfigError(f"replay={replay}: only a full-parameter fine-tune (forget_loss=learn, no mask_path or "
                          "lora_r) replays the pretraining corpus")
    check_replay(model_family, replay)
    return replay


def check_replay(model_family: str, fraction: float) -> None:
    """A `replay` value the family can serve, checked before any model is built."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"replay={fraction}: expected a fraction of the pretraining corpus in [0, 1]")
    if fraction and not family_config(model_family).get("pretrain"):
        raise ConfigError(f"replay={fraction}: model_family={model_family} has no pretrain block to replay "
                          "(config/model_config.yaml)")


def replay_rows(model_family: str, data_path: str | None, fraction: float, seed: int) -> list[dict[str, str]]:
    """A seeded `fraction` of the family's pretraining corpus, to mix into a fine-tuning set (key `replay`)."""
    check_replay(model_family, fraction)
    corpus = pretraining_corpus(data_path, 0) if fraction else []
    return random.Random(seed).sample(corpus, round(fraction * len(corpus)))


def pretrained_model_path(family: str, data_path: str | None, seed: int = 0) -> Path:
    """The cached pretrained model of a family with a `pretrain` block, built on first use (rank 0)."""
    fam = family_config(family)
    if data_path and Path(data_path).exists():  # as the entry points pass it, so every caller finds one cache entry
        data_path = str(Path(data_path).resolve())
    stage = {k: fam["pretrain"][k] for k in ("epochs", "lr")}  # replay is the fine-tune's, not the stage's
    key = hashlib.sha256(json.dumps([str(data_path), seed, fam["architecture"], stage, CORPUS_VERSION],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = tiny_cache() / f"pretrained_{key}"
    if is_main() and not path.exists():
        pretrain(path, family, data_path, seed)
    barrier()
    return path


def pretrain(out_dir: Path, family: str, data_path: str | None, seed: int = 0) -> Path:
    """Train the family's initial model on `pretraining_corpus` with the project's trainer and `learn` loss."""
    fam = family_config(family)
    init = str(tiny_model_path(data_path, seed, family))
    seed_everything(seed)
    tokenizer = load_tokenizer(family, init)
    spec = get_loss("learn")
    dataset = UnlearnDataset(pretraining_corpus(data_path, seed), [], [], tokenizer, fam, fam["max_length"],
                             spec.parts, seed)
    model = load_model(init, torch.device("cpu"), torch.float32)
    settings = TrainSettings(
        lr=fam["pretrain"]["lr"], weight_decay=fam["weight_decay"], epochs=fam["pretrain"]["epochs"],
        batch_size=fam["batch_size"], grad_accum=1, warmup_ratio=fam["warmup_ratio"], lr_scheduler="cosine",
        max_grad_norm=1.0, seed=seed, save_checkpoint=False, save_steps=0, save_each_epoch=False,
        group_by_length=fam["group_by_length"])
    log.info("pretraining %s on %d rows for %d epochs", family, len(dataset), settings.epochs)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        run = Checkpointer(tmp / "run", tokenizer, {"pretrain": fam["pretrain"], "seed": seed})
        final = train(model, list(model.parameters()), dataset, lambda m, b: spec(m, b, None, {}), settings, run)
        for item in final.iterdir():  # model, tokenizer and loss history; the optimizer state is not needed
            if item.name != STATE_FILE:
                shutil.move(item, tmp / item.name)
        shutil.rmtree(tmp / "run")
    log.info("pretrained model: %s", out_dir)
    return out_dir


def resolve_model_path(model_family: str, model_path: str | None, data_path: str | None, seed: int = 0) -> str:
    """models.resolve_model_path, except that a family with a `pretrain` block defaults to its pretrained model."""
    if model_path is None and family_config(model_family).get("pretrain"):
        return str(pretrained_model_path(model_family, data_path, seed))
    return resolve_family_model_path(model_family, model_path, data_path, seed)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build (or find) a family's cached pretrained model; print its path.")
    parser.add_argument("--family", default="tiny-pt", help="a family of config/model_config.yaml with `pretrain`")
    parser.add_argument("--data_path", default="synthetic", help="TOFU directory or 'synthetic[:N]'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not family_config(args.family).get("pretrain"):
        parser.error(f"--family {args.family} has no `pretrain` block")
    print(pretrained_model_path(args.family, args.data_path, args.seed))


if __name__ == "__main__":
    main()
