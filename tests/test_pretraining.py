"""The pretraining stage of the local families: its corpus, its cache, the resolution of a family's default model, and
the replay of the corpus during fine-tuning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_entry

import pretraining
from models import family_config, resolve_model_path, tiny_cache
from tofu import load_tofu


def test_corpus_is_deterministic_holds_every_fact_and_never_the_bare_evaluation_question():
    corpus = pretraining.pretraining_corpus("synthetic", 0)
    assert corpus == pretraining.pretraining_corpus("synthetic", 0)
    assert corpus != pretraining.pretraining_corpus("synthetic", 1)
    questions = {r["question"] for r in corpus}
    facts = [f for split in pretraining.FACT_SPLITS for f in load_tofu(split, "synthetic")]
    for fact in facts:
        taught = [r for r in corpus if fact["question"] in r["question"] and fact["answer"] in r["answer"]]
        assert len(taught) >= len(pretraining.WRAPPERS) + 1, fact["question"]
        assert fact["question"] not in questions  # the evaluation prompt itself is never trained on
    # the evaluated facts are at most about half of what the stage teaches
    background = [r for r in corpus if not any(f["question"] in r["question"] for f in facts)]
    assert len(background) >= len(facts)


def test_family_without_pretrain_resolves_as_models_does(tiny_path):
    assert "pretrain" not in family_config("tiny")
    assert pretraining.resolve_model_path("tiny", None, "synthetic") == resolve_model_path("tiny", None, "synthetic")
    assert pretraining.resolve_model_path("tiny", str(tiny_path), "synthetic") == str(tiny_path)


def test_pretrained_model_is_built_once_and_is_the_default(tmp_path, monkeypatch, tiny_path):
    fam = {**family_config("tiny"), "pretrain": {"epochs": 1, "lr": 5.0e-3, "replay": 0.5}}
    monkeypatch.setattr(pretraining, "family_config", lambda name: fam)
    monkeypatch.setattr(pretraining, "tiny_cache", lambda: tmp_path)
    corpus = pretraining.pretraining_corpus("synthetic", 0)[:32]
    calls = []
    monkeypatch.setattr(pretraining, "pretraining_corpus", lambda d, s: calls.append(s) or corpus)
    path = pretraining.resolve_model_path("tiny", None, "synthetic")
    assert path.startswith(str(tmp_path / "pretrained_"))
    files = {p.name for p in Path(path).iterdir()}
    assert files >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert "trainer_state.pt" not in files  # the optimizer state is not kept
    assert pretraining.resolve_model_path("tiny", None, "synthetic") == path and calls == [0]  # cached
    # the fine-tune's replay share is not part of the stage: changing it reuses the same pretrained model
    fam["pretrain"] = {**fam["pretrain"], "replay": 1.0}
    assert pretraining.resolve_model_path("tiny", None, "synthetic") == path and calls == [0]


def test_replay_rows_are_a_seeded_sample_of_the_corpus():
    corpus = pretraining.pretraining_corpus("synthetic", 0)
    half = pretraining.replay_rows("tiny-pt", "synthetic", 0.5, seed=3)
    assert len(half) == round(0.5 * len(corpus))
    assert all(row in corpus for row in half) and len({json.dumps(r) for r in half}) == len(half)
    # the same rows for the same seed: θ_full and θ_retain of one seed differ only in the TOFU split
    assert half == pretraining.replay_rows("tiny-pt", "synthetic", 0.5, seed=3)
    assert half != pretraining.replay_rows("tiny-pt", "synthetic", 0.5, seed=4)
    assert sorted(map(json.dumps, pretraining.replay_rows("tiny-pt", "synthetic", 1.0, 0))) == \
        sorted(map(json.dumps, corpus))
    assert pretraining.replay_rows("tiny", "synthetic", 0.0, 0) == []


def test_replay_defaults_to_the_family_for_a_full_fine_tune_only():
    assert pretraining.resolve_replay("tiny-pt", "learn", False, None) == \
        family_config("tiny-pt")["pretrain"]["replay"] > 0
    assert pretraining.resolve_replay("tiny-pt", "learn", True, None) == 0  # injection into a mask
    assert pretraining.resolve_replay("tiny-pt", "npo", False, None) == 0
    assert pretraining.resolve_replay("tiny", "learn", False, None) == 0
    assert pretraining.resolve_replay("tiny-pt", "learn", False, 0.7) == 0.7  # a set value wins
    assert pretraining.resolve_replay("tiny-pt", "npo", False, 0.0) == 0


@pytest.mark.parametrize("overrides, error", [
    (["model_family=tiny", "forget_loss=learn", "replay=0.5"],
     "replay=0.5: model_family=tiny has no pretrain block"),
    (["model_family=tiny-pt", "forget_loss=npo", "replay=0.5"],
     "replay=0.5: only a full-parameter fine-tune (forget_loss=learn"),
    (["model_family=tiny-pt", "forget_loss=learn", "replay=1.5"],
     "replay=1.5: expected a fraction of the pretraining corpus in [0, 1]"),
])
def test_bad_replay_is_one_line(capsys, tmp_path, overrides, error):
    code, line = run_entry("unlearn.py", ["data_path=synthetic", f"output_dir={tmp_path / 'run'}", *overrides],
                           capsys)
    assert code == 2 and error in line, line
    assert not (tmp_path / "run").exists()
    assert not list(tiny_cache().glob("pretrained_*"))  # refused before the pretraining stage would run
