"""The localization sanity check: masking.zeroed_values, masks.random_like and evaluator's ablation NLLs, on random
Llamas whose answer NLLs are computed independently here (full-vocabulary log-softmax of a plain forward)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_llama

import evaluator as E
from masking import MaskedValues, zeroed_values
from masks import random_like
from models import value_vectors

D_FF = 24  # random_llama's value vectors per layer


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the dtype GPU users evaluate in
def test_zeroed_values_zeroes_exactly_the_given_vectors_and_restores_them_bit_for_bit(dtype):
    model = random_llama().to(dtype)
    before = _weights(model)
    mask = [torch.tensor([0, 5, 23]), torch.tensor([7])]
    with zeroed_values(model, mask):
        for layer, (down, idx) in enumerate(zip(value_vectors(model), mask)):
            assert torch.count_nonzero(down.weight[:, idx]) == 0
            others = torch.ones(D_FF, dtype=torch.bool)
            others[idx] = False
            assert torch.equal(down.weight[:, others], before[f"model.layers.{layer}.mlp.down_proj.weight"][:, others])
        # nothing but the selected columns moved
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in (0, 1)}
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_zeroed_values_restores_the_values_when_the_block_raises():
    model = random_llama()
    before = _weights(model)
    with pytest.raises(RuntimeError, match="inside"), zeroed_values(model, [torch.tensor([1, 2]), torch.tensor([])]):
        assert torch.count_nonzero(value_vectors(model)[0].weight[:, [1, 2]]) == 0
        raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_zeroed_values_refuses_a_wrong_layer_count_and_an_attached_mask():
    model = random_llama()
    with pytest.raises(ValueError, match="1 layers but the model has 2"), zeroed_values(model, [torch.tensor([0])]):
        pass
    MaskedValues([torch.tensor([3]), torch.tensor([4])]).attach(model)
    with pytest.raises(ValueError, match="mask attached"), zeroed_values(model, [torch.tensor([3]), torch.tensor([])]):
        pass


def test_random_like_keeps_the_size_of_every_layer():
    mask = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0]), torch.tensor([], dtype=torch.long)]
    drawn = random_like(mask, D_FF, seed=3)
    assert [len(t) for t in drawn] == [5, 1, 0]
    for t in drawn:
        assert t.dtype == torch.int64 and torch.equal(t, t.sort().values) and len(set(t.tolist())) == len(t)
        assert all(0 <= i < D_FF for i in t.tolist())
    assert all(torch.equal(a, b) for a, b in zip(drawn, random_like(mask, D_FF, seed=3)))
    assert any(not torch.equal(a, b) for a, b in zip(drawn, random_like(mask, D_FF, seed=4)))
    with pytest.raises(ValueError, match="out of range"):
        random_like([torch.tensor([D_FF])], D_FF, seed=0)


def _encodings(seed: int, n: int) -> list[dict[str, list[int]]]:
    """Prompts and answers of different lengths (pooling by tokens and per sample would differ)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 40, (3 + i,), generator=gen).tolist()
        answer = torch.randint(1, 40, (2 + 2 * i,), generator=gen).tolist()
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def _reference_nll(model: torch.nn.Module, encodings: list[dict[str, list[int]]]) -> float:
    """Mean NLL per answer token over all the encodings, one unpadded forward each, full log-softmax."""
    total, count = 0.0, 0
    for e in encodings:
        labels = torch.tensor(e["labels"][1:])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].double().log_softmax(-1)
        answer = labels != -100
        total -= logp[answer].gather(-1, labels[answer, None]).sum().item()
        count += int(answer.sum())
    return total / count


def _zeroed_copy(model: torch.nn.Module, mask: list[torch.Tensor]) -> torch.nn.Module:
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        for down, idx in zip(value_vectors(ablated), mask):
            down.weight[:, idx] = 0
    return ablated


def test_mean_token_nll_pools_over_answer_tokens():
    model, enc = random_llama(), _encodings(0, 5)
    assert E.mean_token_nll(model, enc, batch_size=2) == pytest.approx(_reference_nll(model, enc), abs=1e-5)


def test_localization_check_with_one_value_vector_carrying_the_mlps():
    """Every value vector is zero but (0, C): zeroing a mask that holds C removes all MLP output (the ΔNLL of a
    model with no MLPs), a mask without it changes nothing (ΔNLL exactly 0), so the random masks' mean is the
    full ΔNLL times the fraction of seeds whose draw hits C."""
    c = 7
    model = random_llama(seed=1, initializer_range=0.5)  # weights large enough for one value vector to matter
    with torch.no_grad():
        for layer, down in enumerate(value_vectors(model)):
            keep = down.weight[:, c].clone()
            down.weight.zero_()
            if layer == 0:
                down.weight[:, c] = keep * 10
    forget, retain = _encodings(1, 4), _encodings(2, 6)
    no_mlp = _zeroed_copy(model, [torch.arange(D_FF), torch.arange(D_FF)])
    full = {name: _reference_nll(no_mlp, encs) - _reference_nll(model, encs)
            for name, encs in (("forget", forget), ("retain", retain))}
    # The case tests something: both NLLs move (on this random model the forget NLL falls and the retain NLL rises).
    assert full["forget"] < -0.05 and full["retain"] > 0.05, full
    before = _weights(model)
    mask = [torch.tensor([c, 0, 1]), torch.tensor([2])]
    seeds = list(range(8))
    result = E.localization_check(model, {"m": mask, "off": [torch.tensor([0, 1]), torch.tensor([], dtype=torch.long)]},
                                  forget, retain, seeds, batch_size=3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert result["baseline"]["forget"] == pytest.approx(_reference_nll(model, forget), abs=1e-5)
    row = result["masks"]["m"]
    assert row["forget"] == pytest.approx(full["forget"], abs=1e-5)
    assert row["retain"] == pytest.approx(full["retain"], abs=1e-5)
    assert result["masks"]["off"]["forget"] == 0 and result["masks"]["off"]["retain"] == 0
    hits = [c in random_like(mask, D_FF, s)[0].tolist() for s in seeds]
    assert 0 < sum(hits) < len(seeds)  # the seeds' draws both hit and miss C
    for r, hit in zip(row["random"], hits):
        assert r["forget"] == pytest.approx(full["forget"] if hit else 0.0, abs=1e-5)
    assert row["random_forget_mean"] == pytest.approx(full["forget"] * sum(hits) / len(seeds), abs=1e-5)
    assert row["forget_over_retain"] == pytest.approx(full["forget"] / full["retain"], rel=1e-4)
    assert row["random_forget_over_retain"] == pytest.approx(full["forget"] / full["retain"], rel=1e-4)
    assert row["localized"] is False  # forget ΔNLL < 0 < retain ΔNLL
    # The sets swapped: forget ΔNLL > 0 > retain ΔNLL, and above the random masks', which hit C on some seeds only.
    swapped = E.localization_check(model, {"m": mask}, retain, forget, seeds, batch_size=3)["masks"]["m"]
    assert swapped["forget"] == pytest.approx(full["retain"], abs=1e-5) and swapped["localized"] is True


def test_localization_check_matches_an_independent_ablation_of_a_random_model():
    model = random_llama(seed=2)
    forget, retain = _encodings(3, 4), _encodings(4, 4)
    mask = [torch.tensor([1, 4, 9, 16]), torch.tensor([0, 23])]
    result = E.localization_check(model, {"m": mask}, forget, retain, [5], batch_size=2)
    for name, encs in (("forget", forget), ("retain", retain)):
        expected = _reference_nll(_zeroed_copy(model, mask), encs) - _reference_nll(model, encs)
        assert result["masks"]["m"][name] == pytest.approx(expected, abs=1e-5)
        control = random_like(mask, D_FF, 5)
        expected = _reference_nll(_zeroed_copy(model, control), encs) - _reference_nll(model, encs)
        assert result["masks"]["m"]["random"][0][name] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="at least one seed"):
        E.localization_check(model, {"m": mask}, forget, retain, [], batch_size=2)
