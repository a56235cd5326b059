"""Batched TOFU evaluation with a model: answer likelihoods, greedy generations, extraction strength and membership
inference scores, per split.

Formulas live in metrics.py and the QA -> token ids conversion in dataloader.encode_qa; this module runs the model
efficiently (length-grouped batches, sharded across torchrun ranks) and assembles the per-sample values.

A batch plan depends only on the data and the batch size, and ranks take whole batches of it, so every sample is
computed in the same padded batch whatever the number of processes: 1 and N processes give the same numbers.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, StaticCache

import metrics as M
from dataloader import IGNORE_INDEX, answer_logits, encode_qa, pad_batch
from masking import zeroed_values
from masks import random_like
from models import value_vector_shape
from runtime import is_main, rank, world_size

log = logging.getLogger("loc_unlearn")

T = TypeVar("T")

# The four TOFU evaluations: the forget and retain splits (paraphrased + perturbed answers) and the two
# general-knowledge splits (perturbed answers only).
SPLITS = ("forget", "retain", "real_authors", "world_facts")
FACTUAL_SPLITS = ("real_authors", "world_facts")
SPLIT_DATA = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
              "world_facts": "world_facts_perturbed"}
# Per-sample values kept for a split whose ES is computed apart from its TOFU metrics.
RETAIN_ES = "retain_es"
# The holdout split of the forget split (forgetNN <-> holdoutNN): given, the forget split also gets MIA scores.
HOLDOUT = "holdout"
# Per-sample keys of the attack scores, in metrics.MIA_ATTACKS order; higher means less member-like.
MIA_KEYS = {attack: f"mia_{attack}" for attack in M.MIA_ATTACKS}
# Logit values (rows x vocabulary) per chunk of the next-token moments: 4 MiB of float32.
MOMENT_CHUNK = 1 << 20


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 32              # sequences per scoring forward pass (per process)
    generation_batch_size: int = 128  # prompts per generate() call (per process)
    max_new_tokens: int = 200
    max_length: int = 256             # prompt + answer tokens when scoring (answers are truncated)
    es_convention: str = "paper"
    mia_k: float = 0.4                # fraction of answer tokens min-k% and min-k%++ average


@dataclass
class TokenStats:
    """Per answer position of one sample: log P(target), and the mean and variance of log p under the next-token
    distribution p there (what min-k% and min-k%++ need)."""
    logp: np.ndarray
    mu: np.ndarray
    var: np.ndarray


@dataclass
class AnswerScores:
    mean_nll: list[float]     # mean token NLL over the answer tokens, per sample
    n_tokens: list[int]       # answer tokens scored, per sample
    es: list[float] | None    # extraction strength, per sample, when requested
    tokens: dict[int, TokenStats]  # per-token statistics of the samples that asked for them


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory trouble shows at once).

    Batch sizes differ by at most one (400 items at 128 give 4 x 100, not 3 x 128 + 16): a small leftover batch
    would pay a whole generation's per-step cost for a few prompts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_batches = math.ceil(len(order) / batch_size)
    batches, start = [], 0
    for b in range(n_batches):
        size = len(order) // n_batches + (b < len(order) % n_batches)
        batches.append(order[start:start + size])
        start += size
    return batches


def map_batches(batches: list[list[int]], fn: Callable[[list[int]], Sequence[T]], desc: str) -> list[T]:
    """fn over the batches, this rank taking every world_size-th one; all ranks get every result, in index order."""
    local: dict[int, T] = {}
    for batch in tqdm(batches[rank()::world_size()], desc=desc, disable=not is_main(), leave=False):
        local.update(zip(batch, fn(batch)))
    if world_size() > 1:
        parts: list[dict[int, T] | None] = [None] * world_size()
        dist.all_gather_object(parts, local)
        local = {i: v for part in parts for i, v in part.items()}
    return [local[i] for i in range(len(local))]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _log_prob_moments(shifted: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu and variance var of log p under the next-token distribution p = softmax, for the rows `index` (not
    empty) of logits shifted by their row maximum (s = logit - max <= 0).

    With e = exp(s), Z = sum e and log p = s - log Z: mu = E_p[s] - log Z, var = E_p[s^2] - E_p[s]^2. s is small
    where the mass is, so the float32 cancellation in var stays near 1e-7 E_p[s^2]. Rows go in chunks of about
    MOMENT_CHUNK values: temporaries stay cache-sized, where (rows, vocabulary) ones cost more in fresh pages on a CPU
    than the arithmetic.
    """
    step = max(1, MOMENT_CHUNK // shifted.shape[-1])
    mu, var = [], []
    for part in index.split(step):
        s = shifted.index_select(0, part)
        e = s.exp()
        z = e.sum(-1)
        mean_s = torch.linalg.vecdot(e, s) / z
        mean_s2 = torch.linalg.vecdot(e.mul_(s), s) / z
        mu.append(mean_s - z.log())
        var.append((mean_s2 - mean_s.square()).clamp_(min=0.0))
    return torch.cat(mu), torch.cat(var)


@torch.inference_mode()
def score_answers(model: torch.nn.Module, encodings: Sequence[dict[str, list[int]]], batch_size: int,
                  es_convention: str | None = None, desc: str = "scoring",
                  token_stats: Collection[int] = ()) -> AnswerScores:
    """Teacher-forced answer NLL per sample (and, from the same forward pass, extraction strength if asked, and
    TokenStats of the encodings indexed in token_stats)."""
    for i, e in enumerate(encodings):
        if all(label == IGNORE_INDEX for label in e["labels"]):
            raise ValueError(f"encoding {i} has no answer tokens to score")
    device = _device(model)
    model.eval()

    token_stats = frozenset(token_stats)

    def run(idx: list[int]) -> list[tuple[float, int, float | None, TokenStats | None]]:
        # Right padding sits after every scored position and causal attention never looks ahead, so the pad id
        # is irrelevant: 0 exists in every vocabulary.
        batch = {k: v.to(device) for k, v in pad_batch([encodings[i] for i in idx], pad_id=0).items()}
        # Logits only at the positions that predict an answer token, in row-major order like answer.nonzero().
        picked, targets, answer = answer_logits(model, batch)
        best = picked.amax(-1)
        target_logit = picked.gather(-1, targets[:, None]).squeeze(-1)
        rows = answer.nonzero()[:, 0]
        counts = answer.sum(1)
        shifted = picked.sub_(best[:, None])
        want = torch.tensor([i in token_stats for i in idx], device=device)
        wanted_rows = want[rows]
        wanted_index = wanted_rows.nonzero()[:, 0]
        # Before the in-place exp below, which overwrites the shifted logits.
        moments = _log_prob_moments(shifted, wanted_index) if len(wanted_index) else None
        # log-sum-exp in place on this float32 copy: no full-vocabulary log-softmax is ever materialised.
        log_norm = best + shifted.exp_().sum(-1).log()
        token_nll = log_norm - target_logit
        stats: list[TokenStats | None] = [None] * len(idx)
        if moments is not None:
            mu, var = moments
            sizes = counts[want].tolist()
            columns = [torch.split(c.double().cpu(), sizes) for c in (-token_nll[wanted_rows], mu, var)]
            for j, parts in zip(want.nonzero()[:, 0].tolist(), zip(*columns)):
                stats[j] = TokenStats(*(part.numpy() for part in parts))
        nll_sum = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, token_nll.double())
        mean_nll = (nll_sum / counts).tolist()
        es: list[float | None] = [None] * len(idx)
        if es_convention is not None:
            # The greedy prediction is right when the target attains the maximum logit (a tie counts as right).
            correct = torch.zeros_like(answer)
            correct[answer] = target_logit >= best
            es = M.extraction_strength_batch(correct.cpu().numpy(), answer.cpu().numpy(), es_convention).tolist()
        return list(zip(mean_nll, counts.tolist(), es, stats))

    results = map_batches(length_batches([len(e["input_ids"]) for e in encodings], batch_size), run, desc)
    return AnswerScores(
        mean_nll=[float(r[0]) for r in results],
        n_tokens=[int(r[1]) for r in results],
        es=[float(r[2]) for r in results] if es_convention is not None else None,
        tokens={i: r[3] for i, r in enumerate(results) if r[3] is not None},
    )


def answer_nll(model: torch.nn.Module, encodings: Sequence[dict[str, list[int]]],
               batch_size: int) -> tuple[list[float], list[int]]:
    """Per-sample mean token NLL over the answer tokens (labels != IGNORE_INDEX), and the number of those tokens."""
    scores = score_answers(model, encodings, batch_size)
    return scores.mean_nll, scores.n_tokens


def mean_token_nll(model: torch.nn.Module, encodings: Sequence[dict[str, list[int]]], batch_size: int,
                   desc: str = "scoring") -> float:
    """NLL per answer token pooled over every answer token of ``encodings`` (a sample weighs by its tokens)."""
    scores = score_answers(model, encodings, batch_size, desc=desc)
    return math.fsum(nll * n for nll, n in zip(scores.mean_nll, scores.n_tokens)) / sum(scores.n_tokens)


def ablation_nll_increase(model: torch.nn.Module, indices: Sequence[torch.Tensor],
                          encodings: dict[str, Sequence[dict[str, list[int]]]], baseline: dict[str, float],
                          batch_size: int) -> dict[str, float]:
    """Per named set of encodings, how much its mean token NLL rises with the value vectors ``indices`` zeroed
    (masking.zeroed_values; the model is restored afterwards), over ``baseline``, the unablated model's."""
    with zeroed_values(model, indices):
        return {name: mean_token_nll(model, encs, batch_size, desc=f"ablated {name}") - baseline[name]
                for name, encs in encodings.items()}


def localization_check(model: torch.nn.Module, masks: dict[str, Sequence[torch.Tensor]],
                       forget: Sequence[dict[str, list[int]]], retain: Sequence[dict[str, list[int]]],
                       seeds: Sequence[int], batch_size: int) -> dict[str, Any]:
    """The localization sanity check of each mask: zeroing its value vectors should raise the forget set's mean
    token NLL more than the retain set's, and more than zeroing a random mask of the same size in every layer
    (masks.random_like) does, on average over ``seeds``.

    Returns {"baseline": {"forget", "retain"}, "masks": {name: {"forget", "retain": ΔNLL, "random": [{"seed",
    "forget", "retain"}], "random_forget_mean"/"_std", "random_retain_mean"/"_std", "forget_over_retain",
    "random_forget_over_retain", "forget_over_random", "localized"}}}; "localized" is the verdict (both
    inequalities hold)."""
    if not seeds:
        raise ValueError("localization_check needs at least one seed for the random masks")
    sets = {"forget": forget, "retain": retain}
    baseline = {name: mean_token_nll(model, encs, batch_size, desc=f"baseline {name}") for name, encs in sets.items()}
    d_ff = value_vector_shape(model)[1]
    results = {}
    for name, indices in masks.items():
        delta = ablation_nll_increase(model, indices, sets, baseline, batch_size)
        random = [{"seed": seed, **ablation_nll_increase(model, random_like(indices, d_ff, seed), sets, baseline,
                                                         batch_size)} for seed in seeds]
        stats = {f"random_{part}_{stat}": float(fn([r[part] for r in random]))
                 for part in sets for stat, fn in (("mean", np.mean), ("std", np.std))}
        results[name] = {
            **delta, "random": random, **stats,
            "forget_over_retain": _ratio(delta["forget"], delta["retain"]),
            # The same ratio for the random masks: above 1 when the forget set is just the more fragile one, so a
            # mask is more forget-specific than chance only when its own ratio exceeds this.
            "random_forget_over_retain": _ratio(stats["random_forget_mean"], stats["random_retain_mean"]),
            "forget_over_random": _ratio(delta["forget"], stats["random_forget_mean"]),
            "localized": bool(delta["forget"] > delta["retain"] and delta["forget"] > stats["random_forget_mean"]),
        }
    return {"baseline": baseline, "masks": results}


def _ratio(a: float, b: float) -> float:
    # A ratio of NLL increases; a zero or negative denominator has no meaningful ratio (the verdict still reads
    # the differences).
    return a / b if b > 0 else math.nan


def extraction_strengths(model: torch.nn.Module, encodings: Sequence[dict[str, list[int]]], batch_size: int,
                         convention: str = "paper") -> list[float]:
    """Per-sample extraction strength from one teacher-forced forward pass over question + answer."""
    return score_answers(model, encodings, batch_size, es_convention=convention, desc="extraction strength").es


def prompt_ids(encoding: dict[str, list[int]]) -> list[int]:
    """The prompt part of an encode_qa encoding: the tokens before the first answer label."""
    start = next((i for i, label in enumerate(encoding["labels"]) if label != IGNORE_INDEX), len(encoding["labels"]))
    return encoding["input_ids"][:start]


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any]) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS, the chat template's end-of-turn and the model's own.

    Llama-3.1 ends an assistant turn with <|eot_id|>, not its EOS <|end_of_text|>; stopping on EOS alone lets a
    greedy answer run on into template text. The end-of-turn is what training taught: encode_qa's last label.
    """
    end_of_turn = encode_qa(tokenizer, family, "?", "yes", max_length=1 << 30)["labels"][-1]  # never truncated
    model_eos = model.generation_config.eos_token_id
    model_eos = [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
    ids = [tokenizer.eos_token_id, end_of_turn, *model_eos]
    return sorted({i for i in ids if i is not None})


@torch.inference_mode()
def generate_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                     prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the prompts (token ids), left-padded and batched by prompt length, decoded."""
    device = _device(model)
    model.eval()
    # A fresh config, so a model's sampling defaults (temperature, top_p) never leak in. auto-compilation, which HF
    # would start for a static cache on GPUs, would recompile for every batch shape.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                              disable_compile=True, eos_token_id=stop_token_ids(model, tokenizer, family),
                              pad_token_id=tokenizer.pad_token_id)

    def run(idx: list[int]) -> list[str]:
        batch = pad_batch([{"input_ids": prompts[i]} for i in idx], tokenizer.pad_token_id, left=True)
        # A static KV cache, preallocated instead of grown every step (~30% faster on CPU), sized for this batch
        # alone: HF's own keeps the longest length of any earlier call on the model, so a near-tie in a greedy
        # answer could flip with what was generated before (another split, another checkpoint, another rank's share).
        cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + max_new_tokens)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             past_key_values=cache, generation_config=config)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return map_batches(length_batches([len(p) for p in prompts], batch_size), run, "generating")


def _encode(tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
            settings: EvalSettings, question: str, answer: str) -> dict[str, list[int]]:
    return encode_qa(tokenizer, family, question, answer, settings.max_length)


def mia_scores(mean_nll: Sequence[float], tokens: Sequence[TokenStats], answers: Sequence[str],
               k: float) -> dict[str, list[float]]:
    """Per-sample scores of the attacks that need only the model itself (all but the reference attack).

    As in open-unlearning, min-k% and min-k%++ rank the answer tokens without the final label token (the end-of-turn,
    which a chat model predicts whether or not it saw the answer; kept when it is the only one), while loss and zlib
    use the mean NLL over all label tokens, i.e. -log P(answer) of the TOFU probability.
    """
    body = [slice(0, max(1, len(t.logp) - 1)) for t in tokens]
    return {
        MIA_KEYS["loss"]: [float(x) for x in mean_nll],
        MIA_KEYS["zlib"]: M.zlib_score(mean_nll, answers).tolist(),
        MIA_KEYS["min_k"]: [M.min_k_score(t.logp[b], k) for t, b in zip(tokens, body)],
        MIA_KEYS["min_k_plus_plus"]: [M.min_k_plus_plus_score(t.logp[b], t.mu[b], t.var[b], k)
                                      for t, b in zip(tokens, body)],
    }


def _score_variants(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                    rows: Sequence[dict], keys: Sequence[str], settings: EvalSettings,
                    with_es: bool, desc: str, with_mia: bool = False
                    ) -> tuple[list[list[float]], list[float] | None, dict[str, list[float]] | None]:
    """P(answer variant) for every variant of every row, in one pool of length-grouped batches.

    keys name the fields holding one answer (str) or several (list); returns, per row, the probabilities in key
    order (lists flattened), and the ES and the MIA scores of each row's first variant when with_es / with_mia.
    """
    encodings, starts = [], []
    for row in rows:
        starts.append(len(encodings))
        for key in keys:
            for text in ([row[key]] if isinstance(row[key], str) else row[key]):
                encodings.append(_encode(tokenizer, family, settings, row["question"], text))
    scores = score_answers(model, encodings, settings.batch_size, settings.es_convention if with_es else None, desc,
                           token_stats=starts if with_mia else ())
    p = M.answer_prob(scores.mean_nll).tolist()
    probs = [p[a:b] for a, b in zip(starts, [*starts[1:], len(p)])]
    es = [scores.es[j] for j in starts] if with_es else None
    mia = None
    if with_mia:
        mia = mia_scores([scores.mean_nll[j] for j in starts], [scores.tokens[j] for j in starts],
                         [row[keys[0]] for row in rows], settings.mia_k)
    return probs, es, mia


def score_perturbed_split(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                          rows: Sequence[dict], settings: EvalSettings, kind: str,
                          with_es: bool = False, with_mia: bool = False) -> dict[str, list]:
    """Teacher-forced metrics of a forget or retain split (rows with answer, paraphrased_answer, perturbed_answer).

    kind: "forget" scores the truth ratio r as min(r, 1/r), "retain" as max(0, 1 - r). with_mia: the answers' MIA
    scores too (mia_scores), from the same forward passes.
    """
    keys = ("answer", "paraphrased_answer", "perturbed_answer")
    probs, es, mia = _score_variants(model, tokenizer, family, rows, keys, settings, with_es, f"scoring {kind}",
                                     with_mia)
    p_answer = [p[0] for p in probs]
    p_para = [p[1] for p in probs]
    p_pert = [p[2:] for p in probs]
    # Rows may hold different numbers of perturbed answers, so the ratio is taken row by row.
    ratio = [float(M.truth_ratio([a], [b])[0]) for a, b in zip(p_para, p_pert)]
    out = {
        "question": [row["question"] for row in rows],
        "prob": p_answer,
        "paraphrased_prob": p_para,
        "perturbed_prob": p_pert,
        "truth_ratio": ratio,
        "truth_ratio_score": [float(s) for s in M.truth_ratio_score(ratio, kind)],
    }
    if with_es:
        out["es"] = es
    if with_mia:
        out.update(mia)
    return out


def score_factual_split(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                        rows: Sequence[dict], settings: EvalSettings, desc: str = "scoring") -> dict[str, list]:
    """Teacher-forced metrics of real authors / world facts (rows with answer and perturbed_answer).

    Probability is P(answer) normalised over the answer and its perturbations; with no paraphrase, the truth
    ratio compares the perturbed answers with the answer itself and scores max(0, 1 - r).
    """
    probs, _, _ = _score_variants(model, tokenizer, family, rows, ("answer", "perturbed_answer"), settings, False,
                                  desc)
    p_answer = [p[0] for p in probs]
    p_pert = [p[1:] for p in probs]
    ratio = [float(M.truth_ratio([a], [b])[0]) for a, b in zip(p_answer, p_pert)]
    return {
        "question": [row["question"] for row in rows],
        "prob": [float(M.normalized_true_prob([a], [b])[0]) for a, b in zip(p_answer, p_pert)],
        "answer_prob": p_answer,
        "perturbed_prob": p_pert,
        "truth_ratio": ratio,
        "truth_ratio_score": [float(s) for s in M.truth_ratio_score(ratio, "retain")],
    }


def evaluate_split(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                   split: str, rows: Sequence[dict], settings: EvalSettings, with_es: bool = False,
                   with_mia: bool = False) -> dict[str, list]:
    """All per-sample TOFU metrics of one split (see SPLITS): probabilities, truth ratio, greedy generation, ROUGE-L
    recall against the answer, and (forget/retain only) extraction strength and MIA scores when asked."""
    if split in FACTUAL_SPLITS:
        if with_es or with_mia:
            raise ValueError(f"ES and MIA scores are computed on the forget and retain splits, not {split}")
        out = score_factual_split(model, tokenizer, family, rows, settings, f"scoring {split}")
    elif split in ("forget", "retain"):
        out = score_perturbed_split(model, tokenizer, family, rows, settings, split, with_es, with_mia)
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    prompts = [prompt_ids(_encode(tokenizer, family, settings, row["question"], row["answer"])) for row in rows]
    out["generation"] = generate_answers(model, tokenizer, family, prompts, settings.generation_batch_size,
                                         settings.max_new_tokens)
    out["rouge_l_recall"] = [float(s) for s in M.rouge_l_recall(out["generation"], [row["answer"] for row in rows])]
    return out


def evaluate_es(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                rows: Sequence[dict], settings: EvalSettings) -> dict[str, list]:
    """Extraction strength of (question, answer) rows, for a retain evaluation split other than retain_perturbed."""
    encodings = [_encode(tokenizer, family, settings, row["question"], row["answer"]) for row in rows]
    return {"question": [row["question"] for row in rows],
            "es": extraction_strengths(model, encodings, settings.batch_size, settings.es_convention)}


def evaluate_holdout(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                     rows: Sequence[dict], settings: EvalSettings) -> dict[str, list]:
    """MIA scores of (question, answer) rows the model never saw: the negatives' counterpart of the forget split's."""
    encodings = [_encode(tokenizer, family, settings, row["question"], row["answer"]) for row in rows]
    scores = score_answers(model, encodings, settings.batch_size, desc=f"scoring {HOLDOUT}",
                           token_stats=range(len(rows)))
    return {"question": [row["question"] for row in rows],
            **mia_scores(scores.mean_nll, [scores.tokens[i] for i in range(len(rows))],
                         [row["answer"] for row in rows], settings.mia_k)}


def reference_attack(reference: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                     data: dict[str, Sequence[dict]], per_sample: dict[str, dict[str, list]],
                     settings: EvalSettings) -> dict[str, list[float]]:
    """Reference attack scores of the forget and holdout answers: the evaluated model's mean answer NLL (its loss
    attack score, from per_sample) minus the reference model's, which is scored here in one pool of both splits."""
    splits = ("forget", HOLDOUT)
    encodings = [_encode(tokenizer, family, settings, row["question"], row["answer"])
                 for split in splits for row in data[split]]
    ref_nll = score_answers(reference, encodings, settings.batch_size, desc="scoring the reference model").mean_nll
    out, start = {}, 0
    for split in splits:
        end = start + len(data[split])
        out[split] = M.reference_score(per_sample[split][MIA_KEYS["loss"]], ref_nll[start:end]).tolist()
        start = end
    return out


def run_evaluation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, family: dict[str, Any],
                   data: dict[str, Sequence[dict]],
                   settings: EvalSettings) -> tuple[dict[str, dict[str, list]], dict[str, dict[str, float]]]:
    """Evaluate every split in `data` (keys from SPLITS, plus RETAIN_ES for a separate Retain Strength split and
    HOLDOUT for membership inference).

    ES comes with the forget split, and with the retain split unless RETAIN_ES is given; MIA scores with the forget
    split when HOLDOUT is given. Returns the per-sample values per split and the timing (seconds, samples,
    samples/s) per split.
    """
    per_sample: dict[str, dict[str, list]] = {}
    timing: dict[str, dict[str, float]] = {}
    for split, rows in data.items():
        start = time.perf_counter()
        if split == RETAIN_ES:
            per_sample[split] = evaluate_es(model, tokenizer, family, rows, settings)
        elif split == HOLDOUT:
            per_sample[split] = evaluate_holdout(model, tokenizer, family, rows, settings)
        else:
            with_es = split == "forget" or (split == "retain" and RETAIN_ES not in data)
            with_mia = split == "forget" and HOLDOUT in data
            per_sample[split] = evaluate_split(model, tokenizer, family, split, rows, settings, with_es, with_mia)
        seconds = time.perf_counter() - start
        timing[split] = {"seconds": seconds, "samples": len(rows), "samples_per_s": len(rows) / seconds}
        log.info("evaluated %s: %d samples in %.1f s (%.1f samples/s)", split, len(rows), seconds, len(rows) / seconds)
    return per_sample, timing


SUMMARY_KEYS = (
    "forget_quality", "log10_forget_quality", "model_utility", "forget_strength", "retain_strength",
    "forget_prob", "forget_rouge", "forget_truth_ratio", "retain_prob", "retain_rouge", "retain_truth_ratio",
    "ra_prob", "ra_rouge", "ra_truth_ratio", "wf_prob", "wf_rouge", "wf_truth_ratio",
    "privleak", *(f"{key}_auc" for key in MIA_KEYS.values()),
)
_PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def mia_aucs(per_sample: dict[str, dict[str, list]]) -> dict[str, float]:
    """AUC of every attack scored on both the forget and the holdout split, keyed by attack."""
    if "forget" not in per_sample or HOLDOUT not in per_sample:
        return {}
    forget, holdout = per_sample["forget"], per_sample[HOLDOUT]
    return {attack: M.mia_auc(forget[key], holdout[key]) for attack, key in MIA_KEYS.items()
            if key in forget and key in holdout}


def summarize(per_sample: dict[str, dict[str, list]], retain_truth_ratios: Sequence[float] | None = None,
              retain_auc: float | None = None) -> dict[str, float | None]:
    """The split-level numbers (means of the per-sample values) and the aggregates; None where an input is missing.

    retain_truth_ratios: the retain model's raw forget-split truth ratios, for forget quality; retain_auc: its
    metrics.PRIVLEAK_ATTACK AUC, for privleak.
    """
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY_KEYS)
    for split, prefix in _PREFIX.items():
        if split in per_sample:
            values = per_sample[split]
            summary[f"{prefix}_prob"] = float(np.mean(values["prob"]))
            summary[f"{prefix}_rouge"] = float(np.mean(values["rouge_l_recall"]))
            summary[f"{prefix}_truth_ratio"] = float(np.mean(values["truth_ratio_score"]))
    utility = [summary[f"{p}_{m}"] for p in ("retain", "ra", "wf") for m in ("prob", "rouge", "truth_ratio")]
    if all(v is not None for v in utility):
        summary["model_utility"] = M.model_utility(utility)
    if "forget" in per_sample:
        summary["forget_strength"] = M.forget_strength(per_sample["forget"]["es"])
        if retain_truth_ratios is not None:
            fq = M.forget_quality(per_sample["forget"]["truth_ratio"], retain_truth_ratios)
            summary["forget_quality"] = fq
            summary["log10_forget_quality"] = float(np.log10(fq)) if fq > 0 else float("-inf")
    es_retain = per_sample.get(RETAIN_ES, per_sample.get("retain", {})).get("es")
    if es_retain is not None:
        summary["retain_strength"] = M.retain_strength(es_retain)
    aucs = mia_aucs(per_sample)
    for attack, auc in aucs.items():
        summary[f"{MIA_KEYS[attack]}_auc"] = auc
    if retain_auc is not None and M.PRIVLEAK_ATTACK in aucs:
        summary["privleak"] = M.privleak(aucs[M.PRIVLEAK_ATTACK], retain_auc)
    return summary
