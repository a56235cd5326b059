"""Training scalars: the history in trainer_state.json and, with report_to=tensorboard, TensorBoard's event files."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from checkpointer import Checkpointer
from dataloader import UnlearnDataset, get_loss, recording_loss_terms
from io_utils import ConfigError
from models import family_config, load_model, load_tokenizer
from tofu import load_tofu
from trainer import TENSORBOARD_MISSING, TrainSettings, check_report_to, train

SETTINGS = dict(lr=1e-3, weight_decay=0.0, epochs=1, batch_size=20, grad_accum=1, warmup_ratio=0.0,
                lr_scheduler="linear", max_grad_norm=0.5, seed=0, save_checkpoint=False, save_steps=0,
                save_each_epoch=False)


def _train_grad_diff(tiny_path, run_dir, monkeypatch, **settings) -> list[float]:
    """Two steps of grad_diff (forget01: 40 examples, batch 20) on the tiny model; the norms clip_grad_norm_
    returned."""
    tok = load_tokenizer("tiny", str(tiny_path))
    data = UnlearnDataset(load_tofu("forget01", "synthetic"), load_tofu("retain99", "synthetic")[:100], [], tok,
                          family_config("tiny"), 64, ("forget", "retain"), seed=0)
    model = load_model(str(tiny_path), torch.device("cpu"))
    returned: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norm = clip(*args, **kwargs)
        returned.append(norm.item())
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    spec = get_loss("grad_diff")
    train(model, list(model.parameters()), data, lambda m, b: spec(m, b, None, {"hyper_param": 0.5}),
          TrainSettings(**{**SETTINGS, **settings}), Checkpointer(run_dir))
    return returned


def test_tensorboard_events_hold_every_scalar_of_every_step(tiny_path, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    norms = _train_grad_diff(tiny_path, tmp_path, monkeypatch, report_to="tensorboard")
    (state,) = [json.loads(p.read_text()) for p in tmp_path.glob("checkpoint-*/trainer_state.json")]
    history = state["history"]
    assert [h["step"] for h in history] == [1, 2]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in ("loss", "loss_forget", "loss_retain", "lr",
                                                                    "grad_norm", "epoch", "tokens_per_s")}
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    assert all([e.step for e in series] == [1, 2] for series in scalars.values())
    for key in ("loss", "loss_forget", "loss_retain", "lr", "grad_norm"):
        assert [e.value for e in scalars[f"train/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-6)
    # The gradient norm is the one clip_grad_norm_ returned (before clipping), and the terms sum to the loss.
    assert [h["grad_norm"] for h in history] == pytest.approx(norms, rel=1e-5)
    assert all(h["loss_forget"] + h["loss_retain"] == pytest.approx(h["loss"], abs=2e-6) for h in history)
    assert all(h["loss_forget"] < 0 < h["loss_retain"] for h in history)  # grad_diff: -NLL(forget) + λ NLL(retain)
    assert all(e.value > 0 for e in scalars["train/tokens_per_s"])


def test_report_to_none_writes_no_events_and_keeps_the_history(tiny_path, tmp_path, monkeypatch):
    norms = _train_grad_diff(tiny_path, tmp_path, monkeypatch)
    assert not (tmp_path / "tensorboard").exists()
    (state,) = [json.loads(p.read_text()) for p in tmp_path.glob("checkpoint-*/trainer_state.json")]
    assert [h["grad_norm"] for h in state["history"]] == pytest.approx(norms, rel=1e-5)


def test_loss_terms_reach_only_a_recording_block():
    spec = get_loss("grad_diff")

    logits = torch.randn(1, 4, 5)

    class Stub(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache):
            return type("Out", (), {"logits": logits})()

    part = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long),
            "labels": torch.tensor([[-100, 1, 2, 3]])}
    batch = {"forget": part, "retain": part}
    with recording_loss_terms() as terms:
        loss = spec(Stub(), batch, None, {"hyper_param": 2.0})
    assert set(terms) == {"forget", "retain"}
    assert torch.allclose(terms["forget"] + terms["retain"], loss)
    assert torch.allclose(terms["retain"], -2.0 * terms["forget"])  # the same part: λ NLL = -λ (-NLL)
    with recording_loss_terms() as outside:
        pass
    spec(Stub(), batch, None, {"hyper_param": 2.0})
    assert outside == {}


def test_report_to_is_checked_before_any_work(monkeypatch):
    check_report_to("none")
    with pytest.raises(ConfigError, match=r"report_to='wandb'; expected one of \['none', 'tensorboard'\]"):
        check_report_to("wandb")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError) as err:
        check_report_to("tensorboard")
    assert str(err.value) == TENSORBOARD_MISSING
    assert TENSORBOARD_MISSING == "report_to=tensorboard needs the tensorboard package: pip install tensorboard==2.21.0"
