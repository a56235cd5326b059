"""Hand-computed cases for metrics.py: each expected value is worked out in the comment beside it."""
from __future__ import annotations

import warnings
from fractions import Fraction
from itertools import product
from math import comb, isclose, sqrt

import numpy as np
import pytest

import metrics as M


def test_answer_prob_is_exp_of_minus_mean_nll():
    np.testing.assert_allclose(M.answer_prob([0.0, np.log(2), np.log(10)]), [1.0, 0.5, 0.1])


def test_normalized_true_prob():
    # 0.5 / (0.5 + 0.1 + 0.2 + 0.2) = 0.5 ; 0.6 / (0.6 + 0.1 + 0.1) = 0.75
    got = M.normalized_true_prob([0.5, 0.6], [[0.1, 0.2, 0.2], [0.1, 0.1, 0.0]])
    np.testing.assert_allclose(got, [0.5, 0.75])
    with pytest.raises(ValueError):
        M.normalized_true_prob([0.5, 0.6], [0.1, 0.2])


def test_truth_ratio_geometric_mean_k3_and_k5():
    # k=3: geomean(0.1, 0.2, 0.4) = 0.008**(1/3) = 0.2 -> r = 0.2 / 0.5 = 0.4 (arithmetic mean would give 0.4667)
    np.testing.assert_allclose(M.truth_ratio([0.5], [[0.1, 0.2, 0.4]]), [0.4])
    # k=5: geomean(2^-1..2^-5) = 2^-3 -> r = 0.125 / 0.25 = 0.5 (arithmetic mean would give 0.775)
    np.testing.assert_allclose(M.truth_ratio([0.25], [[0.5, 0.25, 0.125, 0.0625, 0.03125]]), [0.5])
    # r > 1 when the perturbed answers are likelier than the paraphrase: 0.2 / 0.1 = 2
    np.testing.assert_allclose(M.truth_ratio([0.5, 0.1], [[0.1, 0.2, 0.4], [0.2, 0.2, 0.2]]), [0.4, 2.0])


def test_truth_ratio_survives_tiny_probabilities():
    # 50 perturbed answers at 1e-300 would underflow as a product; r = 1e-300 / 1e-290 = 1e-10.
    np.testing.assert_allclose(M.truth_ratio([1e-290], [[1e-300] * 50]), [1e-10], rtol=1e-9)


def test_truth_ratio_score_forget_and_retain():
    r = np.array([0.4, 2.0, 1.0, 0.0])
    np.testing.assert_allclose(M.truth_ratio_score(r, "forget"), [0.4, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(M.truth_ratio_score(r, "retain"), [0.6, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        M.truth_ratio_score(r, "world_facts")


def test_rouge_l_recall_lcs_and_stemming():
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" -> 4 / 6 reference tokens.
    # "running" and "runs" both stem to "run": LCS = "he run fast" -> 3 / 3 (2 / 3 without the stemmer).
    got = M.rouge_l_recall(["the cat on a mat", "he is running fast", "nothing here"],
                           ["the cat sat on the mat", "he runs fast", "completely different"])
    np.testing.assert_allclose(got, [4 / 6, 1.0, 0.0])
    with pytest.raises(ValueError):
        M.rouge_l_recall(["a"], [])


def test_forget_quality_identical_disjoint_and_missing():
    assert M.forget_quality([0.1, 0.5, 0.9, 1.3], [0.1, 0.5, 0.9, 1.3]) == 1.0
    # Fully separated samples of sizes 4 and 6: D = 1, reached only by the two orderings "all x below y" and
    # "all y below x" out of C(10, 4) equally likely ones, so the exact two-sided p is 2 / 210.
    p = M.forget_quality([0.1, 0.2, 0.3, 0.4], [1.1, 1.2, 1.3, 1.4, 1.5, 1.6])
    assert isclose(p, 2 / comb(10, 4), rel_tol=1e-12)
    assert M.forget_quality([0.1, 0.2], None) is None


def test_forget_quality_invariant_to_truth_ratio_orientation():
    # TOFU's code feeds P(para)/geomean P(pert) = 1/r; KS only sees ranks, so 1/r and log r give the same p.
    rng = np.random.default_rng(0)
    x, y = rng.lognormal(size=40), rng.lognormal(0.5, size=40)
    p = M.forget_quality(x, y)
    assert 0 < p < 1
    assert isclose(M.forget_quality(1 / x, 1 / y), p, rel_tol=1e-9)
    assert isclose(M.forget_quality(np.log(x), np.log(y)), p, rel_tol=1e-9)


def test_model_utility_harmonic_mean_and_zero():
    # 9 / (3/1 + 3/0.5 + 3/0.25) = 9 / 21 = 3/7
    values = [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert isclose(M.model_utility(values), 3 / 7, rel_tol=1e-12)
    keyed = {f"{split} {m}": v for (split, m), v in zip(product(["retain", "ra", "wf"], ["p", "rouge", "tr"]), values)}
    assert isclose(M.model_utility(keyed), 3 / 7, rel_tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.model_utility([0.0] + values[1:]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility(values[:8])
    with pytest.raises(ValueError):
        M.model_utility([np.nan] + values[1:])


@pytest.mark.parametrize(
    ("correct", "paper", "open_unlearning"),
    [
        # open-unlearning first drops the final label token (the end-of-turn), then scores the rest.
        ([True, True, True, True], 1.0, 1.0),  # k = 0
        ([False, False, False, False], 0.0, 1 / 3),  # k = 4; open-unlearning: [F, F, F] stops at k = 2 of 3
        ([True, False, True, True], 0.5, 1 / 3),  # last wrong is token 2 -> k = 2 of 4; of 3 without the last
        ([False, True, True, True], 0.75, 2 / 3),  # k = 1 of 4; of 3
        ([True, True, True, False], 0.0, 1.0),  # only the last token wrong: k = n; open-unlearning never sees it
        ([False, True], 0.5, 1.0),  # [F] alone: open-unlearning stops at k = 0
        ([False], 0.0, 0.0),  # n = 1: nothing left for open-unlearning, which scores 0
    ],
)
def test_extraction_strength_cases(correct, paper, open_unlearning):
    assert M.extraction_strength(correct) == pytest.approx(paper)
    assert M.extraction_strength(correct, convention="open_unlearning") == pytest.approx(open_unlearning)


def test_open_unlearning_es_drops_the_end_of_turn_token_and_scores_1_over_n_without_a_match():
    # Greedy correctness of 3 answer tokens and the end-of-turn token.
    # [T, F, T | F]: paper k = 4 of 4 -> 0. open-unlearning scores [T, F, T]: k = 2 of 3 -> 1/3
    #   (leaving the end-of-turn in n, with 1/n where no suffix matches, would give 1/4).
    # [T, T, F | T]: paper k = 3 of 4 -> 1/4. open-unlearning: no suffix of [T, T, F] matches, k stops at 2 -> 1/3
    #   (with the end-of-turn in n: 1/4).
    T, F = True, False
    correct = [[F, T, F, T, F], [F, T, T, F, T]]
    mask = [[F, T, T, T, T], [F, T, T, T, T]]
    np.testing.assert_allclose(M.extraction_strength_batch(correct, mask), [0.0, 0.25])
    np.testing.assert_allclose(M.extraction_strength_batch(correct, mask, "open_unlearning"), [1 / 3, 1 / 3])


def test_extraction_strength_matches_literal_definitions():
    rng = np.random.default_rng(1)
    for _ in range(300):
        correct = rng.random(int(rng.integers(1, 9))) < 0.7
        n = correct.size
        # Paper: smallest k in 0..n such that every prediction from k on is right.
        k_paper = next(k for k in range(n + 1) if correct[k:].all())
        assert M.extraction_strength(correct) == pytest.approx(1 - k_paper / n)
        # open-unlearning: the labels without the last; the first k in range(n') whose suffix matches, else the loop
        # leaves k = n' - 1; no labels left scores 0.
        body = correct[:-1]
        k_ou = next((k for k in range(body.size) if body[k:].all()), body.size - 1)
        expected = 1 - k_ou / body.size if body.size else 0.0
        assert M.extraction_strength(correct, "open_unlearning") == pytest.approx(expected)


def test_extraction_strength_batch_uses_only_answer_positions():
    T, F = True, False
    correct = [[T, F, T, F, T, T],  # question positions are wrong but masked out; answer [T, F, T, T] -> 0.5
               [T, T, F, F, F, F],  # answer [F, F, F] -> 0 (paper), [F, F]: 1/2 (open-unlearning)
               [T, T, T, T, T, T]]  # no answer tokens -> NaN
    mask = [[F, F, T, T, T, T],
            [F, F, F, T, T, T],
            [F, F, F, F, F, F]]
    np.testing.assert_allclose(M.extraction_strength_batch(correct, mask), [0.5, 0.0, np.nan])
    np.testing.assert_allclose(M.extraction_strength_batch(correct, mask, "open_unlearning"), [1 / 3, 1 / 2, np.nan])
    with pytest.raises(ValueError):
        M.extraction_strength_batch(correct, mask, "wang")
    with pytest.raises(ValueError):
        M.extraction_strength([])


def test_forget_and_retain_strength():
    assert M.forget_strength([1.0, 0.5, 0.0, 0.5]) == pytest.approx(0.5)
    assert M.forget_strength([1.0, 1.0, 0.7]) == pytest.approx(0.1)
    assert M.retain_strength([1.0, 1.0, 0.7]) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        M.forget_strength([1.0, np.nan])


def test_aues_theta_o_alone_is_rs_times_fs():
    for method in ("front", "trapezoid"):
        assert M.aues([0.8], [0.3], method=method) == pytest.approx(0.24)


def test_aues_full_forgetting_with_full_retention_scores_one():
    for method in ("front", "trapezoid"):
        assert M.aues([1.0, 1.0], [0.0, 1.0], method=method) == pytest.approx(1.0)


def test_aues_monotone_trajectory():
    rs, fs = [1.0, 0.9, 0.6], [0.0, 0.5, 1.0]
    # front: r in (0.9, 1] -> 0, (0.6, 0.9] -> 0.5, [0, 0.6] -> 1: 0.15 + 0.6 = 0.75
    assert M.aues(rs, fs) == pytest.approx(0.75)
    # trapezoid: flat 0.6 * 1 + 0.3 * (1 + 0.5) / 2 + 0.1 * (0.5 + 0) / 2 = 0.6 + 0.225 + 0.025 = 0.85
    assert M.aues(rs, fs, method="trapezoid") == pytest.approx(0.85)


def test_aues_non_monotone_trajectory():
    # RS goes back up at c2, and c4 is dominated by c3.
    rs = [1.0, 0.8, 0.9, 0.4, 0.3]
    fs = [0.0, 0.5, 0.4, 0.9, 0.2]
    # front: (0.9,1] -> 0, (0.8,0.9] -> 0.4, (0.4,0.8] -> 0.5, [0,0.4] -> 0.9: 0.04 + 0.2 + 0.36 = 0.6
    assert M.aues(rs, fs) == pytest.approx(0.6)
    assert M.aues(rs[:4], fs[:4]) == pytest.approx(0.6)  # the dominated point adds nothing
    # trapezoid through (0.3,.2) (0.4,.9) (0.8,.5) (0.9,.4) (1,0) plus flat 0.3 * 0.2:
    # 0.06 + 0.055 + 0.28 + 0.045 + 0.02 = 0.46
    assert M.aues(rs, fs, method="trapezoid") == pytest.approx(0.46)
    assert M.aues(rs[::-1], fs[::-1], method="trapezoid") == pytest.approx(0.46)


def test_aues_ties_and_clipping():
    # Equal RS keeps the highest FS in both variants: front 0.8 * 0.5; trapezoid the same single point.
    assert M.aues([0.8, 0.8], [0.2, 0.5]) == pytest.approx(0.4)
    assert M.aues([0.8, 0.8], [0.2, 0.5], method="trapezoid") == pytest.approx(0.4)
    # RS 1.2 -> 1, FS -0.1 -> 0, FS 1.3 -> 1
    assert M.aues([1.2, 0.5], [-0.1, 1.3]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.aues([0.5], [0.5], method="simpson")


def test_mu95_threshold_rule():
    # theta_o MU 0.6 -> threshold 0.57.
    # Drops below at the first checkpoint and never recovers: only theta_o qualifies.
    assert M.mu95([0.6, 0.5, 0.4], [-5.0, -1.0, -0.5]) == -5.0
    # Drops, then a later checkpoint recovers to 0.58 >= 0.57: its -2.0 is the best qualifying value.
    assert M.mu95([0.6, 0.5, 0.58, 0.3], [-5.0, -1.0, -2.0, -0.1]) == -2.0
    # Exactly at the threshold qualifies (0.95 * 1.0 == 0.95).
    assert M.mu95([1.0, 0.95], [-3.0, -1.0]) == -1.0
    # theta_o qualifies even when it has the best FQ and a custom position.
    assert M.mu95([0.5, 1.0], [-1.0, -4.0], theta_o_index=1) == -4.0
    # A threshold above 1 excludes theta_o by the rule, but it is kept as the fallback.
    assert M.mu95([1.0, 1.02], [-3.0, -1.0], threshold=1.05) == -3.0


def test_mu95_missing_fq_raises():
    with pytest.raises(ValueError, match="forget quality"):
        M.mu95([0.6, 0.6], [-5.0, None])
    with pytest.raises(ValueError, match="forget quality"):
        M.mu95([0.6, 0.6], [np.nan, -1.0])


@pytest.mark.parametrize(
    ("a", "b", "p"),
    [
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 0.25),  # only all-plus and all-minus reach |mean| = 1: 2/8
        ([0.3, 0.5, 0.7], [0.3, 0.5, 0.7], 1.0),  # d = 0: every assignment ties
        ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], 0.25),  # |mean| in {2, 4/3, 2/3, 0}, each twice
        ([1.0, 0.0, -2.0], [0.0, 0.0, 0.0], 1.0),  # observed 1/3 is the smallest |mean|
        ([2.0], [1.0], 1.0),
    ],
)
def test_paired_permutation_test_known(a, b, p):
    assert M.paired_permutation_test(a, b) == pytest.approx(p)


def test_paired_permutation_test_matches_exact_arithmetic():
    # One-decimal differences make many exact ties that floats miss without the tolerance.
    rng = np.random.default_rng(2)
    for _ in range(30):
        tenths = rng.integers(-5, 6, size=5)
        d = [Fraction(int(t), 10) for t in tenths]
        observed = abs(sum(d))
        hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed for signs in product([1, -1], repeat=5))
        a = np.array([float(x) for x in d]) + 0.7
        assert M.paired_permutation_test(a, np.full(5, 0.7)) == pytest.approx(hits / 32)


def test_compare_groups():
    out = M.compare_groups([1.0, 2.0, 3.0], [0.0, 2.0, 5.0])
    assert out["n"] == 3
    assert out["mean_a"] == pytest.approx(2.0) and out["std_a"] == pytest.approx(1.0)
    # b: mean 7/3, sample variance (49/9 + 1/9 + 64/9) / 2 = 57/9
    assert out["mean_b"] == pytest.approx(7 / 3) and out["std_b"] == pytest.approx(sqrt(57 / 9))
    # |a - b| = [1, 0, 2]: mean 1, sample std 1
    assert out["abs_delta_mean"] == pytest.approx(1.0) and out["abs_delta_std"] == pytest.approx(1.0)
    assert out["p_value"] == pytest.approx(1.0)  # d = [1, 0, -2], see the permutation cases


def test_compare_groups_single_seed():
    out = M.compare_groups([0.4], [0.1])
    assert out["std_a"] == 0.0 and out["std_b"] == 0.0 and out["abs_delta_std"] == 0.0
    assert out["abs_delta_mean"] == pytest.approx(0.3) and out["p_value"] == 1.0


def test_rouge_with_memoised_stemmer_equals_rouge_score_default():
    from rouge_score import rouge_scorer

    stock = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = ["The authors were writing stories about running dogs.", "Jaime Vasquez was born in Santiago, Chile."]
    preds = ["Writers wrote a story about dogs that run, running and runs.", "Born in Chile: Jaime Vasquez, 1958."]
    for _ in range(2):  # the second pass is served from the stemmer's cache
        expected = [stock.score(r, p)["rougeL"].recall for p, r in zip(preds, refs)]
        np.testing.assert_array_equal(M.rouge_l_recall(preds, refs), expected)
    assert 0 < expected[0] < 1


# ---- Membership inference ----

def test_min_k_score_averages_the_lowest_int_n_k_log_probs():
    logp = np.log([0.5, 0.1, 0.25, 0.05, 0.8])
    # n = 5, k = 0.4: int(2.0) = 2 lowest, log 0.05 and log 0.1 -> score -(log 0.05 + log 0.1) / 2 = log(sqrt(200))
    assert M.min_k_score(logp, 0.4) == pytest.approx(np.log(sqrt(200)))
    # k = 0.1: int(0.5) = 0, at least one token -> -log 0.05; k = 1: minus the mean of all (the loss).
    assert M.min_k_score(logp, 0.1) == pytest.approx(np.log(20))
    assert M.min_k_score(logp, 1.0) == pytest.approx(-np.mean(logp))
    with pytest.raises(ValueError):
        M.min_k_score([], 0.4)
    with pytest.raises(ValueError):
        M.min_k_score(logp, 0.0)


def test_min_k_plus_plus_standardises_by_the_next_token_distribution():
    logp = [-1.0, -3.0, -2.0]
    mu = [-2.0, -1.0, -2.0]
    var = [4.0, 1.0, 0.0]
    # z = (-1 + 2) / 2 = 0.5, (-3 + 1) / 1 = -2, (-2 + 2) / sqrt(1e-6) = 0 (variance clamped at 1e-6).
    # k = 0.4: int(1.2) = 1 lowest -> 2.0; k = 1: -(0.5 - 2 + 0) / 3 = 0.5.
    assert M.min_k_plus_plus_score(logp, mu, var, 0.4) == pytest.approx(2.0)
    assert M.min_k_plus_plus_score(logp, mu, var, 1.0) == pytest.approx(0.5)
    # The clamp is what keeps a deterministic distribution finite: z = (-1.5 + 1) / 1e-3 = -500.
    assert M.min_k_plus_plus_score([-1.5], [-1.0], [0.0], 0.4) == pytest.approx(500.0)
    with pytest.raises(ValueError):
        M.min_k_plus_plus_score(logp, mu[:2], var, 0.4)


def test_zlib_and_reference_scores():
    import zlib

    texts = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "The Silent Harbor was written in Lisbon."]
    lengths = [len(zlib.compress(t.encode())) for t in texts]
    assert lengths[0] < lengths[1]  # repetition compresses: zlib normalises loss by how surprising the text is
    np.testing.assert_array_equal(M.zlib_length(texts), lengths)
    np.testing.assert_allclose(M.zlib_score([2.0, 3.0], texts), [2.0 / lengths[0], 3.0 / lengths[1]])
    np.testing.assert_allclose(M.reference_score([2.0, 0.5], [1.5, 1.0]), [0.5, -0.5])
    with pytest.raises(ValueError):
        M.zlib_score([1.0], texts)


def _pairwise_auc(forget, holdout) -> float:
    wins = sum((h > f) + 0.5 * (h == f) for h in holdout for f in forget)
    return wins / (len(holdout) * len(forget))


def test_mia_auc_is_the_pairwise_count_with_ties_as_half():
    forget, holdout = [1.0, 2.0, 2.0, 5.0], [2.0, 3.0, 0.5]
    # holdout 2.0: beats 1.0, ties two 2.0s -> 2; 3.0: beats three -> 3; 0.5: 0. (1 + 1 + 3) / 12 = 5/12.
    assert M.mia_auc(forget, holdout) == pytest.approx(5 / 12)
    assert M.mia_auc(forget, holdout) == pytest.approx(_pairwise_auc(forget, holdout))
    rng = np.random.default_rng(0)
    for _ in range(20):
        f, h = rng.integers(0, 6, size=int(rng.integers(1, 30))), rng.integers(0, 6, size=int(rng.integers(1, 30)))
        assert M.mia_auc(f, h) == pytest.approx(_pairwise_auc(f, h))
    # Orientation: forget scores lower (more member-like) than every holdout score -> 1; the reverse -> 0.
    assert M.mia_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and M.mia_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert M.mia_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        M.mia_auc([], [1.0])
    with pytest.raises(ValueError):
        M.mia_auc([np.nan], [1.0])


def test_privleak_relative_to_the_retain_auc():
    assert M.privleak(0.6, 0.6) == 0.0  # the retain model against itself
    # (0.5 - 0.95) / (1 - 0.5) x 100 = -90: a memorised forget set; (0.6 - 0.4) / 0.4 x 100 = 50.
    assert M.privleak(0.95, 0.5) == pytest.approx(-90.0)
    assert M.privleak(0.4, 0.6) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        M.privleak(0.5, 1.0)
