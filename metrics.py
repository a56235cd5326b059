"""Evaluation metrics: TOFU (probability, ROUGE-L, truth ratio, forget quality, model utility), extraction strength,
membership inference (MIA attack scores, AUC, privleak) and the trade-off aggregates of a run (AUES, MU95, seed
comparisons). Pure functions; definitions in docs/metrics.md."""
from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from nltk.stem import porter
from numpy.typing import ArrayLike
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize
from rouge_score import tokenizers as rouge_tokenizers
from scipy.stats import hmean, ks_2samp, mannwhitneyu

ES_CONVENTIONS = ("paper", "open_unlearning")
TRUTH_RATIO_KINDS = ("forget", "retain")
MODEL_UTILITY_COMPONENTS = 9
# 2**20 sign assignments is ~1M rows; beyond that an exact test stops being cheap.
MAX_PERMUTATION_SEEDS = 20
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")
# privleak compares min-k% AUCs, as open-unlearning's and MUSE's privleak do.
PRIVLEAK_ATTACK = "min_k"
# A (near-)deterministic next-token distribution has variance ~0: Min-K%++ clamps it here (as open-unlearning does)
# rather than divide by zero.
MIN_K_PP_MIN_VAR = 1e-6


class _MemoStemmer:
    """nltk's Porter stemmer, memoised: stemming dominates ROUGE on long generations, whose words repeat."""

    def __init__(self) -> None:
        self.stem = functools.lru_cache(maxsize=1 << 18)(porter.PorterStemmer().stem)


class _StemmingTokenizer(rouge_tokenizers.Tokenizer):
    """rouge_score's DefaultTokenizer(use_stemmer=True), with the memoised stemmer: identical tokens."""

    def __init__(self) -> None:
        self._stemmer = _MemoStemmer()

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokenize.tokenize(text, self._stemmer)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_StemmingTokenizer())


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def answer_prob(mean_nll: ArrayLike) -> np.ndarray:
    """Length-normalised answer probability P(y|x) = exp(-mean token NLL over the answer tokens), per sample."""
    return np.exp(-np.asarray(mean_nll, dtype=float))


def normalized_true_prob(p_true: ArrayLike, p_wrong: ArrayLike) -> np.ndarray:
    """P(true) / (P(true) + sum_j P(wrong_j)) per sample; p_true has shape (n,), p_wrong (n, k)."""
    p_true = _as_1d(p_true, "p_true")
    p_wrong = np.asarray(p_wrong, dtype=float)
    if p_wrong.ndim != 2 or p_wrong.shape[0] != p_true.shape[0]:
        raise ValueError(f"p_wrong must have shape ({p_true.shape[0]}, k), got {p_wrong.shape}")
    return p_true / (p_true + p_wrong.sum(axis=1))


def truth_ratio(p_paraphrased: ArrayLike, p_perturbed: ArrayLike) -> np.ndarray:
    """Truth ratio r = geometric mean_j P(perturbed_j) / P(paraphrased), per sample.

    p_paraphrased has shape (n,), p_perturbed (n, k). A zero probability gives the limit (0 or inf) rather than an
    error.
    """
    p_para = _as_1d(p_paraphrased, "p_paraphrased")
    p_pert = np.asarray(p_perturbed, dtype=float)
    if p_pert.ndim != 2 or p_pert.shape[0] != p_para.shape[0] or p_pert.shape[1] == 0:
        raise ValueError(f"p_perturbed must have shape ({p_para.shape[0]}, k>0), got {p_pert.shape}")
    # Products of k small probabilities underflow; the mean of logs does not.
    with np.errstate(divide="ignore"):
        return np.exp(np.log(p_pert).mean(axis=1) - np.log(p_para))


def truth_ratio_score(r: ArrayLike, kind: str) -> np.ndarray:
    """Per-sample truth-ratio score: min(r, 1/r) for kind="forget"; max(0, 1 - r) for kind="retain" (retain, real
    authors, world facts). The split's Truth Ratio is the mean of these."""
    r = np.asarray(r, dtype=float)
    if kind == "forget":
        with np.errstate(divide="ignore"):
            return np.minimum(r, 1.0 / r)
    if kind == "retain":
        return np.maximum(0.0, 1.0 - r)
    raise ValueError(f"kind must be one of {TRUTH_RATIO_KINDS}, got {kind!r}")


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-sample ROUGE-L recall (LCS length / reference length, Porter-stemmed tokens) of each prediction."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return np.array([_ROUGE.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)],
                    dtype=float)


def forget_quality(truth_ratios_model: ArrayLike, truth_ratios_retain_model: ArrayLike | None) -> float | None:
    """Forget quality: p-value of the two-sample KS test between the forget split's per-sample truth ratios r of the
    evaluated model and of the retain model. None when there is no retain-model result. log10 FQ is np.log10(p)."""
    if truth_ratios_retain_model is None:
        return None
    model = _as_1d(truth_ratios_model, "truth_ratios_model")
    retain = _as_1d(truth_ratios_retain_model, "truth_ratios_retain_model")
    if model.size == 0 or retain.size == 0:
        raise ValueError("forget quality needs at least one truth ratio from each model")
    return float(ks_2samp(model, retain).pvalue)


def model_utility(components: Mapping[str, float] | Sequence[float]) -> float:
    """Model utility: harmonic mean of the nine {retain, real authors, world facts} x {probability, ROUGE-L recall,
    truth ratio} numbers; 0 when any of them is 0."""
    values = np.asarray(list(components.values()) if isinstance(components, Mapping) else components, dtype=float)
    if values.shape != (MODEL_UTILITY_COMPONENTS,):
        raise ValueError(f"model utility needs {MODEL_UTILITY_COMPONENTS} components, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"model utility components must be finite and >= 0, got {values.tolist()}")
    return float(hmean(values))


def extraction_strength_batch(correct: ArrayLike, mask: ArrayLike, convention: str = "paper") -> np.ndarray:
    """Per-row extraction strength from teacher-forced greedy correctness.

    correct[b, t]: the argmax prediction for label position t equals the label; mask[b, t]: t is an answer token.
    Only masked positions count, in order. Rows with no answer token give NaN (open_unlearning: a row whose only
    answer token is the final one gives 0, as there).
    """
    if convention not in ES_CONVENTIONS:
        raise ValueError(f"convention must be one of {ES_CONVENTIONS}, got {convention!r}")
    correct = np.asarray(correct, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if correct.ndim != 2 or correct.shape != mask.shape:
        raise ValueError(f"correct and mask must be 2-D of one shape, got {correct.shape} and {mask.shape}")
    has_answer = mask.any(axis=1)
    if convention == "open_unlearning":
        # open-unlearning scores the label tokens without the last one (the end-of-turn token).
        mask = mask & (np.cumsum(mask, axis=1) < mask.sum(axis=1, keepdims=True))
    n = mask.sum(axis=1)
    # Greedy decoding from a prefix reproduces the rest iff every later teacher-forced prediction is right, so the
    # shortest sufficient prefix ends at the last wrong answer token: k = its 1-based rank among answer tokens
    # (0 if none).
    rank = np.cumsum(mask, axis=1)
    k = np.where(mask & ~correct, rank, 0).max(axis=1, initial=0)
    if convention == "open_unlearning":
        # It also tries prefixes 0..n-1 only, so a wrong final token leaves k = n-1; an answer of one label token
        # (nothing left) scores 0 there.
        k = np.minimum(k, n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, 1.0 - k / n, np.where(has_answer, 0.0, np.nan))


def extraction_strength(correct: ArrayLike, convention: str = "paper") -> float:
    """Extraction strength ES = 1 - k/n of one answer; correct[j] says whether the greedy next token after the
    question and y[:j] is y[j]. convention: "paper" (Wang et al. 2025) or "open_unlearning" (the final token, the
    end-of-turn, left out of the answer, and 1/n, not 0, when the last token left is wrong)."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array, got shape {correct.shape}")
    return float(extraction_strength_batch(correct[None], np.ones((1, correct.size), dtype=bool), convention)[0])


def _checked_es(es: ArrayLike, name: str) -> np.ndarray:
    es = _as_1d(es, name)
    if es.size == 0 or np.isnan(es).any():
        raise ValueError(f"{name} must be non-empty and free of NaN (drop samples without answer tokens)")
    return es


def forget_strength(es_forget: ArrayLike) -> float:
    """Forget Strength FS = 1 - mean ES over the forget split."""
    return float(1.0 - _checked_es(es_forget, "es_forget").mean())


def retain_strength(es_retain: ArrayLike) -> float:
    """Retain Strength RS = mean ES over the retain evaluation split."""
    return float(_checked_es(es_retain, "es_retain").mean())


def aues(rs: ArrayLike, fs: ArrayLike, method: str = "front") -> float:
    """Area under the extraction-strength trade-off of a trajectory (theta_o then checkpoints), RS and FS clipped to
    [0, 1].

    method="front": integral over r in [0, 1] of F(r) = the highest FS among models with RS >= r (0 where none).
    method="trapezoid": area under the piecewise-linear curve through the points sorted by RS (equal RS merged, keeping
    the highest FS), extended flat from RS=0 to the leftmost point. Both give RS*FS for theta_o alone.
    """
    rs = np.clip(_as_1d(rs, "rs"), 0.0, 1.0)
    fs = np.clip(_as_1d(fs, "fs"), 0.0, 1.0)
    if rs.shape != fs.shape or rs.size == 0:
        raise ValueError(f"rs and fs must be non-empty and of one length, got {rs.shape} and {fs.shape}")
    if np.isnan(rs).any() or np.isnan(fs).any():
        raise ValueError("rs and fs must not contain NaN")
    if method == "front":
        order = np.argsort(-rs, kind="stable")
        rs_desc, best_fs = rs[order], np.maximum.accumulate(fs[order])
        widths = rs_desc - np.append(rs_desc[1:], 0.0)
        return float(np.sum(widths * best_fs))
    if method == "trapezoid":
        xs = np.unique(rs)
        ys = np.array([fs[rs == x].max() for x in xs])
        return float(xs[0] * ys[0] + np.trapezoid(ys, xs))
    raise ValueError(f"method must be 'front' or 'trapezoid', got {method!r}")


def mu95(
    mu: ArrayLike, log10_fq: Sequence[float | None] | np.ndarray, theta_o_index: int = 0, threshold: float = 0.95
) -> float:
    """Highest log10 FQ among the trajectory's models whose MU >= threshold * MU(theta_o); theta_o always qualifies."""
    mu = _as_1d(mu, "mu")
    fq = np.array([np.nan if v is None else v for v in log10_fq], dtype=float)
    if fq.shape != mu.shape:
        raise ValueError(f"mu and log10_fq must be of one length, got {mu.shape} and {fq.shape}")
    if np.isnan(mu).any():
        raise ValueError("mu must not contain NaN")
    if np.isnan(fq).any():
        raise ValueError("MU95 needs forget quality for every model, but some are missing (no retain-model result?)")
    qualifies = mu >= threshold * mu[theta_o_index]
    qualifies[theta_o_index] = True
    return float(fq[qualifies].max())


def paired_permutation_test(a: ArrayLike, b: ArrayLike) -> float:
    """Exact two-sided paired permutation test over seeds: p = fraction of the 2^n sign flips of d_i = a_i - b_i
    whose |mean| is >= the observed |mean d| (float ties within 1e-9 relative count as equal)."""
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty and of one length, got {a.shape} and {b.shape}")
    n = a.size
    if n > MAX_PERMUTATION_SEEDS:
        raise ValueError(f"exact test over 2^{n} assignments is too large (max n={MAX_PERMUTATION_SEEDS})")
    d = a - b
    signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    stats = np.abs(signs @ d) / n
    observed = abs(d.mean())
    extreme = (stats > observed) | np.isclose(stats, observed, rtol=1e-9, atol=1e-12)
    return float(extreme.mean())


def compare_groups(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Seed-paired comparison of two groups: mean and std (ddof=1; 0 for one seed) of each, |delta| = mean over seeds
    of |a_i - b_i| with its std, and the paired permutation p-value."""
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    p = paired_permutation_test(a, b)

    def std(x: np.ndarray) -> float:
        return float(x.std(ddof=1)) if x.size > 1 else 0.0

    abs_delta = np.abs(a - b)
    return {
        "n": a.size,
        "mean_a": float(a.mean()),
        "std_a": std(a),
        "mean_b": float(b.mean()),
        "std_b": std(b),
        "abs_delta_mean": float(abs_delta.mean()),
        "abs_delta_std": std(abs_delta),
        "p_value": p,
    }


# ---- Membership inference (forget vs holdout) and privacy leakage ----

def zlib_length(texts: Sequence[str]) -> np.ndarray:
    """Bytes of each text's UTF-8 encoding after zlib compression (default level): Carlini et al.'s entropy proxy."""
    return np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=float)


def zlib_score(mean_nll: ArrayLike, texts: Sequence[str]) -> np.ndarray:
    """zlib attack score per sample: mean answer NLL / zlib_length(answer text)."""
    mean_nll = _as_1d(mean_nll, "mean_nll")
    if mean_nll.size != len(texts):
        raise ValueError(f"{mean_nll.size} NLLs but {len(texts)} texts")
    return mean_nll / zlib_length(texts)


def _lowest_mean(values: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"token values must be a non-empty 1-D array, got shape {values.shape}")
    # int() truncates like the reference implementations; at least one token always counts.
    n = max(1, int(values.size * k))
    return float(np.sort(values)[:n].mean())


def min_k_score(token_logp: ArrayLike, k: float = 0.4) -> float:
    """Min-K% Prob attack score of one answer: minus the mean of its lowest max(1, int(n k)) token log-probs."""
    return -_lowest_mean(np.asarray(token_logp, dtype=float), k)


def min_k_plus_plus_score(token_logp: ArrayLike, mu: ArrayLike, var: ArrayLike, k: float = 0.4) -> float:
    """Min-K%++ attack score of one answer: each token log-prob standardised by the mean mu and variance var of the
    log-prob under the next-token distribution at its position, z = (log p - mu) / sqrt(max(var, 1e-6)); minus the
    mean of the lowest max(1, int(n k)) z."""
    logp, mu, var = (np.asarray(x, dtype=float) for x in (token_logp, mu, var))
    if not logp.shape == mu.shape == var.shape:
        raise ValueError(f"token_logp, mu and var must have one shape, got {logp.shape}, {mu.shape}, {var.shape}")
    return -_lowest_mean((logp - mu) / np.sqrt(np.maximum(var, MIN_K_PP_MIN_VAR)), k)


def reference_score(mean_nll: ArrayLike, reference_mean_nll: ArrayLike) -> np.ndarray:
    """Reference attack score per sample: the model's mean answer NLL minus the reference model's."""
    model, reference = _as_1d(mean_nll, "mean_nll"), _as_1d(reference_mean_nll, "reference_mean_nll")
    if model.shape != reference.shape:
        raise ValueError(f"mean_nll and reference_mean_nll differ in shape: {model.shape} vs {reference.shape}")
    return model - reference


def mia_auc(forget_scores: ArrayLike, holdout_scores: ArrayLike) -> float:
    """ROC AUC of telling holdout (positive) from forget (negative) samples by attack score, where a higher score means
    less member-like: P(holdout score > forget score) + P(equal) / 2 over all pairs. 1: forget fully exposed."""
    forget, holdout = _as_1d(forget_scores, "forget_scores"), _as_1d(holdout_scores, "holdout_scores")
    if forget.size == 0 or holdout.size == 0:
        raise ValueError("MIA AUC needs at least one forget and one holdout score")
    if not (np.all(np.isfinite(forget)) and np.all(np.isfinite(holdout))):
        raise ValueError("MIA scores must be finite")
    # Mann-Whitney U of the holdout sample counts the pairs it wins, ties as 1/2: exactly the AUC's pairwise form.
    return float(mannwhitneyu(holdout, forget, method="asymptotic").statistic / (holdout.size * forget.size))


def privleak(auc: float, auc_retain: float) -> float:
    """Privacy leakage (MUSE): (AUC_retain - AUC) / (1 - AUC_retain) x 100, AUC of the model and of the retain model
    from mia_auc. 0: as private as the retain model; negative: the forget set is more exposed than that."""
    if not (0.0 <= auc <= 1.0 and 0.0 <= auc_retain < 1.0):
        raise ValueError(f"privleak needs AUC in [0, 1] and a retain AUC in [0, 1), got {auc} and {auc_retain}")
    return (auc_retain - auc) / (1.0 - auc_retain) * 100.0
