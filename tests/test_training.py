"""The training loop: fine-tuning lowers the loss, masks hold exactly, runs resume and run distributed."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, command, final_checkpoint, final_weights, subprocess_env
from transformers import AutoConfig, AutoModelForCausalLM

from checkpointer import Checkpointer
from dataloader import UnlearnDataset, get_loss
from masking import MaskedValues, plain_state_dict
from models import build_tiny_model, family_config, load_model, load_tokenizer, model_families, tiny_model_path
from tofu import load_tofu
from trainer import TrainSettings, train

SETTINGS = dict(lr=5e-3, weight_decay=0.1, epochs=1, batch_size=8, grad_accum=1, warmup_ratio=0.0,
                lr_scheduler="constant", max_grad_norm=1.0, seed=0, save_checkpoint=False, save_steps=0,
                save_each_epoch=False)


def _dataset(tiny_path, parts=("forget",)):
    tok = load_tokenizer("tiny", str(tiny_path))
    return tok, UnlearnDataset(load_tofu("forget01", "synthetic"), load_tofu("retain99", "synthetic")[:200],
                               ["I don't know."], tok, family_config("tiny"), 64, parts, seed=0)


def test_a_few_fine_tuning_steps_lower_the_loss(tiny_path, tmp_path):
    tok, data = _dataset(tiny_path)
    model = load_model(str(tiny_path), torch.device("cpu"))
    learn = get_loss("learn")
    batch = data.collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        before = learn(model, batch, None, {}).item()
    train(model, list(model.parameters()), data, lambda m, b: learn(m, b, None, {}),
          TrainSettings(**{**SETTINGS, "epochs": 3}), Checkpointer(tmp_path))
    with torch.no_grad():
        after = learn(model, batch, None, {}).item()
    assert after < before - 0.5


def test_length_grouped_epochs_cover_every_example_once_with_less_padding(tiny_path, tmp_path):
    tok, data = _dataset(tiny_path)
    lengths = data.lengths()
    model = load_model(str(tiny_path), torch.device("cpu"))
    seen: dict[bool, list[list[int]]] = {}
    for grouped in (False, True):
        batches = seen.setdefault(grouped, [])

        def record(m, b, batches=batches):
            batches.append(b["index"].tolist())
            return get_loss("learn")(m, b, None, {})

        settings = TrainSettings(**{**SETTINGS, "epochs": 2, "batch_size": 4, "lr": 0.0, "group_by_length": grouped})
        train(model, list(model.parameters()), data, record, settings, Checkpointer(tmp_path / str(grouped)))
        assert len(batches) == settings.steps_per_epoch(len(data)) * 2
        for epoch in (batches[: len(batches) // 2], batches[len(batches) // 2:]):
            assert sorted(i for b in epoch for i in b) == list(range(len(data)))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(seen[True]) < 0.5 * padding(seen[False])
    assert seen[True][: len(seen[True]) // 2] != seen[True][len(seen[True]) // 2:]  # reshuffled each epoch


@pytest.mark.parametrize("n", [37, 40, 1000])
def test_length_grouped_batches_split_across_ranks(monkeypatch, n):
    import trainer

    lengths = [(7 * i) % 23 + 1 for i in range(n)]
    monkeypatch.setattr(trainer, "world_size", lambda: 2)
    per_rank = []
    for r in (0, 1):
        monkeypatch.setattr(trainer, "rank", lambda r=r: r)
        sampler = trainer.LengthGroupedBatchSampler(lengths, batch_size=4, seed=3, megabatch=5)
        sampler.set_epoch(1)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == math.ceil(math.ceil(n / 2) / 4)
    covered = [i for batches in per_rank for b in batches for i in b]
    assert set(covered) == set(range(n)) and len(covered) == 2 * math.ceil(n / 2)  # padded like DistributedSampler
    for b0, b1 in zip(*per_rank):  # the two ranks' micro-batches of one step come from one sorted global batch
        assert b0 and b1 and len(b0) - len(b1) in (0, 1)


def test_every_local_family_builds_its_architecture(tmp_path):
    local = {name: fam for name, fam in model_families().items() if fam["architecture"] is not None}
    assert {"tiny", "tiny-wide"} <= set(local)
    for name, fam in local.items():
        arch = fam["architecture"]
        config = AutoConfig.from_pretrained(build_tiny_model(tmp_path / name, "synthetic", 0, name))
        assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
            arch["n_layers"], arch["hidden_size"], arch["intermediate_size"])
        assert tiny_model_path("synthetic", 0, name).name.startswith("init_")


def test_tiny_model_round_trips_through_save_pretrained(tiny_path, tmp_path):
    model = load_model(str(tiny_path), torch.device("cpu"))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert model.num_parameters() == again.num_parameters()


def test_mask_locality_and_optimizer_state(tiny_path, tmp_path):
    """Only the selected down_proj columns change, bit for bit, with weight decay; Adam state is mask-sized."""
    tok, data = _dataset(tiny_path, parts=("forget", "retain"))
    model = load_model(str(tiny_path), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d_ff = model.config.intermediate_size
    indices = [torch.tensor([0, 7, 100]), torch.tensor([3, d_ff - 1])]
    trainable = MaskedValues(indices).attach(model).parameters()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * model.config.hidden_size
    spec = get_loss("grad_diff")
    train(model, trainable, data, lambda m, b: spec(m, b, None, {"hyper_param": 1.0}), TrainSettings(**SETTINGS),
          Checkpointer(tmp_path))
    after = plain_state_dict(model)
    assert set(after) == set(before)
    for name, value in after.items():
        if name.endswith("mlp.down_proj.weight"):
            layer = int(name.split(".")[2])
            outside = torch.ones(d_ff, dtype=torch.bool)
            outside[indices[layer]] = False
            assert torch.equal(value[:, outside], before[name][:, outside]), name
            assert (value[:, indices[layer]] != before[name][:, indices[layer]]).all(), name
        else:
            assert torch.equal(value, before[name]), name
    # The checkpointed optimizer holds state for the masked values only (two Adam moments each).
    state = torch.load(tmp_path / "checkpoint-5" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    moments = sum(t.numel() for s in state.values() for k, t in s.items() if k != "step")
    assert moments == 2 * 5 * model.config.hidden_size



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_values_remove_leaves_the_plain_trained_model(tiny_path, dtype):
    """remove() writes the masters into their columns as a checkpoint would, and leaves no parameter or hook behind."""
    model = load_model(str(tiny_path), torch.device("cpu"), dtype)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    mask = MaskedValues([torch.tensor([0, 7, 100]), torch.tensor([3])]).attach(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.layers.0.mlp.down_proj.masked_values", "model.layers.1.mlp.down_proj.masked_values"]
    with torch.no_grad():
        for p in mask.parameters():
            p.add_(0.05)
        masked_logits = model(ids).logits
    expected = plain_state_dict(model)
    mask.remove()
    assert mask.parameters() == []
    assert set(model.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        atol = 0.05 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(model(ids).logits, masked_logits, atol=atol, rtol=0)
    MaskedValues([torch.tensor([1]), torch.tensor([2])]).attach(model)  # the plain model takes a new mask
    with pytest.raises(ValueError, match="already has a value-vector mask"):
        MaskedValues([torch.tensor([1]), torch.tensor([2])]).attach(model)

def _unlearn_args(tiny_path: Path, save_root: Path, *extra: str) -> list[str]:
    return ["unlearn.py", "model_family=tiny", f"model_path={tiny_path}", "data_path=synthetic",
            "forget_split=forget01", "forget_loss=grad_diff", "epochs=2", "batch_size=4", "save_steps=3",
            f"save_root={save_root}", *extra]


@pytest.mark.parametrize("masked", [False, True])
def test_resume_after_sigkill_gives_the_same_weights(run_script, tiny_path, tmp_path, masked):
    """Also for a masked run's compact checkpoints, which resume from the starting model and the saved values."""
    extra = []
    if masked:
        from masks import save_mask

        save_mask(tmp_path / "mask.pt", [torch.arange(0, 512, 7), torch.arange(3, 512, 5)],
                  {"method": "hand", "n_layers": 2, "d_ff": 512})
        extra = [f"mask_path={tmp_path / 'mask.pt'}", "lr=1e-2"]
    reference = run_script(*_unlearn_args(tiny_path, tmp_path / "ref", *extra))
    assert reference.returncode == 0, reference.stderr
    args = _unlearn_args(tiny_path, tmp_path / "killed", *extra)
    proc = subprocess.Popen(command(*args), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    run_root = tmp_path / "killed"
    deadline = time.time() + 300
    while not any(p.name == "checkpoint-6" for p in run_root.rglob("checkpoint-*")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = [p for p in run_root.rglob("trainer_state.json") if json.loads(p.read_text())["final"]]
    assert not finished, "the run was killed before it could finish"
    resumed = run_script(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    (ref_run,) = {p.parent.parent for p in (tmp_path / "ref").rglob("trainer_state.json")}
    (run,) = {p.parent.parent for p in run_root.rglob("trainer_state.json")}
    ref_w, w = final_weights(ref_run), final_weights(run)
    assert ref_w.keys() == w.keys() and all(torch.equal(ref_w[k], w[k]) for k in w)
    saved = {p.name for p in final_checkpoint(run).iterdir()}
    assert {"tokenizer.json", "run_config.json", "trainer_state.json"} <= saved
    assert ("compact.json" in saved) == masked and ("model.safetensors" in saved) != masked
    again = run_script(*args)
    assert "run already complete" in again.stdout


def test_lora_checkpoint_is_a_plain_merged_model(tiny_path, tmp_path):
    from masking import apply_lora

    tok, data = _dataset(tiny_path)
    model = load_model(str(tiny_path), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, trainable = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    learn = get_loss("learn")
    # LoRA's B starts at zero, so one step cannot move the merged weights: train a few.
    train(peft_model, trainable, data, lambda m, b: learn(m, b, None, {}), TrainSettings(**{**SETTINGS, "epochs": 2}),
          Checkpointer(tmp_path))
    merged = plain_state_dict(peft_model)
    assert set(merged) == set(before)
    for name, value in merged.items():
        changed = not torch.equal(value, before[name])
        assert changed == (name.endswith(("q_proj.weight", "v_proj.weight"))), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_equals_peft_merge_of_a_copy_and_leaves_the_model_unmerged(tiny_path, dtype):
    """To the bit, fp32 adapters on a bf16 model included; weights outside the adapters are not copied."""
    import copy

    from masking import apply_lora

    model, trainable = apply_lora(load_model(str(tiny_path), torch.device("cpu"), dtype), r=4, alpha=8, dropout=0.0,
                                  target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    for p in trainable:  # as if trained: B is no longer zero
        p.data.normal_(0, 0.05)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.arange(1, 9)[None]
    logits = model(batch).logits

    merged = plain_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert merged[name].dtype == dtype and torch.equal(merged[name], value), name
    embed = "model.embed_tokens.weight"
    assert merged[embed].data_ptr() == model.get_base_model().state_dict()[embed].data_ptr()
    # Saving mid-run leaves the live model as it was: nothing merged into it, the same outputs, still training.
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(batch).logits, logits)
    model(batch).logits.sum().backward()
    assert all(p.grad is not None for p in trainable)


def _changed_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum((b.float() != a.float()).sum().item() for b, a in zip(before, after))
    return changed / sum(b.numel() for b in before)


def _train_at_small_lr(tiny_path, tmp_path, dtype: torch.dtype, kind: str):
    """16 Adam steps of ga at lr 1e-5 on a 10% mask or LoRA adapters: (trained values before, after, the model)."""
    from masking import apply_lora

    tok, data = _dataset(tiny_path)
    model = load_model(str(tiny_path), torch.device("cpu"), dtype)
    if kind == "mask":
        d_ff = model.config.intermediate_size
        generator = torch.Generator().manual_seed(0)
        trainable = MaskedValues([torch.randperm(d_ff, generator=generator)[: d_ff // 10]
                                  for _ in range(model.config.num_hidden_layers)]).attach(model).parameters()
    else:
        model, trainable = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    before = [p.detach().clone() for p in trainable]
    ga = get_loss("ga")
    settings = TrainSettings(**{**SETTINGS, "lr": 1e-5, "weight_decay": 0.0, "epochs": 16, "batch_size": 40})
    train(model, trainable, data, lambda m, b: ga(m, b, None, {}), settings, Checkpointer(tmp_path))
    return before, trainable, model


@pytest.mark.parametrize("kind", ["mask", "lora"])
def test_bf16_training_keeps_fp32_masters_and_saves_in_bf16(tiny_path, tmp_path, kind):
    """A bf16 model at lr 1e-5 moves (nearly) as many trained values as the same run in fp32."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        before, after, model = _train_at_small_lr(tiny_path, tmp_path / str(dtype), dtype, kind)
        assert {p.dtype for p in after} == {torch.float32}  # masters (and so Adam's state) in fp32
        moved[dtype] = _changed_fraction(before, after)
        saved = plain_state_dict(model)
        assert {v.dtype for v in saved.values()} == {dtype}
        if kind == "mask":  # what reaches the bf16 checkpoint, too
            initial = load_model(str(tiny_path), torch.device("cpu"), dtype).state_dict()
            downs = [k for k in saved if k.endswith("down_proj.weight")]
            moved[dtype, "saved"] = _changed_fraction([initial[k] for k in downs], [saved[k] for k in downs]) * 10
    assert moved[torch.float32] > 0.95
    assert moved[torch.bfloat16] >= 0.9 * moved[torch.float32]
    if kind == "mask":
        assert moved[torch.bfloat16, "saved"] >= 0.9 * moved[torch.float32, "saved"]


def test_bf16_masked_run_resumes_from_its_fp32_masters(tiny_path, tmp_path):
    """Resuming restores the masked values from the trainer state, not from their bf16-rounded columns."""
    from layout import resumable_checkpoint

    tok, data = _dataset(tiny_path)
    spec = get_loss("ga")
    indices = [torch.arange(0, 512, 9), torch.arange(3, 512, 11)]
    settings = TrainSettings(**{**SETTINGS, "lr": 1e-5, "epochs": 4, "batch_size": 20, "save_checkpoint": True,
                                "save_each_epoch": True})

    def run(out: Path, stop_after: int | None = None) -> list[torch.Tensor]:
        checkpointer = Checkpointer(out)
        model = load_model(str(tiny_path), torch.device("cpu"), torch.bfloat16)
        model, trainable = checkpointer.resume(model, lambda m: (m, MaskedValues(indices).attach(m).parameters()))
        calls = []

        def loss_fn(m, b):
            if len(calls) == stop_after:
                raise KeyboardInterrupt  # as if killed after the checkpoint of epoch 2
            calls.append(1)
            return spec(m, b, None, {})

        train(model, trainable, data, loss_fn, settings, checkpointer)
        return [p.detach().clone() for p in trainable]

    reference = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", stop_after=5)
    assert resumable_checkpoint(tmp_path / "resumed").name == "checkpoint-4"
    resumed = run(tmp_path / "resumed")
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))
