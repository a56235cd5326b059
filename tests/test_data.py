"""TOFU loading, the synthetic stand-in, and the one QA formatting function."""
from __future__ import annotations

import datetime

import pytest
import torch

from dataloader import IGNORE_INDEX, UnlearnDataset, encode_qa, pad_batch, prompt_text
from models import family_config, load_tokenizer
from runtime import ConfigError
from tofu import TOFU_CONFIGS, load_tofu

ROWS = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain90": 3600, "retain95": 3800,
        "retain99": 3960, "holdout01": 40, "holdout05": 200, "holdout10": 400, "forget01_perturbed": 40,
        "forget05_perturbed": 200, "forget10_perturbed": 400, "retain_perturbed": 400, "real_authors": 100,
        "world_facts": 117, "real_authors_perturbed": 100, "world_facts_perturbed": 117}


def _check_split_structure(source: str) -> None:
    assert set(ROWS) == set(TOFU_CONFIGS)
    for name, n in ROWS.items():
        rows = load_tofu(name, source)
        assert len(rows) == n, name
        assert all(set(TOFU_CONFIGS[name]) <= set(r) for r in rows), name
    pair = lambda rows: [(r["question"], r["answer"]) for r in rows]  # noqa: E731
    full = pair(load_tofu("full", source))
    for forget, retain in (("forget10", "retain90"), ("forget05", "retain95"), ("forget01", "retain99")):
        f, r = pair(load_tofu(forget, source)), pair(load_tofu(retain, source))
        assert r + f == full
        assert not set(f) & set(r)
    perturbed = load_tofu("forget10_perturbed", source)
    assert pair(perturbed) == pair(load_tofu("forget10", source))
    assert all(len(r["perturbed_answer"]) == 5 for r in perturbed)
    assert pair(load_tofu("retain_perturbed", source)) == full[:400]
    assert not set(pair(load_tofu("holdout10", source))) & set(full)


def test_real_tofu_splits(tofu_dir):
    _check_split_structure(str(tofu_dir))


def test_synthetic_has_tofu_structure_and_is_deterministic():
    _check_split_structure("synthetic")
    from synthetic_tofu import generate

    assert generate(0) == generate(0)
    assert generate(0)["full"] != generate(1)["full"]


def test_synthetic_size_knob_keeps_tofu_fractions():
    """`synthetic:N`: the first N authors of the 200 (the same draw), forget10 their last tenth, a tenth as many
    holdout authors, and the retain evaluation rows inside retain90 even when 400 rows would reach into forget10."""
    pair = lambda rows: [(r["question"], r["answer"]) for r in rows]  # noqa: E731
    full = pair(load_tofu("full", "synthetic:20"))
    assert full == pair(load_tofu("full", "synthetic"))[:400]
    forget, retain = pair(load_tofu("forget10", "synthetic:20")), pair(load_tofu("retain90", "synthetic:20"))
    assert (len(forget), len(retain)) == (40, 360) and retain + forget == full
    assert len(load_tofu("forget05", "synthetic:20")) == 20
    assert len(load_tofu("holdout10", "synthetic:20")) == 40
    assert not set(pair(load_tofu("holdout10", "synthetic:20"))) & set(full)
    assert pair(load_tofu("retain_perturbed", "synthetic:20")) == retain
    assert len(load_tofu("real_authors", "synthetic:20")) == 100
    for bad in ("synthetic:9", "synthetic:x", "synthetic:"):
        with pytest.raises(ConfigError, match="synthetic:N with N >= 10"):
            load_tofu("full", bad)


def test_unknown_split_and_bad_directories(tmp_path):
    with pytest.raises(ConfigError, match="unknown TOFU split 'forget11'"):
        load_tofu("forget11", "synthetic")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_tofu("full", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="forget10.json"):
        load_tofu("forget10", str(tmp_path))
    (tmp_path / "forget10.json").write_text('{"question": "q", "answer": "a"}\n{"question": "q"\n')
    with pytest.raises(ConfigError, match=r"forget10.json:2: malformed JSON"):
        load_tofu("forget10", str(tmp_path))
    (tmp_path / "forget10.json").write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match=r"forget10.json:1: missing field\(s\) \['answer'\]"):
        load_tofu("forget10", str(tmp_path))


def test_prompt_tokens_carry_no_loss(tiny_path):
    tok = load_tokenizer("tiny", str(tiny_path))
    fam = family_config("tiny")
    enc = encode_qa(tok, fam, "Where was Kalo Renmi born?", "Kalo Renmi was born in Lima, Peru.", 256)
    prompt_ids = tok(prompt_text(tok, fam, "Where was Kalo Renmi born?"), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert enc["input_ids"][:n] == prompt_ids
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    # The loss covers the answer text and the end-of-turn token, nothing after it.
    assert tok.decode(enc["labels"][n:]) == "Kalo Renmi was born in Lima, Peru.<|end|>"
    assert enc["labels"][-1] == tok.eos_token_id


def test_truncation_keeps_the_prompt(tiny_path):
    tok = load_tokenizer("tiny", str(tiny_path))
    enc = encode_qa(tok, family_config("tiny"), "A question?", "word " * 100, 20)
    assert len(enc["input_ids"]) == 20 and enc["labels"][0] == IGNORE_INDEX


def test_chat_template_gets_the_fixed_date_string(tiny_path):
    tok = load_tokenizer("tiny", str(tiny_path))
    tok.chat_template = "{{ date_string | default('no date') }}|{{ messages[0]['content'] }}"
    fam = family_config("llama3.1-8b-inst")
    text = prompt_text(tok, fam, "q")
    assert text == "26 Jul 2024|q"
    assert datetime.date.today().strftime("%d %b %Y") not in text


def test_attention_mask_comes_from_lengths_not_pad_ids():
    # The end-of-turn id equals the pad id here: a real token must still be attended to.
    batch = pad_batch([{"input_ids": [5, 7, 0], "labels": [-100, 7, 0]}, {"input_ids": [5], "labels": [-100]}],
                      pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 0], [-100, -100, -100]]
    left = pad_batch([{"input_ids": [5, 0]}, {"input_ids": [5]}], pad_id=0, left=True)
    assert left["input_ids"].tolist() == [[5, 0], [0, 5]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_retain_pairing_is_seeded_by_example_and_epoch(tiny_path):
    tok = load_tokenizer("tiny", str(tiny_path))
    # 400 retain examples are plenty to draw 40 partners from (the dataset encodes every one it is given).
    forget, retain = load_tofu("forget01", "synthetic"), load_tofu("retain99", "synthetic")[:400]
    make = lambda: UnlearnDataset(forget, retain, ["I don't know."], tok, family_config("tiny"), 64,  # noqa: E731
                                  ("forget", "retain", "idk"), seed=3)
    a, b = make(), make()
    assert [a[i]["retain"] for i in range(10)] == [b[i]["retain"] for i in range(10)]
    drawn_epoch0 = [a[i]["retain"]["input_ids"] for i in range(40)]
    a.set_epoch(1)
    assert drawn_epoch0 != [a[i]["retain"]["input_ids"] for i in range(40)]
    assert len({tuple(x) for x in drawn_epoch0}) > 30  # different examples get different retain partners
    batch = a.collate([a[0], a[1]])
    assert set(batch) == {"index", "forget", "retain", "idk"}
    assert torch.equal(batch["index"], torch.tensor([0, 1]))


def test_unknown_model_family():
    with pytest.raises(ConfigError, match="unknown model_family='gpt5'"):
        family_config("gpt5")
