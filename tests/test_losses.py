"""Unlearning-loss registry: hand-checked values on a stub LM whose logits are a table, dynamics on a tiny Llama."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_llama
from torch import nn
from transformers import LlamaForCausalLM

from dataloader import (
    LOSSES,
    capture_outputs,
    get_loss,
    nll_loss,
    rmu_control_vector,
    sequence_nll,
    token_nll,
    token_nll_from_logits,
)
from masking import MaskedValues, apply_lora

torch.set_num_threads(1)

# Next-token probabilities of the stub: P[i][j] = p(next = j | current = i).
P = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]
Q = [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.7, 0.2, 0.1]]


class StubLayer(nn.Module):
    """Output = mlp(table[token]); with the identity mlp the layer output is the table row."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.mlp = nn.Linear(table.shape[1], table.shape[1])
        with torch.no_grad():
            self.mlp.weight.copy_(torch.eye(table.shape[1]))
            self.mlp.bias.zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.table[input_ids])


class StubLM(nn.Module):
    """A bigram LM in HF clothing: logits at position t are log P[input_ids[t]], hidden state of layer 0 likewise."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([StubLayer(torch.tensor(probs).log())])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model.layers[0](input_ids))


def part(spec: dict, ref_nll: list[float] | None = None) -> dict:
    out = {name: torch.tensor(spec[key]) for name, key in
           (("input_ids", "ids"), ("labels", "labels"), ("attention_mask", "mask"))}
    if ref_nll is not None:
        out["ref_nll"] = torch.tensor(ref_nll)
    return out


# Two forget sequences (the second right-padded), answers of 2 tokens each; pads have id 0, label -100, mask 0.
FORGET = dict(ids=[[0, 1, 2, 1], [2, 0, 1, 0]], labels=[[-100, -100, 2, 1], [-100, 0, 1, -100]],
              mask=[[1, 1, 1, 1], [1, 1, 1, 0]])
RETAIN = dict(ids=[[1, 1, 0, 2]], labels=[[-100, 1, 0, 2]], mask=[[1, 1, 1, 1]])
IDK = dict(ids=[[0, 1, 0, 0], [2, 0, 0, 0]], labels=[[-100, -100, 0, 0], [-100, 0, 0, -100]],
           mask=[[1, 1, 1, 1], [1, 1, 1, 0]])


def hand_token_nlls(probs: list[list[float]], spec: dict) -> list[list[float]]:
    """-log p(label_t | input_{t-1}) for every answer token, per sequence."""
    return [
        [-math.log(probs[ids[t - 1]][lab[t]]) for t in range(1, len(ids)) if lab[t] != -100]
        for ids, lab in zip(spec["ids"], spec["labels"])
    ]


def hand_mean_nll(probs: list[list[float]], spec: dict) -> float:
    flat = [x for seq in hand_token_nlls(probs, spec) for x in seq]
    return sum(flat) / len(flat)


def hand_seq_nll(probs: list[list[float]], spec: dict) -> list[float]:
    return [sum(seq) for seq in hand_token_nlls(probs, spec)]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def stub_batch(forget_ref: list[float] | None = None, idk_ref: list[float] | None = None) -> dict:
    return {
        "forget": part(FORGET, forget_ref),
        "retain": part(RETAIN),
        "idk": part(IDK, idk_ref),
    }


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return random_llama(seed, max_position_embeddings=32).train()


def llama_part(seed: int, batch_size: int = 2, length: int = 8, prompt: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (batch_size, length), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # right padding on the last row
    ids[-1, -2:] = 0
    labels[-1, -2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def frozen(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def sgd_steps(model: nn.Module, loss_name: str, batch: dict, ref_model: nn.Module | None, cfg: dict,
              steps: int = 5, lr: float = 0.5) -> None:
    spec = get_loss(loss_name)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        spec(model, batch, ref_model, cfg).backward()
        opt.step()


# ---- registry ----


class Poison:
    """Stands in for what a loss must not read: any use of it fails the test."""

    def __init__(self, what: str) -> None:
        self.what = what

    def _refuse(self, *args, **kwargs):
        raise AssertionError(f"the loss read {self.what}, which it does not declare")

    __getitem__ = __getattr__ = __iter__ = __contains__ = __call__ = __len__ = _refuse


PARTS = ("forget", "retain", "idk")


def declared_batch(spec, seed: int = 0) -> dict:
    """The parts `spec` declares (with the reference NLLs of its cached ones), every other part poisoned."""
    batch = {}
    for i, name in enumerate(PARTS):
        if name not in spec.parts:
            batch[name] = Poison(f"batch[{name!r}]")
            continue
        batch[name] = llama_part(10 * seed + i)
        if name in spec.cached_ref:
            batch[name]["ref_nll"] = torch.tensor([3.0, 4.0])
    return batch


@pytest.mark.parametrize("name", [n if n != "rmu" else "rmu_1" for n in LOSSES])
def test_a_loss_reads_exactly_the_batch_parts_it_declares(name: str) -> None:
    """It runs with only its declared parts (the others poisoned), and each declared part, each cached reference NLL
    and the resident reference model (only when declared) changes its value (at all: SimNPO's saturated forget term
    on a random model moves it by 1e-6 only)."""
    spec = get_loss(name)
    model = tiny_llama(0)
    ref = frozen(tiny_llama(1)) if spec.resident_ref else Poison("ref_model")
    cfg = {"seed": 0}
    base = declared_batch(spec)
    value = spec(model, base, ref, cfg)
    assert value.isfinite() and value.requires_grad
    for part in spec.parts:
        other = {**base, part: declared_batch(spec, seed=1)[part]}
        assert spec(model, other, ref, cfg) != value, f"{part} is not read"
    for part in spec.cached_ref:
        other = {**base, part: {**base[part], "ref_nll": base[part]["ref_nll"] + 1.0}}
        assert spec(model, other, ref, cfg) != value, f"{part}'s ref_nll is not read"
    if spec.resident_ref:
        assert spec(model, base, frozen(tiny_llama(2)), cfg) != value, "the reference model is not read"


def test_get_loss_parses_rmu_layer_and_rejects_unknown() -> None:
    spec = get_loss("rmu_1")
    assert (spec.name, spec.layer, spec.resident_ref) == ("rmu_1", 1, True)
    assert get_loss("npo") is LOSSES["npo"] and get_loss("npo").layer is None
    for bad in ("nope", "rmu_x", "rmu_"):
        with pytest.raises(ValueError, match=repr(bad)) as err:
            get_loss(bad)
        assert "grad_diff" in str(err.value)


def test_missing_reference_is_explained() -> None:
    with pytest.raises(KeyError, match="ref_nll"):
        get_loss("npo")(StubLM(P), stub_batch(), None, {"hyper_param": 0.1})
    for name in ("kl", "learn_kl", "rmu_0", "rt_diff"):
        with pytest.raises(ValueError, match="resident"):
            get_loss(name)(StubLM(P), stub_batch(), None, {"hyper_param": 1.0})


# ---- shared helpers ----


def test_helpers_match_hand_values() -> None:
    model, batch = StubLM(P), stub_batch()
    nll, mask = token_nll(model, batch["forget"])
    assert mask.tolist() == [[False, True, True], [True, True, False]]
    assert torch.allclose(nll[mask], torch.tensor([x for s in hand_token_nlls(P, FORGET) for x in s]))
    assert (nll[~mask] == 0).all()
    assert torch.allclose(sequence_nll(model, batch["forget"]), torch.tensor(hand_seq_nll(P, FORGET)))


def test_nll_loss_matches_hf_loss() -> None:
    model, batch = tiny_llama(), llama_part(1)
    hf = model(**batch).loss
    assert torch.allclose(nll_loss(model, batch), hf, atol=1e-5)


@pytest.mark.parametrize("wrap", ["plain", "value_vector_mask", "lora"])
def test_answer_only_head_equals_full_logits(wrap: str) -> None:
    """token_nll applies the LM head at answer positions only; values and gradients match the full-logit path."""
    model, batch = tiny_llama(), llama_part(5, batch_size=3)
    if wrap == "value_vector_mask":
        trainable = MaskedValues([torch.tensor([0, 5]), torch.tensor([3])]).attach(model).parameters()
    elif wrap == "lora":
        model, trainable = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    else:
        trainable = list(model.parameters())
    for p in trainable:  # move off the initial point so LoRA's B (zero at init) and the masked delta matter
        p.data.add_(0.05 * torch.randn_like(p))

    def value_and_grads(nll_fn):
        nll, mask = nll_fn()
        grads = torch.autograd.grad(nll.sum(), trainable)
        return nll.detach(), mask, grads

    fast, fast_mask, fast_grads = value_and_grads(lambda: token_nll(model, batch))
    full, full_mask, full_grads = value_and_grads(
        lambda: token_nll_from_logits(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]))
    assert torch.equal(fast_mask, full_mask) and fast_mask.sum() > 0
    assert torch.allclose(fast, full, atol=1e-5) and (fast[~fast_mask] == 0).all()
    for a, b in zip(fast_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-5)


# ---- losses ----


def test_learn_and_learn_reg() -> None:
    model, batch = StubLM(P), stub_batch()
    assert math.isclose(get_loss("learn")(model, batch, None, {}).item(), hand_mean_nll(P, FORGET), rel_tol=1e-5)
    value = get_loss("learn_reg")(model, batch, None, {"hyper_param": 0.5}).item()
    assert math.isclose(value, hand_mean_nll(P, FORGET) + 0.5 * hand_mean_nll(P, RETAIN), rel_tol=1e-5)


def test_ga_value_and_dynamics() -> None:
    stub_value = get_loss("ga")(StubLM(P), stub_batch(), None, {}).item()
    assert math.isclose(stub_value, -hand_mean_nll(P, FORGET), rel_tol=1e-5)

    model, forget = tiny_llama(), llama_part(2)
    before = nll_loss(model, forget).item()
    sgd_steps(model, "ga", {"forget": forget}, None, {})
    assert nll_loss(model, forget).item() > before + 0.1


def test_grad_diff_is_the_combination() -> None:
    value = get_loss("grad_diff")(StubLM(P), stub_batch(), None, {"hyper_param": 2.0}).item()
    assert math.isclose(value, -hand_mean_nll(P, FORGET) + 2.0 * hand_mean_nll(P, RETAIN), rel_tol=1e-5)


def test_kl_hand_value_and_zero_at_reference() -> None:
    lam = 3.0
    value = get_loss("kl")(StubLM(P), stub_batch(), StubLM(Q), {"hyper_param": lam}).item()
    # KL(Q || P) of the next-token distributions at the retain answer positions (previous tokens 1, 1, 0).
    prev_tokens = [1, 1, 0]
    kls = [sum(q * math.log(q / p) for q, p in zip(Q[i], P[i])) for i in prev_tokens]
    assert math.isclose(value, -hand_mean_nll(P, FORGET) + lam * sum(kls) / len(kls), rel_tol=1e-5)

    model = tiny_llama()
    batch = {"forget": llama_part(3), "retain": llama_part(4)}
    at_ref = get_loss("kl")(model, batch, frozen(model), {"hyper_param": lam})
    assert torch.allclose(at_ref, -nll_loss(model, batch["forget"]), atol=1e-5)


def test_learn_kl_hand_value_and_plain_learning_at_reference() -> None:
    lam = 2.0
    value = get_loss("learn_kl")(StubLM(P), stub_batch(), StubLM(Q), {"hyper_param": lam}).item()
    kls = [sum(q * math.log(q / p) for q, p in zip(Q[i], P[i])) for i in (1, 1, 0)]  # retain answer positions
    assert math.isclose(value, hand_mean_nll(P, FORGET) + lam * sum(kls) / len(kls), rel_tol=1e-5)

    model = tiny_llama()
    batch = {"forget": llama_part(6), "retain": llama_part(7)}
    ref = frozen(model)
    assert torch.allclose(get_loss("learn_kl")(model, batch, ref, {"hyper_param": lam}),
                          nll_loss(model, batch["forget"]), atol=1e-5)
    sgd_steps(model, "learn_kl", batch, ref, {"hyper_param": lam})
    assert nll_loss(model, batch["forget"]).item() < nll_loss(ref, batch["forget"]).item() - 0.1


def test_wga_weights_are_p_to_the_beta() -> None:
    beta, p = 2.0, P[0][1]
    model = StubLM(P)
    single = {"input_ids": torch.tensor([[0, 1]]), "labels": torch.tensor([[-100, 1]]),
              "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    loss = get_loss("wga")(model, {"forget": single, "retain": single}, None,
                           {"hyper_param": beta, "retain_weight": 0.0})
    assert math.isclose(loss.item(), -(p ** beta) * -math.log(p), rel_tol=1e-5)
    loss.backward()
    # The weight is detached, so d/dlogits = -p^beta * (softmax - onehot): plain ascent scaled by p^beta.
    expected = -(p ** beta) * (torch.tensor(P[0]) - torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(model.model.layers[0].mlp.bias.grad, expected, atol=1e-6)


def test_wga_value_with_retain() -> None:
    beta, rw = 0.5, 0.7
    value = get_loss("wga")(StubLM(P), stub_batch(), None, {"hyper_param": beta, "retain_weight": rw}).item()
    tokens = [x for s in hand_token_nlls(P, FORGET) for x in s]
    forget_term = -sum(math.exp(-x) ** beta * x for x in tokens) / len(tokens)
    assert math.isclose(value, forget_term + rw * hand_mean_nll(P, RETAIN), rel_tol=1e-5)


def test_npo_formula_and_value_at_reference() -> None:
    beta, rw, ref = 0.5, 0.3, [1.0, 3.0]
    value = get_loss("npo")(StubLM(P), stub_batch(forget_ref=ref), None, {"hyper_param": beta, "retain_weight": rw})
    log_ratios = [r - n for r, n in zip(ref, hand_seq_nll(P, FORGET))]  # log pi_theta - log pi_ref
    forget_term = (2 / beta) * sum(softplus(beta * x) for x in log_ratios) / 2
    assert math.isclose(value.item(), forget_term + rw * hand_mean_nll(P, RETAIN), rel_tol=1e-5)

    at_ref = get_loss("npo")(StubLM(P), stub_batch(forget_ref=hand_seq_nll(P, FORGET)), None,
                             {"hyper_param": beta, "retain_weight": rw})
    assert math.isclose(at_ref.item(), (2 / beta) * math.log(2) + rw * hand_mean_nll(P, RETAIN), rel_tol=1e-5)


def test_simnpo_formula() -> None:
    beta, gamma, rw = 2.5, 0.4, 0.5
    value = get_loss("simnpo")(StubLM(P), stub_batch(), None,
                               {"hyper_param": beta, "simnpo_gamma": gamma, "retain_weight": rw}).item()
    per_seq = hand_token_nlls(P, FORGET)
    # -(2/beta) log sigmoid(-(beta/|y|) log pi - gamma), log pi = -sum NLL
    terms = [-(2 / beta) * math.log(1 / (1 + math.exp(-(beta / len(s) * sum(s) - gamma)))) for s in per_seq]
    assert math.isclose(value, sum(terms) / len(terms) + rw * hand_mean_nll(P, RETAIN), rel_tol=1e-5)


def test_dpo_formula_and_value_at_reference() -> None:
    beta, rw = 0.5, 0.2
    forget_ref, idk_ref = [2.0, 5.0], [4.0, 1.5]
    cfg = {"hyper_param": beta, "retain_weight": rw}
    value = get_loss("dpo")(StubLM(P), stub_batch(forget_ref, idk_ref), None, cfg)
    win = [r - n for r, n in zip(idk_ref, hand_seq_nll(P, IDK))]
    lose = [r - n for r, n in zip(forget_ref, hand_seq_nll(P, FORGET))]
    terms = [-(2 / beta) * math.log(1 / (1 + math.exp(-beta * (w - l)))) for w, l in zip(win, lose)]
    assert math.isclose(value.item(), sum(terms) / 2 + rw * hand_mean_nll(P, RETAIN), rel_tol=1e-5)

    at_ref = get_loss("dpo")(StubLM(P), stub_batch(hand_seq_nll(P, FORGET), hand_seq_nll(P, IDK)), None,
                             {"hyper_param": beta, "retain_weight": 0.0})
    assert math.isclose(at_ref.item(), (2 / beta) * math.log(2), rel_tol=1e-5)


def test_dpo_moves_preference_towards_refusal() -> None:
    model = tiny_llama()
    forget, idk, retain = llama_part(5), llama_part(6), llama_part(7)
    with torch.no_grad():
        forget["ref_nll"] = sequence_nll(model, forget)
        idk["ref_nll"] = sequence_nll(model, idk)
    batch = {"forget": forget, "idk": idk, "retain": retain}

    def preference() -> float:
        with torch.no_grad():
            # log pi(idk) - log pi(forget)
            return (sequence_nll(model, forget) - sequence_nll(model, idk)).mean().item()

    before = preference()
    sgd_steps(model, "dpo", batch, None, {"hyper_param": 0.5, "retain_weight": 0.1})
    assert preference() > before + 0.5


def test_idk_is_hand_nll() -> None:
    value = get_loss("idk")(StubLM(P), stub_batch(), None, {"retain_weight": 0.5}).item()
    assert math.isclose(value, hand_mean_nll(P, IDK) + 0.5 * hand_mean_nll(P, RETAIN), rel_tol=1e-5)


def test_rmu_hand_mse() -> None:
    coeff, seed, rw = 4.0, 7, 0.5
    model, ref = StubLM(P), StubLM(Q)
    value = get_loss("rmu_0")(model, stub_batch(), ref, {"hyper_param": coeff, "seed": seed, "retain_weight": rw})
    target = rmu_control_vector(3, coeff, seed).tolist()
    assert math.isclose(math.sqrt(sum(t * t for t in target)), coeff, rel_tol=1e-6)

    def mse(a: list[float], b: list[float]) -> float:
        return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)

    log_p = [[math.log(x) for x in row] for row in P]
    log_q = [[math.log(x) for x in row] for row in Q]
    # Hidden state of layer 0 at a position = log-prob row of its token; RMU looks at positions holding answer tokens.
    forget_tokens = [tok for ids, lab in zip(FORGET["ids"], FORGET["labels"]) for tok, l in zip(ids, lab) if l != -100]
    retain_tokens = [tok for tok, l in zip(RETAIN["ids"][0], RETAIN["labels"][0]) if l != -100]
    forget_term = sum(mse(log_p[t], target) for t in forget_tokens) / len(forget_tokens)
    retain_term = sum(mse(log_p[t], log_q[t]) for t in retain_tokens) / len(retain_tokens)
    assert math.isclose(value.item(), forget_term + rw * retain_term, rel_tol=1e-5)


def test_rmu_layer_conflict_and_range() -> None:
    model = StubLM(P)
    with pytest.raises(ValueError, match="rmu_layer"):
        get_loss("rmu_0")(model, stub_batch(), model, {"hyper_param": 1.0, "rmu_layer": 3})
    with pytest.raises(ValueError, match="out of range"):
        get_loss("rmu_5")(model, stub_batch(), model, {"hyper_param": 1.0})


def test_rmu_hook_is_the_layer_output_and_forget_term_drops() -> None:
    model = tiny_llama()
    forget, retain = llama_part(8), llama_part(9)
    with torch.no_grad():
        hidden = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"],
                       output_hidden_states=True).hidden_states
        hooked = capture_outputs(model, forget, [model.model.layers[0]])[0]
    assert torch.allclose(hooked, hidden[1], atol=1e-6)  # output of decoder layer l == hidden_states[l + 1]

    batch = {"forget": forget, "retain": retain}
    forget_only = {"hyper_param": 5.0, "seed": 0, "retain_weight": 0.0}
    ref = frozen(model)
    with torch.no_grad():
        before = get_loss("rmu_1")(model, batch, ref, forget_only).item()
    sgd_steps(model, "rmu_1", batch, ref, forget_only, lr=0.1)
    with torch.no_grad():
        assert get_loss("rmu_1")(model, batch, ref, forget_only).item() < before


def test_rt_diff_zero_at_reference_and_hand_value() -> None:
    model = StubLM(P)
    ref = frozen(model)
    batch = stub_batch()
    assert get_loss("rt_diff")(model, batch, ref, {}).item() == 0.0
    delta = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        ref.model.layers[0].mlp.bias += delta
    # MLP outputs differ by delta at every token, so the mean squared distance is ||delta||^2.
    assert math.isclose(get_loss("rt_diff")(model, batch, ref, {}).item(), delta.pow(2).sum().item(), rel_tol=1e-6)


def test_rt_diff_on_llama() -> None:
    model = tiny_llama()
    ref = frozen(model)
    forget = {"forget": llama_part(10)}
    assert get_loss("rt_diff")(model, forget, ref, {}).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight.add_(0.1)
    loss = get_loss("rt_diff")(model, forget, ref, {})
    assert loss.item() > 0
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
