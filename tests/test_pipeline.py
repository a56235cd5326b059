"""The whole pipeline through its entry points on the synthetic data, small enough for CI:
θ_r (fine-tuned on retain99) vs θ_f (θ_r plus the forget01 authors, injected into a random 10% of value vectors).
The model that saw the forget set must score lower forget quality against θ_r than θ_r scores against itself,
higher forget-split probability and extraction strength, and a higher min-k% MIA AUC (negative privleak); unlearning
it must raise Forget Strength."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ok

EVAL = ["model_family=tiny", "data_path=synthetic", "forget_split=forget01", "max_samples=40", "max_new_tokens=40"]


def _final(run: Path) -> Path:
    return max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _summary(run_script, model: Path, *extra: str) -> dict:
    ok(run_script("eval_tofu.py", f"model_path={model}", *EVAL, *extra))
    return json.loads((model / "eval_results" / "eval_forget01.json").read_text())["summary"]


@pytest.fixture(scope="module")
def pipeline(run_script, tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    common = ["model_family=tiny", "data_path=synthetic", "batch_size=16"]
    ok(run_script("unlearn.py", *common, f"model_path={tiny_path}", "forget_loss=learn", "forget_split=retain99",
                   "epochs=2", "save_checkpoint=false", f"output_dir={root / 'theta_r'}"))
    theta_r = _final(root / "theta_r")
    ok(run_script("generate_mask.py", *common, f"model_path={theta_r}", "attribution=random_down", "seed=3",
                   "forget_split=forget01", f"mask_root={root / 'masks'}"))
    (v_tgt,) = (root / "masks").rglob("*.pt")
    ok(run_script("unlearn.py", *common, f"model_path={theta_r}", "forget_loss=learn_reg", "forget_split=forget01",
                   f"mask_path={v_tgt}", "epochs=15", "lr=1e-2", "batch_size=8", "save_checkpoint=false",
                   f"output_dir={root / 'theta_f'}"))
    theta_f = _final(root / "theta_f")
    retain = _summary(run_script, theta_r)
    retain_json = theta_r / "eval_results" / "eval_forget01.json"
    retain_self = _summary(run_script, theta_r, f"retain_result={retain_json}")
    full = _summary(run_script, theta_f, f"retain_result={retain_json}")
    ok(run_script("unlearn.py", *common, f"model_path={theta_f}", "forget_loss=npo", "forget_split=forget01",
                   f"mask_path={v_tgt}", "epochs=3", "lr=5e-3", "batch_size=8", "lr_scheduler=constant",
                   f"output_dir={root / 'unlearned'}"))
    unlearned = _summary(run_script, _final(root / "unlearned"), f"retain_result={retain_json}")
    return {"retain": retain, "retain_self": retain_self, "full": full, "unlearned": unlearned}


def test_the_model_that_saw_the_forget_set_is_distinguishable(pipeline):
    retain, retain_self, full = pipeline["retain"], pipeline["retain_self"], pipeline["full"]
    assert retain["forget_quality"] is None and retain_self["forget_quality"] == pytest.approx(1.0)
    assert full["forget_quality"] < retain_self["forget_quality"]
    assert full["forget_prob"] > retain_self["forget_prob"]
    assert full["forget_strength"] < retain_self["forget_strength"]  # FS = 1 - ES: it extracts more
    # Membership inference tells its forget answers from holdout ones better than the retain model's.
    assert retain["privleak"] is None and retain_self["privleak"] == 0.0
    assert full["mia_min_k_auc"] > retain_self["mia_min_k_auc"] and full["privleak"] < 0


def test_unlearning_raises_forget_strength(pipeline):
    assert pipeline["unlearned"]["forget_strength"] > pipeline["full"]["forget_strength"]
    assert pipeline["unlearned"]["forget_prob"] < pipeline["full"]["forget_prob"]
