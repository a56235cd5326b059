"""evaluator.py and eval_tofu.py: hand-computed probabilities, truth ratios and ES from a stub bigram model, batching
and padding invariance, left-padded generation, and the entry point end to end (JSON, reuse, forget quality,
torchrun)."""
from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config, ok
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import evaluator as E
import metrics as M
from dataloader import encode_qa
from eval_tofu import evaluate
from models import family_config, load_model, load_tokenizer
from runtime import ConfigError
from tofu import load_tofu

# Unit tests of the evaluation: the synthetic data (tests/test_data.py checks the real TOFU files' structure).
DATA = "synthetic"
# Small enough to keep every run of the entry point to a few seconds on 2 CPU cores.
SMALL = ["forget_split=forget01", "max_samples=6", "max_new_tokens=8", "batch_size=4", "generation_batch_size=2",
         f"data_path={DATA}"]


# ---- A stub model with a known next-token table ----

WORDS = ["<pad>", "</s>", "Question:", "Answer:", "q", "x", "y", "z"]
ID = {w: i for i, w in enumerate(WORDS)}


def _row(named: dict[str, float]) -> list[float]:
    """A next-token distribution: the named probabilities, the rest of the mass spread evenly over the other words."""
    rest = (1.0 - sum(named.values())) / (len(WORDS) - len(named))
    return [named.get(w, rest) for w in WORDS]


# P(next | previous); unlisted previous tokens predict uniformly. Argmax: Answer: -> x -> y -> </s>, z -> </s>.
TABLE = {
    "Answer:": _row({"x": 1 / 2, "y": 1 / 8, "z": 1 / 8}),
    "x": _row({"y": 1 / 2, "</s>": 1 / 4}),
    "y": _row({"</s>": 1 / 2, "x": 1 / 4}),
    "z": _row({"</s>": 1 / 2, "z": 1 / 4}),
}


class BigramStub(torch.nn.Module):
    """Logits depend only on the previous token: log P(next | previous) from TABLE."""

    def __init__(self) -> None:
        super().__init__()
        probs = torch.full((len(WORDS), len(WORDS)), 1 / len(WORDS), dtype=torch.float64)
        for word, row in TABLE.items():
            probs[ID[word]] = torch.tensor(row, dtype=torch.float64)
        self.log_probs = torch.nn.Parameter(probs.log().float(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.log_probs[input_ids])


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word; no chat template, so the prompt is "Question: q\\nAnswer: " -> [Question:, q, Answer:]."""
    tokenizer = Tokenizer(tok_models.WordLevel(ID, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")


STUB_FAMILY: dict = {"date_string": None}
STUB = E.EvalSettings(batch_size=3, max_length=32)


def test_answer_nll_by_hand(word_tokenizer):
    # "x y" scores x|Answer:, y|x and </s>|y, each 1/2: mean NLL ln 2 over 3 tokens.
    # "z z" scores 1/8 * 1/4 * 1/2 = 2^-6 over 3 tokens: mean NLL 2 ln 2.
    enc = [encode_qa(word_tokenizer, STUB_FAMILY, "q", a, 32) for a in ("x y", "z z", "z")]
    nll, n = E.answer_nll(BigramStub(), enc, batch_size=2)
    assert n == [3, 3, 2]
    np.testing.assert_allclose(nll, [math.log(2), 2 * math.log(2), 2 * math.log(2)], rtol=1e-6)


def test_perturbed_split_probability_and_truth_ratio_by_hand(word_tokenizer):
    # P("x y") = (1/2 * 1/2 * 1/2)^(1/3) = 1/2          P("y x") = (1/8 * 1/4 * 1/4)^(1/3) = 2^(-7/3)
    # P("z") = (1/8 * 1/2)^(1/2) = 1/4                   P("z z") = (1/8 * 1/4 * 1/2)^(1/3) = 1/4
    rows = [
        # r = geomean(1/4, 1/4) / P("y x") = 2^(-2 + 7/3) = 2^(1/3)
        {"question": "q", "answer": "x y", "paraphrased_answer": "y x", "perturbed_answer": ["z", "z z"]},
        # r = (1/4) / P("x y") = 1/2
        {"question": "q", "answer": "y x", "paraphrased_answer": "x y", "perturbed_answer": ["z", "z z"]},
    ]
    forget = E.score_perturbed_split(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB, "forget")
    np.testing.assert_allclose(forget["prob"], [1 / 2, 2 ** (-7 / 3)], rtol=1e-6)
    np.testing.assert_allclose(forget["paraphrased_prob"], [2 ** (-7 / 3), 1 / 2], rtol=1e-6)
    np.testing.assert_allclose(forget["perturbed_prob"], [[1 / 4, 1 / 4]] * 2, rtol=1e-6)
    np.testing.assert_allclose(forget["truth_ratio"], [2 ** (1 / 3), 1 / 2], rtol=1e-6)
    # forget: min(r, 1/r); retain: max(0, 1 - r)
    np.testing.assert_allclose(forget["truth_ratio_score"], [2 ** (-1 / 3), 1 / 2], rtol=1e-6)
    retain = E.score_perturbed_split(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB, "retain")
    np.testing.assert_allclose(retain["truth_ratio_score"], [0.0, 1 / 2], atol=1e-6)


def test_factual_split_normalized_probability_and_truth_ratio_by_hand(word_tokenizer):
    rows = [{"question": "q", "answer": "x y", "perturbed_answer": ["z", "y x"]}]
    out = E.score_factual_split(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB)
    # Probability: 1/2 / (1/2 + 1/4 + 2^(-7/3)), not the raw 1/2.
    np.testing.assert_allclose(out["prob"], [0.5 / (0.5 + 0.25 + 2 ** (-7 / 3))], rtol=1e-6)
    np.testing.assert_allclose(out["answer_prob"], [0.5], rtol=1e-6)
    # The answer stands in for the paraphrase: r = sqrt(1/4 * 2^(-7/3)) / (1/2) = 2^(-7/6); score 1 - r.
    np.testing.assert_allclose(out["truth_ratio"], [2 ** (-7 / 6)], rtol=1e-6)
    np.testing.assert_allclose(out["truth_ratio_score"], [1 - 2 ** (-7 / 6)], rtol=1e-6)


@pytest.mark.parametrize("convention, expected", [
    # "x y": Answer:->x, x->y, y->EOS all greedy: reproduced from the question alone, ES 1.
    # "y x": no answer token is the greedy one: ES 0.
    # "x z": right, wrong (x->y), right (z->EOS): k = 2 of n = 3, ES 1/3.   "z": wrong, right: ES 1 - 1/2.
    ("paper", [1.0, 0.0, 1 / 3, 1 / 2]),
    # open-unlearning drops the EOS label, then caps k at n - 1: "y x" [wrong, wrong] and "x z" [right, wrong] give
    # 1 - 1/2; "z" [wrong] gives 1 - 0/1.
    ("open_unlearning", [1.0, 1 / 2, 1 / 2, 1.0]),
])
def test_extraction_strength_by_hand(word_tokenizer, convention, expected):
    enc = [encode_qa(word_tokenizer, STUB_FAMILY, "q", a, 32) for a in ("x y", "y x", "x z", "z")]
    np.testing.assert_allclose(E.extraction_strengths(BigramStub(), enc, 3, convention), expected)


def test_forget_split_es_comes_with_the_answer_scores(word_tokenizer):
    rows = [{"question": "q", "answer": a, "paraphrased_answer": "x y", "perturbed_answer": ["z"]}
            for a in ("x y", "y x", "x z")]
    out = E.score_perturbed_split(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB, "forget", with_es=True)
    np.testing.assert_allclose(out["es"], [1.0, 0.0, 1 / 3])


def _moments(previous: str) -> tuple[float, float]:
    """Mean and variance of log p under the stub's next-token distribution after `previous`, from TABLE."""
    p = np.array(TABLE[previous])
    mu = float((p * np.log(p)).sum())
    return mu, float((p * np.log(p) ** 2).sum() - mu**2)


def test_token_stats_and_every_attack_score_by_hand(word_tokenizer):
    # "x z" scores x|Answer: = 1/2, z|x = (1 - 3/4) / 6 = 1/24 and </s>|z = 1/2.
    p_rest_x = (1 - 3 / 4) / 6
    settings = E.EvalSettings(batch_size=3, max_length=32, mia_k=0.4)
    rows = [{"question": "q", "answer": "x z"}, {"question": "q", "answer": "x y"}]
    enc = [encode_qa(word_tokenizer, STUB_FAMILY, r["question"], r["answer"], 32) for r in rows]
    scores = E.score_answers(BigramStub(), enc, batch_size=2, token_stats=[0])
    assert list(scores.tokens) == [0]  # only the encodings asked for
    tokens = scores.tokens[0]
    np.testing.assert_allclose(tokens.logp, np.log([1 / 2, p_rest_x, 1 / 2]), rtol=1e-5)
    moments = np.array([_moments(w) for w in ("Answer:", "x", "z")])
    np.testing.assert_allclose(tokens.mu, moments[:, 0], rtol=1e-5)
    np.testing.assert_allclose(tokens.var, moments[:, 1], rtol=1e-5)

    out = E.evaluate_holdout(BigramStub(), word_tokenizer, STUB_FAMILY, rows[:1], settings)
    loss = (2 * math.log(2) + math.log(24)) / 3
    assert out["mia_loss"] == [pytest.approx(loss, rel=1e-6)]
    assert out["mia_zlib"] == [pytest.approx(loss / len(zlib.compress(b"x z")), rel=1e-6)]
    # min-k% ranks x and z, not the end-of-turn: int(2 x 0.4) = 0 -> the single lowest, log 1/24.
    assert out["mia_min_k"] == [pytest.approx(math.log(24), rel=1e-6)]
    z = (np.log([1 / 2, p_rest_x]) - moments[:2, 0]) / np.sqrt(moments[:2, 1])
    assert out["mia_min_k_plus_plus"] == [pytest.approx(-z.min(), rel=1e-5)]
    whole = E.evaluate_holdout(BigramStub(), word_tokenizer, STUB_FAMILY, rows[:1], replace(settings, mia_k=1.0))
    assert whole["mia_min_k"] == [pytest.approx((math.log(2) + math.log(24)) / 2, rel=1e-6)]
    assert whole["mia_min_k_plus_plus"] == [pytest.approx(-z.mean(), rel=1e-5)]


class ShiftedStub(BigramStub):
    """The stub with P(y | x) raised to 3/4 (the rest renormalised): a different model for the reference attack."""

    def __init__(self) -> None:
        super().__init__()
        row = torch.tensor(_row({"y": 3 / 4, "</s>": 1 / 8}), dtype=torch.float64)
        self.log_probs.data[ID["x"]] = row.log().float()


def test_forget_mia_scores_come_from_the_scoring_pool_and_match_a_holdout_pass(word_tokenizer):
    rows = [{"question": "q", "answer": a, "paraphrased_answer": "x y", "perturbed_answer": ["z", "y x"]}
            for a in ("x y", "y x", "x z", "z")]
    forget = E.score_perturbed_split(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB, "forget", with_mia=True)
    holdout = E.evaluate_holdout(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB)
    for key in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        np.testing.assert_allclose(forget[key], holdout[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(forget["mia_loss"], -np.log(forget["prob"]), rtol=1e-6)
    plain = E.score_perturbed_split(BigramStub(), word_tokenizer, STUB_FAMILY, rows, STUB, "forget")
    assert plain == {k: v for k, v in forget.items() if not k.startswith("mia_")}

    # Reference attack: the mean NLL minus the reference model's, over the same 3 label tokens. ShiftedStub changes
    # only P(. | x): "x y" scores y|x 1/2 against 3/4 -> (ln 3/4 - ln 1/2) / 3 = ln(3/2) / 3; "y x" scores </s>|x
    # 1/4 against 1/8 -> (ln 1/8 - ln 1/4) / 3 = -ln(2) / 3.
    data = {"forget": rows[:1], "holdout": rows[1:2]}
    per_sample = {"forget": {"mia_loss": forget["mia_loss"][:1]}, "holdout": {"mia_loss": holdout["mia_loss"][1:2]}}
    ref = E.reference_attack(ShiftedStub(), word_tokenizer, STUB_FAMILY, data, per_sample, STUB)
    assert ref["forget"] == [pytest.approx(math.log(3 / 2) / 3, rel=1e-5)]
    assert ref["holdout"] == [pytest.approx(-math.log(2) / 3, rel=1e-5)]


def test_length_batches_are_even_sorted_and_complete():
    batches = E.length_batches([5, 1, 9, 3, 7, 2, 8], 3)
    assert [len(b) for b in batches] == [3, 2, 2]
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert batches[0] == [2, 6, 4]  # longest first
    assert E.length_batches([], 4) == []
    assert [len(b) for b in E.length_batches(list(range(400)), 128)] == [100] * 4


# ---- Stopping at the end of the assistant turn (Llama-3 chat format) ----

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|finetune_right_pad_id|>"]
LLAMA3_VOCAB = {w: i for i, w in enumerate([*LLAMA3_SPECIAL, "user", "assistant", "q", "x", "y"])}
# Llama-3's template without the system header: every turn ends with <|eot_id|>, while EOS is <|end_of_text|>.
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Greedy next token of the bigram Llama: the answer "x y", the end of the turn, then template text, round and round.
LLAMA3_NEXT = {"<|end_header_id|>": "x", "x": "y", "y": "<|eot_id|>", "<|eot_id|>": "<|start_header_id|>",
               "<|start_header_id|>": "assistant", "assistant": "<|end_header_id|>"}


@pytest.fixture(scope="module")
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(tok_models.WordLevel(LLAMA3_VOCAB, unk_token="q"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>",
                                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>", "<|eom_id|>"])
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def bigram_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A LlamaForCausalLM whose greedy next token depends only on the current one (LLAMA3_NEXT).

    Attention and MLP outputs are zero, so the final hidden state is the one-hot token embedding (scaled by the
    norm), and lm_head maps each token to its successor.
    """
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, config.hidden_size))
        model.lm_head.weight.zero_()
        for word, next_word in LLAMA3_NEXT.items():
            model.lm_head.weight[LLAMA3_VOCAB[next_word], LLAMA3_VOCAB[word]] = 1.0
    return model


def test_generation_stops_at_the_chat_templates_end_of_turn(llama3_tokenizer):
    tokenizer = llama3_tokenizer
    assert tokenizer.eos_token_id != tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompts = [E.prompt_ids(encode_qa(tokenizer, STUB_FAMILY, "q", "x y", 32))]
    model = bigram_llama(tokenizer)
    assert E.generate_answers(model, tokenizer, STUB_FAMILY, prompts, batch_size=1, max_new_tokens=12) == ["x y"]


def test_stop_tokens_include_the_models_generation_config_eos(llama3_tokenizer):
    ids = llama3_tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    model = bigram_llama(llama3_tokenizer)
    assert E.stop_token_ids(model, llama3_tokenizer, STUB_FAMILY) == sorted([ids[0], ids[2]])
    # Llama-3.1-Instruct's generation_config.json lists EOS, <|eom_id|> and <|eot_id|>.
    model.generation_config.eos_token_id = ids
    assert E.stop_token_ids(model, llama3_tokenizer, STUB_FAMILY) == sorted(ids)


# ---- The tiny Llama ----

@pytest.fixture(scope="module")
def tiny(tiny_path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Path]:
    return load_model(str(tiny_path), torch.device("cpu")), load_tokenizer("tiny", str(tiny_path)), tiny_path


def _encodings(tokenizer, n: int) -> list[dict[str, list[int]]]:
    rows = load_tofu("forget01_perturbed", DATA)[:n]
    family = family_config("tiny")
    return [encode_qa(tokenizer, family, r["question"], a, 256)
            for r in rows for a in (r["answer"], r["paraphrased_answer"])]


def test_batched_scoring_equals_one_at_a_time_and_full_log_softmax(tiny, monkeypatch):
    model, tokenizer, _ = tiny
    enc = _encodings(tokenizer, 5)
    assert len({len(e["input_ids"]) for e in enc}) > 1  # padding really happens
    # Token statistics of every other encoding, in chunks of 3 vocabulary rows (the chunking must not matter).
    monkeypatch.setattr(E, "MOMENT_CHUNK", 3 * len(tokenizer))
    wanted = range(0, len(enc), 2)
    batched = E.score_answers(model, enc, batch_size=4, es_convention="paper", token_stats=wanted)
    single = E.score_answers(model, enc, batch_size=1, es_convention="paper", token_stats=wanted)
    np.testing.assert_allclose(batched.mean_nll, single.mean_nll, atol=1e-5)
    assert batched.n_tokens == single.n_tokens and batched.es == single.es
    assert sorted(batched.tokens) == list(wanted)
    # Independent reference: the full-vocabulary log-softmax of an unpadded forward pass.
    for i, (e, nll) in enumerate(zip(enc, batched.mean_nll)):
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"][1:])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        answer = labels != -100
        target = logp[answer].gather(-1, labels[answer, None]).squeeze(-1)
        assert nll == pytest.approx(-target.mean().item(), abs=1e-5)
        if i in wanted:
            p = logp[answer].exp()
            mu = (p * logp[answer]).sum(-1)
            for got in (batched.tokens[i], single.tokens[i]):
                np.testing.assert_allclose(got.logp, target.numpy(), atol=1e-5)
                np.testing.assert_allclose(got.mu, mu.numpy(), atol=1e-5)
                np.testing.assert_allclose(got.var, (p * (logp[answer] - mu[:, None]) ** 2).sum(-1).numpy(),
                                           rtol=1e-4, atol=1e-5)


def test_generation_cache_is_sized_by_its_batch_not_by_earlier_calls(tiny, monkeypatch):
    """HF's static cache keeps the longest length of any earlier generate() on the model; ours is the batch's own, so
    a greedy answer cannot depend on what was generated before (another split, checkpoint or rank's share)."""
    model, tokenizer, _ = tiny
    family = family_config("tiny")
    prompts = [E.prompt_ids(e) for e in _encodings(tokenizer, 6)[::2]]
    short, long = min(prompts, key=len), max(prompts, key=len)
    lengths = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: (lengths.append(kw["past_key_values"].get_max_length()),
                                                         generate(**kw))[1])
    fresh = E.generate_answers(model, tokenizer, family, [short], batch_size=1, max_new_tokens=40)
    E.generate_answers(model, tokenizer, family, [long], batch_size=1, max_new_tokens=200)
    after = E.generate_answers(model, tokenizer, family, [short], batch_size=1, max_new_tokens=40)
    assert lengths == [len(short) + 40, len(long) + 200, len(short) + 40]
    assert after == fresh


def test_left_padded_batched_generation_equals_unbatched(tiny):
    model, tokenizer, _ = tiny
    prompts = [E.prompt_ids(e) for e in _encodings(tokenizer, 6)[::2]]
    assert len({len(p) for p in prompts}) > 1
    family = family_config("tiny")
    batched = E.generate_answers(model, tokenizer, family, prompts, batch_size=6, max_new_tokens=12)
    single = [E.generate_answers(model, tokenizer, family, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert all(g.strip() for g in batched)


# ---- eval_tofu.py ----

def run_eval(*overrides: str) -> dict:
    (out,) = evaluate(compose_config("eval_tofu", overrides))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model_dirs(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models with the same tokenizer and different weights, in writable directories."""
    path = tiny[2]
    root = tmp_path_factory.mktemp("models")
    a, b = root / "a", root / "b"
    shutil.copytree(path, a, ignore=shutil.ignore_patterns("eval_results"))
    shutil.copytree(a, b)
    other = LlamaForCausalLM.from_pretrained(a)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    other.save_pretrained(b)
    return a, b


@pytest.fixture(scope="module")
def full_result(model_dirs, tmp_path_factory) -> dict:
    """One evaluation of model a on all four splits (also the single-process reference for torchrun)."""
    return run_eval(f"model_path={model_dirs[0]}", f"output_dir={tmp_path_factory.mktemp('full')}", *SMALL)


def test_eval_writes_every_summary_key_and_consistent_per_sample_values(full_result):
    summary = full_result["summary"]
    assert set(E.SUMMARY_KEYS) <= set(summary)
    # No retain_result: no forget quality and no privleak; no mia_reference_model: no reference attack.
    missing = {"forget_quality", "log10_forget_quality", "privleak", "mia_reference_auc"}
    assert all(summary[k] is None for k in missing)
    assert all(summary[k] is not None for k in E.SUMMARY_KEYS if k not in missing)
    timing = full_result["timing"]
    assert set(timing) == {*E.SPLITS, E.HOLDOUT} and all(t["samples_per_s"] > 0 for t in timing.values())
    per = full_result["per_sample"]
    rows = {"forget": load_tofu("forget01_perturbed", DATA)[:6],
            "real_authors": load_tofu("real_authors_perturbed", DATA)[:6]}
    for split, split_rows in rows.items():
        assert per[split]["question"] == [r["question"] for r in split_rows]
        assert all(len(v) == 6 for v in per[split].values())
        np.testing.assert_allclose(per[split]["rouge_l_recall"],
                                   M.rouge_l_recall(per[split]["generation"], [r["answer"] for r in split_rows]))
    forget = per["forget"]
    np.testing.assert_allclose(forget["truth_ratio"],
                               M.truth_ratio(forget["paraphrased_prob"], forget["perturbed_prob"]))
    assert summary["forget_prob"] == pytest.approx(np.mean(forget["prob"]))
    assert summary["forget_truth_ratio"] == pytest.approx(np.mean(M.truth_ratio_score(forget["truth_ratio"], "forget")))
    assert summary["retain_strength"] == pytest.approx(np.mean(per["retain"]["es"]))
    assert summary["forget_strength"] == pytest.approx(1 - np.mean(forget["es"]))
    assert full_result["config"]["resolved_model_path"].endswith("/a")
    # MIA: forget01's answers against the first rows of holdout01, one AUC per attack.
    holdout = per[E.HOLDOUT]
    assert holdout["question"] == [r["question"] for r in load_tofu("holdout01", DATA)[:6]]
    for attack in ("loss", "zlib", "min_k", "min_k_plus_plus"):
        key = f"mia_{attack}"
        assert len(forget[key]) == len(holdout[key]) == 6
        assert summary[f"{key}_auc"] == pytest.approx(M.mia_auc(forget[key], holdout[key]))
    np.testing.assert_allclose(forget["mia_loss"], -np.log(forget["prob"]), rtol=1e-6)


def test_torchrun_two_processes_match_one(run_script, full_result, model_dirs, tmp_path):
    # One thread per process (run_script), like these tests' in-process runs, so both run the same kernels.
    ok(run_script("eval_tofu.py", f"model_path={model_dirs[0]}", f"output_dir={tmp_path}", *SMALL, nproc=2,
                  timeout=300))
    two = json.loads((tmp_path / "eval_forget01.json").read_text())["per_sample"]
    one = full_result["per_sample"]
    assert two.keys() == one.keys()
    for split in one:
        for key, values in one[split].items():
            if key in ("question", "generation"):
                assert two[split][key] == values, (split, key)
            else:
                np.testing.assert_allclose(two[split][key], values, rtol=1e-6, atol=1e-6, err_msg=f"{split}.{key}")


def test_rerun_reuses_per_sample_values_and_applies_a_new_retain_result(model_dirs, tmp_path, capsys):
    args = (f"model_path={model_dirs[0]}", f"output_dir={tmp_path}", *SMALL, "splits=[forget,retain]")
    start = time.perf_counter()
    first = run_eval(*args)
    first_s = time.perf_counter() - start
    capsys.readouterr()
    start = time.perf_counter()
    second = run_eval(*args)
    assert time.perf_counter() - start < first_s
    assert "reusing the per-sample results" in capsys.readouterr().out
    assert second == first
    assert first["summary"]["model_utility"] is None and first["summary"]["ra_prob"] is None

    # The model against its own results: identical truth-ratio samples, KS p-value 1.
    own = tmp_path / "own.json"
    shutil.copy(tmp_path / "eval_forget01.json", own)
    third = run_eval(*args, f"retain_result={own}")
    assert "reusing the per-sample results" in capsys.readouterr().out
    assert third["per_sample"] == first["per_sample"]
    assert third["summary"]["forget_quality"] == pytest.approx(1.0)
    assert third["summary"]["log10_forget_quality"] == pytest.approx(0.0)
    # ... and privleak 0: its min-k AUC is the retain AUC.
    assert third["summary"]["privleak"] == 0.0


def test_mia_off_changes_nothing_else_and_the_reference_attack_subtracts_the_reference_loss(model_dirs, tmp_path):
    a, b = model_dirs
    args = (*SMALL, "splits=[forget]", "max_new_tokens=2")
    on = run_eval(f"model_path={a}", f"output_dir={tmp_path / 'on'}", *args, f"mia_reference_model={b}")
    off = run_eval(f"model_path={a}", f"output_dir={tmp_path / 'off'}", *args, "mia=false")
    assert set(off["per_sample"]) == {"forget"} and all(v is None for k, v in off["summary"].items() if "mia" in k)
    assert off["per_sample"]["forget"] == {k: v for k, v in on["per_sample"]["forget"].items()
                                           if not k.startswith("mia_")}
    reference = run_eval(f"model_path={b}", f"output_dir={tmp_path / 'b'}", *args)["per_sample"]
    for split in ("forget", E.HOLDOUT):
        mine = on["per_sample"][split]
        np.testing.assert_allclose(mine["mia_reference"],
                                   np.subtract(mine["mia_loss"], reference[split]["mia_loss"]), atol=1e-6)
    assert on["summary"]["mia_reference_auc"] == pytest.approx(
        M.mia_auc(on["per_sample"]["forget"]["mia_reference"], on["per_sample"][E.HOLDOUT]["mia_reference"]))
    assert "mia_reference" in on["timing"]


def test_mia_config_errors(model_dirs, tmp_path):
    args = (f"model_path={model_dirs[0]}", f"output_dir={tmp_path}", *SMALL, "splits=[forget]", "max_new_tokens=2")
    with pytest.raises(ConfigError, match="mia_k=0.0 must be a fraction"):
        run_eval(*args, "mia_k=0")
    with pytest.raises(ConfigError, match="mia_reference_model is for the reference attack"):
        run_eval(*args, "mia=false", f"mia_reference_model={model_dirs[1]}")
    # A retain result without MIA scores cannot give privleak.
    no_mia = run_eval(*args, "mia=false")
    path = tmp_path / "retain.json"
    path.write_text(json.dumps(no_mia))
    with pytest.raises(ConfigError, match="has no MIA scores, which privleak needs"):
        run_eval(*args, f"retain_result={path}", f"output_dir={tmp_path / 'other'}")
    # ... nor one whose min-k% averaged another fraction of the tokens.
    path.write_text(json.dumps(run_eval(*args, "mia_k=0.2", f"output_dir={tmp_path / 'k02'}")))
    with pytest.raises(ConfigError, match="used mia_k=0.2, this run mia_k=0.4"):
        run_eval(*args, f"retain_result={path}", f"output_dir={tmp_path / 'other'}")


def test_other_model_files_are_never_served_from_the_cache(model_dirs, tmp_path, capsys):
    a, b = model_dirs
    args = (f"output_dir={tmp_path}", *SMALL, "splits=[forget]", "max_new_tokens=2")
    first = run_eval(f"model_path={a}", *args)
    capsys.readouterr()
    # Another model_path writing to the same JSON.
    other = run_eval(f"model_path={b}", *args)
    assert "reusing the per-sample" not in capsys.readouterr().out
    assert other["per_sample"]["forget"]["prob"] != first["per_sample"]["forget"]["prob"]
    # The same model_path whose weights were replaced (b's weights copied over a copy of a).
    c = tmp_path / "c"
    shutil.copytree(a, c)
    run_eval(f"model_path={c}", *args)
    shutil.copy(b / "model.safetensors", c / "model.safetensors")
    capsys.readouterr()
    replaced = run_eval(f"model_path={c}", *args)
    assert "reusing the per-sample" not in capsys.readouterr().out
    np.testing.assert_allclose(replaced["per_sample"]["forget"]["prob"], other["per_sample"]["forget"]["prob"])


def test_unknown_forget_split_is_a_config_error(model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="forget_split='forget20'.*forget01"):
        run_eval(f"model_path={model_dirs[0]}", f"output_dir={tmp_path}", *SMALL, "forget_split=forget20")


def test_retain_result_from_another_forget_split_or_size_is_a_config_error(model_dirs, tmp_path):
    other = {"config": {"forget_split": "forget05"},
             "per_sample": {"forget": {"question": ["?"] * 6, "truth_ratio": [1.0] * 6}}}
    path = tmp_path / "retain.json"
    path.write_text(json.dumps(other))
    args = (f"model_path={model_dirs[0]}", f"output_dir={tmp_path}", *SMALL, f"retain_result={path}")
    with pytest.raises(ConfigError, match="forget_split=forget05.*forget_split=forget01"):
        run_eval(*args)
    other["config"]["forget_split"] = "forget01"
    other["per_sample"]["forget"] = {"question": ["?"] * 3, "truth_ratio": [1.0] * 3}
    path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="has 3 forget01 samples, but this run has 6"):
        run_eval(*args)


def test_retain_strength_on_another_retain_eval_split(model_dirs, tmp_path):
    result = run_eval(f"model_path={model_dirs[0]}", f"output_dir={tmp_path}", *SMALL, "splits=[retain]",
                      "retain_eval_split=retain99", "max_new_tokens=2")
    per = result["per_sample"]
    assert "es" not in per["retain"]
    assert per["retain_es"]["question"] == [r["question"] for r in load_tofu("retain99", DATA)[:6]]
    assert result["summary"]["retain_strength"] == pytest.approx(np.mean(per["retain_es"]["es"]))
    assert result["summary"]["forget_strength"] is None and result["summary"]["forget_prob"] is None
    assert set(result["timing"]) == {"retain", "retain_es"}
