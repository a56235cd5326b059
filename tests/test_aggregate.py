"""aggregate.py and scripts/eval.sh on hand-made eval JSONs: every expected number is worked out beside it."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from math import sqrt
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

import aggregate as A
from io_utils import ConfigError
from layout import eval_path

SPLIT = "forget10"
# (label, RS, FS, MU, log10 FQ). Steps 5, 9, 10 so that string order (10, 5, 9) differs from step order.
POINTS = [("theta_o", 0.9, 0.1, 0.60, -10.0), ("checkpoint-5", 0.8, 0.5, 0.58, -5.0),
          ("checkpoint-9", 0.5, 0.7, 0.56, -2.0), ("checkpoint-10", 0.2, 0.95, 0.40, -1.0)]


def summary(rs: float, fs: float, mu: float, log10_fq: float | None) -> dict:
    return {"retain_strength": rs, "forget_strength": fs, "model_utility": mu,
            "log10_forget_quality": log10_fq, "forget_quality": None if log10_fq is None else 10.0 ** log10_fq}


def write_eval(model_dir: Path, summ: dict, retain_result: str | None = None) -> None:
    path = eval_path(model_dir, SPLIT)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"model_family": "tiny", "forget_split": SPLIT, "retain_result": retain_result}
    path.write_text(json.dumps({"config": config, "per_sample": {}, "summary": summ}))


def make_run(root: Path, name: str, points=POINTS, seed: int | None = None) -> tuple[Path, Path]:
    """(run_dir, theta_o_dir) with every model evaluated; theta_o is shared by the runs under one root."""
    theta_o, run = root / "theta_o", root / name
    for label, rs, fs, mu, fq in points:
        model = theta_o if label == "theta_o" else run / label
        model.mkdir(parents=True, exist_ok=True)
        (model / "trainer_state.json").write_text("{}")
        if seed is not None:
            (model / "run_config.json").write_text(json.dumps({"seed": seed}))
        write_eval(model, summary(rs, fs, mu, fq))
    return run, theta_o


def test_trajectory_is_theta_o_then_checkpoints_in_numeric_step_order(tmp_path):
    run, theta_o = make_run(tmp_path, "run")
    (run / ".checkpoint-11.abc.tmp").mkdir()  # an unfinished save is not a checkpoint
    trajectory = A.load_trajectory(run, theta_o, SPLIT)
    assert [(label, step) for label, step, _ in trajectory] == [
        ("theta_o", 0), ("checkpoint-5", 5), ("checkpoint-9", 9), ("checkpoint-10", 10)]
    assert trajectory[3][2]["forget_strength"] == 0.95


def test_score_run_front_trapezoid_and_mu95_by_hand(tmp_path):
    run, theta_o = make_run(tmp_path, "run")
    trajectory = A.load_trajectory(run, theta_o, SPLIT)
    score = A.score_run(trajectory)
    # Front: RS descending 0.9, 0.8, 0.5, 0.2 with best FS so far 0.1, 0.5, 0.7, 0.95 and widths 0.1, 0.3, 0.3, 0.2:
    # 0.01 + 0.15 + 0.21 + 0.19 = 0.56.
    assert score["aues"] == pytest.approx(0.56)
    # MU >= 0.95 * 0.60 = 0.57: theta_o and checkpoint-5 (0.58); checkpoint-9 (0.56) is out. max(-10, -5) = -5.
    assert score["mu95"] == -5.0
    assert (score["chosen_checkpoint"], score["chosen_step"]) == ("checkpoint-5", 5)
    assert score["final_checkpoint"] == "checkpoint-10"
    assert (score["final_fs"], score["final_rs"], score["final_mu"], score["final_log10fq"]) == (0.95, 0.2, 0.40, -1.0)
    assert score["final_fq"] == pytest.approx(0.1)
    assert score["n_checkpoints"] == 3
    # Trapezoid: flat 0.2 * 0.95 = 0.19, then (0.95+0.7)/2*0.3 + (0.7+0.5)/2*0.3 + (0.5+0.1)/2*0.1 = 0.4575; 0.6475.
    assert A.score_run(trajectory, aues_method="trapezoid")["aues"] == pytest.approx(0.6475)
    # MU >= 0.9 * 0.60 = 0.54 lets checkpoint-9 in: max(-10, -5, -2) = -2.
    lower = A.score_run(trajectory, mu_threshold=0.9)
    assert (lower["mu95"], lower["chosen_checkpoint"]) == (-2.0, "checkpoint-9")


def test_theta_o_is_chosen_when_no_checkpoint_beats_it(tmp_path):
    points = [(label, rs, fs, mu, -20.0 if label != "theta_o" else -3.0) for label, rs, fs, mu, _ in POINTS]
    run, theta_o = make_run(tmp_path, "run", points)
    score = A.score_run(A.load_trajectory(run, theta_o, SPLIT))
    assert (score["mu95"], score["chosen_checkpoint"], score["chosen_step"]) == (-3.0, "theta_o", 0)


def test_missing_eval_names_the_checkpoint(tmp_path):
    run, theta_o = make_run(tmp_path, "run")
    eval_path(run / "checkpoint-9", SPLIT).unlink()
    with pytest.raises(ConfigError, match=r"checkpoint-9 has no evaluation.*scripts/eval\.sh"):
        A.load_trajectory(run, theta_o, SPLIT)
    with pytest.raises(ConfigError, match="no checkpoint-<step>"):
        A.load_trajectory(theta_o, theta_o, SPLIT)


def test_missing_forget_quality_asks_for_retain_result(tmp_path):
    run, theta_o = make_run(tmp_path, "run")
    write_eval(run / "checkpoint-5", summary(0.8, 0.5, 0.58, None))
    with pytest.raises(ConfigError, match=r"log10_forget_quality is missing for checkpoint-5.*retain_result"):
        A.score_run(A.load_trajectory(run, theta_o, SPLIT))


def test_runs_cli_writes_json_csv_and_plots(tmp_path, capsys):
    run_a, theta_o = make_run(tmp_path / "runs", "masked_oracle/lr_1e-05", seed=1)
    # The runs share theta_o; their checkpoints' FS differ by +0.05.
    shifted = POINTS[:1] + [(label, rs, min(fs + 0.05, 1.0), mu, fq) for label, rs, fs, mu, fq in POINTS[1:]]
    run_b, _ = make_run(tmp_path / "runs", "masked_random/lr_1e-05", shifted, seed=1)
    write_eval(tmp_path / "retain", summary(0.5, 0.9, 0.59, None))
    out = tmp_path / "out"
    A.main(["runs", "--theta-o", str(theta_o), "--retain-eval", str(eval_path(tmp_path / "retain", SPLIT)),
            "--out", str(out), str(run_a), str(run_b)])
    data = json.loads((out / "runs.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["masked_oracle", "masked_random"]  # the differing path part
    assert data["runs"][0]["aues"] == pytest.approx(0.56) and data["runs"][0]["seed"] == 1
    # Front with best FS 0.1, 0.55, 0.75, 1.0: 0.01 + 0.165 + 0.225 + 0.2 = 0.6.
    assert data["runs"][1]["aues"] == pytest.approx(0.6)
    assert [p["label"] for p in data["runs"][0]["trajectory"]] == [p[0] for p in POINTS]
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(A.CSV_FIELDS)
    assert [(r["name"], r["chosen_checkpoint"], r["n_checkpoints"]) for r in rows] == [
        ("masked_oracle", "checkpoint-5", "3"), ("masked_random", "checkpoint-5", "3")]
    for plot in (A.RS_FS_PLOT, A.MU_FQ_PLOT):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    assert "| masked_oracle | 0.560 | -5.000 | checkpoint-5 |" in capsys.readouterr().out

    A.main(["runs", "--theta-o", str(theta_o), "--retain-eval", str(eval_path(tmp_path / "retain", SPLIT)),
            "--out", str(out), str(run_a), "--names", "gd-oracle", "--aues", "trapezoid"])
    (record,) = json.loads((out / "runs.json").read_text())["runs"]
    assert (record["name"], record["aues_method"]) == ("gd-oracle", "trapezoid")
    assert record["aues"] == pytest.approx(0.6475)


def test_runs_report_final_privleak_and_plot_it_against_retain_strength(tmp_path, capsys):
    run, theta_o = make_run(tmp_path / "runs", "npo")
    write_eval(tmp_path / "retain", summary(0.5, 0.9, 0.59, None))
    args = ["runs", "--theta-o", str(theta_o), "--retain-eval", str(eval_path(tmp_path / "retain", SPLIT)),
            "--out", str(tmp_path / "out"), str(run)]
    A.main(args)
    assert json.loads((tmp_path / "out" / "runs.json").read_text())["runs"][0]["final_privleak"] is None
    with pytest.raises(ConfigError, match="privleak is missing for npo/theta_o, npo/checkpoint-5.*mia=true"):
        A.main([*args, "--privleak-plot"])
    capsys.readouterr()
    # privleak from -90 (theta_o memorised the forget set) towards 0 over the checkpoints.
    for (label, *_), leak in zip(POINTS, (-90.0, -40.0, -10.0, 2.5)):
        model = theta_o if label == "theta_o" else run / label
        path = eval_path(model, SPLIT)
        result = json.loads(path.read_text())
        result["summary"]["privleak"] = leak
        path.write_text(json.dumps(result))
    A.main([*args, "--privleak-plot"])
    (record,) = json.loads((tmp_path / "out" / "runs.json").read_text())["runs"]
    assert record["final_privleak"] == 2.5
    assert [p["privleak"] for p in record["trajectory"]] == [-90.0, -40.0, -10.0, 2.5]
    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        assert next(csv.DictReader(f))["final_privleak"] == "2.5"
    assert (tmp_path / "out" / A.PRIVLEAK_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| -1.000 | 2.500 | 3 |" in capsys.readouterr().out


def write_runs_json(path: Path, runs: list[tuple[int | None, float, float]]) -> None:
    records = [{"name": f"{path.stem}-{i}", "run_dir": f"{path.stem}/{i}", "seed": seed, "aues": aues, "mu95": mu95,
                "aues_method": "front", "mu_threshold": 0.95} for i, (seed, aues, mu95) in enumerate(runs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": records}))


def test_compare_cli_pairs_by_seed(tmp_path, capsys):
    write_runs_json(tmp_path / "oracle" / "runs.json", [(1, 0.5, -5.0), (2, 0.6, -4.0), (3, 0.7, -3.0)])
    # Given in seed order 3, 1, 2: pairing by seed must line them up as seed 1: 0.4, seed 2: 0.4, seed 3: 0.5.
    write_runs_json(tmp_path / "random.json", [(3, 0.5, -7.0), (1, 0.4, -5.0), (2, 0.4, -6.0)])
    out = tmp_path / "cmp.json"
    A.main(["compare", "--group", "oracle", str(tmp_path / "oracle"), "--group", "random",
            str(tmp_path / "random.json"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["pairing"] == "seed" and [p["pair"] for p in result["pairs"]] == [1, 2, 3]
    # Each pair keeps its two runs' scores, seed 3's from the first line of random.json.
    assert {k: v for k, v in result["pairs"][2].items() if k not in ("a", "b")} == {
        "pair": 3, "aues_a": 0.7, "aues_b": 0.5, "mu95_a": -3.0, "mu95_b": -7.0}
    aues, mu95 = result["aues"], result["mu95"]
    # AUES: a = .5, .6, .7 (mean .6, std .1); b = .4, .4, .5 (mean 13/30, std sqrt(1/300));
    # |a - b| = .1, .2, .2 (mean 1/6, std sqrt(1/300)); all differences positive, so only the observed sign
    # assignment and its flip reach |mean| = 1/6: p = 2/8.
    assert aues["n"] == 3
    assert (aues["mean_a"], aues["std_a"]) == pytest.approx((0.6, 0.1))
    assert (aues["mean_b"], aues["std_b"]) == pytest.approx((13 / 30, sqrt(1 / 300)))
    assert (aues["abs_delta_mean"], aues["abs_delta_std"]) == pytest.approx((1 / 6, sqrt(1 / 300)))
    assert aues["p_value"] == pytest.approx(0.25)
    # MU95: a = -5, -4, -3; b = -5, -6, -7; d = 0, 2, 4 (|Δ| mean 2, std 2). Sign sums ±2±4 give |mean| 2 in half of
    # the 8 assignments: p = 0.5.
    assert (mu95["mean_a"], mu95["std_a"], mu95["mean_b"], mu95["std_b"]) == pytest.approx((-4, 1, -6, 1))
    assert (mu95["abs_delta_mean"], mu95["abs_delta_std"], mu95["p_value"]) == pytest.approx((2, 2, 0.5))
    table = capsys.readouterr().out
    assert "| AUES | 0.600 ± 0.100 | 0.433 ± 0.058 | 0.167 ± 0.058 | 0.250 |" in table
    assert "| MU95 | -4.000 ± 1.000 | -6.000 ± 1.000 | 2.000 ± 2.000 | 0.500 |" in table


def test_compare_pairs_by_position_without_seeds_and_rejects_mismatched_seeds(tmp_path):
    write_runs_json(tmp_path / "a.json", [(None, 0.5, -5.0), (None, 0.6, -4.0)])
    write_runs_json(tmp_path / "b.json", [(None, 0.6, -5.0), (None, 0.4, -4.0)])
    A.main(["compare", "--group", "a", str(tmp_path / "a.json"), "--group", "b", str(tmp_path / "b.json"),
            "--out", str(tmp_path / "cmp.json")])
    result = json.loads((tmp_path / "cmp.json").read_text())
    # By position: |.5 - .6| and |.6 - .4| -> mean .15.
    assert result["pairing"] == "position" and result["aues"]["abs_delta_mean"] == pytest.approx(0.15)
    write_runs_json(tmp_path / "c.json", [(1, 0.5, -5.0), (2, 0.6, -4.0)])
    write_runs_json(tmp_path / "d.json", [(1, 0.5, -5.0), (4, 0.6, -4.0)])
    with pytest.raises(ConfigError, match="seeds differ"):
        A.main(["compare", "--group", "c", str(tmp_path / "c.json"), "--group", "d", str(tmp_path / "d.json")])


def test_methods_cli_table(tmp_path, capsys):
    write_runs_json(tmp_path / "act.json", [(1, 0.5, -5.0), (2, 0.7, -3.0)])
    write_runs_json(tmp_path / "rnd.json", [(1, 0.4, -6.0)])
    A.main(["methods", "--group", "activation", str(tmp_path / "act.json"), "--group", "random",
            str(tmp_path / "rnd.json"), "--out", str(tmp_path / "m.json")])
    result = json.loads((tmp_path / "m.json").read_text())
    # activation: mean .6, sample std sqrt(.02) = 0.1414; MU95 mean -4, std sqrt(2). One run: std 0.
    assert (result["activation"]["aues_mean"], result["activation"]["aues_std"]) == pytest.approx((0.6, sqrt(0.02)))
    assert (result["activation"]["mu95_mean"], result["activation"]["mu95_std"]) == pytest.approx((-4, sqrt(2)))
    assert (result["random"]["n"], result["random"]["aues_std"]) == (1, 0.0)
    assert "| activation | 0.600 ± 0.141 | -4.000 ± 1.414 | 2 |" in capsys.readouterr().out


def test_methods_cli_compares_every_group_with_the_baseline_paired_by_seed(tmp_path, capsys):
    # random, the baseline, given in seed order 3, 1, 2: by seed it is AUES .4, .4, .5 and MU95 -5, -6, -7.
    write_runs_json(tmp_path / "rnd.json", [(3, 0.5, -7.0), (1, 0.4, -5.0), (2, 0.4, -6.0)])
    write_runs_json(tmp_path / "act.json", [(1, 0.5, -5.0), (2, 0.6, -4.0), (3, 0.7, -3.0)])
    # wagle in seed order 2, 3, 1; its MU95 equals random's seed by seed (paired by position it would not).
    write_runs_json(tmp_path / "wagle.json", [(2, 0.5, -6.0), (3, 0.7, -7.0), (1, 0.3, -5.0)])
    out = tmp_path / "m.json"
    A.main(["methods", "--group", "random", str(tmp_path / "rnd.json"), "--group", "activation",
            str(tmp_path / "act.json"), "--group", "wagle", str(tmp_path / "wagle.json"), "--baseline", "random",
            "--out", str(out)])
    result = json.loads(out.read_text())
    assert "vs_baseline" not in result["random"]
    act, wagle = result["activation"]["vs_baseline"], result["wagle"]["vs_baseline"]
    assert (act["baseline"], act["pairing"], [p["pair"] for p in act["pairs"]]) == ("random", "seed", [1, 2, 3])
    # activation - random: AUES d = .1, .2, .2 (|Δ| mean 1/6, std sqrt(1/300)); all positive, so only the observed
    # signs and their flip reach |mean d|: p = 2/8. MU95 d = 0, 2, 4 (|Δ| 2 ± 2); ±2±4 reach |sum| 6 in half: p = .5.
    assert (act["aues"]["abs_delta_mean"], act["aues"]["abs_delta_std"]) == pytest.approx((1 / 6, sqrt(1 / 300)))
    assert act["aues"]["p_value"] == pytest.approx(0.25)
    assert (act["mu95"]["abs_delta_mean"], act["mu95"]["abs_delta_std"], act["mu95"]["p_value"]) == pytest.approx(
        (2, 2, 0.5))
    # wagle - random: AUES d = -.1, .1, .2 (|Δ| .1, .1, .2: mean 2/15, std sqrt(1/300)); sign sums ±.1±.1±.2 reach
    # |.2| in 6 of 8: p = .75. MU95 d = 0, 0, 0: |Δ| 0 ± 0, and every assignment ties: p = 1.
    assert (wagle["aues"]["abs_delta_mean"], wagle["aues"]["abs_delta_std"]) == pytest.approx((2 / 15, sqrt(1 / 300)))
    assert wagle["aues"]["p_value"] == pytest.approx(0.75)
    assert (wagle["mu95"]["abs_delta_mean"], wagle["mu95"]["abs_delta_std"], wagle["mu95"]["p_value"]) == (0, 0, 1)
    table = capsys.readouterr().out
    # The pipes of |Δ| escaped, so that the header renders as eight cells.
    assert r"| method | AUES | MU95 | n | AUES \|Δ\| vs random | AUES p | MU95 \|Δ\| vs random | MU95 p |" in table
    assert "| random | 0.433 ± 0.058 | -6.000 ± 1.000 | 3 | — | — | — | — |" in table
    assert "| activation | 0.600 ± 0.100 | -4.000 ± 1.000 | 3 | 0.167 ± 0.058 | 0.250 | 2.000 ± 2.000 | 0.500 |" \
        in table
    assert "| wagle | 0.500 ± 0.200 | -6.000 ± 1.000 | 3 | 0.133 ± 0.058 | 0.750 | 0.000 ± 0.000 | 1.000 |" in table
    assert "paired with random's by seed" in table

    with pytest.raises(ConfigError, match="--baseline rnd is none of the groups"):
        A.main(["methods", "--group", "random", str(tmp_path / "rnd.json"), "--baseline", "rnd"])
    write_runs_json(tmp_path / "other.json", [(1, 0.5, -5.0), (2, 0.6, -4.0), (4, 0.7, -3.0)])
    with pytest.raises(ConfigError, match="seeds differ"):
        A.main(["methods", "--group", "random", str(tmp_path / "rnd.json"), "--group", "other",
                str(tmp_path / "other.json"), "--baseline", "random"])


def drawn_axes(monkeypatch, argv: list[str]) -> list:
    """Run an aggregate.py plot command with its PNG writer captured: the figure's axes (AUES, MU95)."""
    drawn = {}
    with monkeypatch.context() as patch:
        patch.setattr(A, "_write_png", lambda fig, path: drawn.update(fig=fig))
        A.main(argv)
    return drawn["fig"].axes


def test_methods_plot_draws_each_methods_mean_and_std_per_loss(tmp_path, monkeypatch, capsys):
    def row(aues, aues_std, mu95, mu95_std):
        return {"n": 2, "aues_mean": aues, "aues_std": aues_std, "mu95_mean": mu95, "mu95_std": mu95_std}
    (tmp_path / "npo.json").write_text(json.dumps({"random": row(.4, .01, -5, .1), "act": row(.5, .02, -4, .2)}))
    (tmp_path / "wga.json").write_text(json.dumps({"random": row(.3, .03, -6, .3)}))  # act has no wga runs
    aues_ax, mu95_ax = drawn_axes(monkeypatch, ["methods-plot", f"npo={tmp_path / 'npo.json'}",
                                                f"wga={tmp_path / 'wga.json'}", "--out", str(tmp_path / "t1.png")])
    assert [t.get_text() for t in aues_ax.get_xticklabels()] == ["npo", "wga"]
    for ax, key in ((aues_ax, "aues"), (mu95_ax, "mu95")):
        (rnd_line, _, (rnd_bars,)), (act_line, _, (act_bars,)) = ax.containers
        # Each method's points sit inside its loss's slot (x within ±0.4 of the loss's index), means as y.
        expected = {"random": [.4, .3] if key == "aues" else [-5, -6], "act": [.5] if key == "aues" else [-4]}
        assert list(rnd_line.get_ydata()) == pytest.approx(expected["random"])
        assert list(act_line.get_ydata()) == pytest.approx(expected["act"])
        assert [round(x) for x in rnd_line.get_xdata()] == [0, 1] and [round(x) for x in act_line.get_xdata()] == [0]
        # The error bar spans mean ± std.
        lo, hi = act_bars.get_segments()[0][:, 1]
        std = .02 if key == "aues" else .2
        assert (lo, hi) == pytest.approx((expected["act"][0] - std, expected["act"][0] + std))
    with pytest.raises(ConfigError, match="takes LOSS=JSON .* got 'npo'"):
        A.main(["methods-plot", "npo", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ConfigError, match="no such methods JSON for npo"):
        A.main(["methods-plot", f"npo={tmp_path / 'missing.json'}", "--out", str(tmp_path / "x.png")])
    A.main(["methods-plot", f"npo={tmp_path / 'npo.json'}", "--out", str(tmp_path / "real.png")])
    assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plot_joins_each_pairs_scores_per_loss(tmp_path, monkeypatch, capsys):
    write_runs_json(tmp_path / "o.json", [(1, 0.5, -5.0), (2, 0.6, -4.0), (3, 0.7, -3.0)])
    write_runs_json(tmp_path / "r.json", [(3, 0.5, -7.0), (1, 0.4, -5.0), (2, 0.65, -6.0)])
    A.main(["compare", "--group", "oracle", str(tmp_path / "o.json"), "--group", "random", str(tmp_path / "r.json"),
            "--out", str(tmp_path / "npo.json")])
    aues_ax, mu95_ax = drawn_axes(monkeypatch, ["compare-plot", f"npo={tmp_path / 'npo.json'}",
                                                f"wga={tmp_path / 'npo.json'}", "--out", str(tmp_path / "c.png")])
    assert [t.get_text() for t in aues_ax.get_xticklabels()] == ["npo", "wga"]
    # By seed: AUES oracle .5 .6 .7, random .4 .65 .5 (oracle ahead in 2 of 3); MU95 -5 -4 -3 vs -5 -6 -7 (2 of 3,
    # seed 1 ties). One line per pair and loss from x = loss - .15 (oracle) to loss + .15 (random).
    for ax, oracle, random in ((aues_ax, [.5, .6, .7], [.4, .65, .5]), (mu95_ax, [-5, -4, -3], [-5, -6, -7])):
        lines = [(line.get_xdata(), line.get_ydata()) for line in ax.lines]
        assert np.allclose(lines, [([j - .15, j + .15], [a, b]) for j in (0, 1) for a, b in zip(oracle, random)])
        points = [c.get_offsets() for c in ax.collections]
        assert np.allclose(points, [[[j + dx, y] for y in ys] for j in (0, 1) for dx, ys in ((-.15, oracle),
                                                                                            (.15, random))])
        labels = [t.get_text() for t in ax.texts]
        p = json.loads((tmp_path / "npo.json").read_text())["aues" if ax is aues_ax else "mu95"]["p_value"]
        assert labels == [f"2/3, p {p:.3f}"] * 2
    assert [t.get_text() for t in aues_ax.get_legend().get_texts()] == ["oracle", "random"]

    old = json.loads((tmp_path / "npo.json").read_text())
    old["pairs"] = [{k: p[k] for k in ("pair", "a", "b")} for p in old["pairs"]]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="compare JSON for npo has no per-pair scores"):
        A.main(["compare-plot", f"npo={tmp_path / 'old.json'}", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ConfigError, match="compare-plot takes LOSS=JSON .* got 'npo'"):
        A.main(["compare-plot", "npo", "--out", str(tmp_path / "x.png")])
    other = json.loads((tmp_path / "npo.json").read_text()) | {"groups": ["oracle", "rdm"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="one pair of groups"):
        A.main(["compare-plot", f"npo={tmp_path / 'npo.json'}", f"wga={tmp_path / 'other.json'}", "--out",
                str(tmp_path / "x.png")])
    A.main(["compare-plot", f"npo={tmp_path / 'npo.json'}", "--out", str(tmp_path / "real.png")])
    assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def sweep_result(method: str, lr: float, epochs: int, seed: int, aues: float, mu95: float,
                 hyper_param: float | None = 0.1, theta_o: str = "/m/theta_o") -> dict:
    """A sweep.py result with the fields aggregate.py sweep reads."""
    return {"method": method, "setting": {"lr": lr, "hyper_param": hyper_param, "epochs": epochs, "seed": seed},
            "aues": aues, "mu95": mu95, "aues_method": "front", "mu_threshold": 0.95, "theta_o": theta_o,
            "retain_result": "/m/retain.json", "run_dir": f"/s/{method}/lr_{lr}_ep_{epochs}_s{seed}"}


# npo: lr 1e-2 has the single best run (AUES .70) but the lower mean (.60); lr 2e-2 the higher mean AUES (.65) and
# the lower MU95. ga: all AUES tie at .30; MU95 breaks it, and between ga's two settings with equal scores the one
# with fewer epochs wins although it has the higher lr.
SWEEP = [sweep_result("npo", 1e-2, 2, 1, aues=0.5, mu95=-2.0), sweep_result("npo", 1e-2, 2, 2, aues=0.7, mu95=-2.0),
         sweep_result("npo", 2e-2, 2, 1, aues=0.65, mu95=-6.0),
         sweep_result("ga", 1e-2, 3, 1, aues=0.3, mu95=-4.0), sweep_result("ga", 2e-2, 2, 1, aues=0.3, mu95=-4.0),
         sweep_result("ga", 3e-2, 1, 1, aues=0.3, mu95=-9.0)]


def _chosen(rows: list[dict]) -> dict[str, tuple[float, int]]:
    return {r["method"]: (r["lr"], r["epochs"]) for r in rows if r["chosen"]}


def test_sweep_selects_the_highest_mean_score_per_method_with_the_stated_tie_breaks():
    rows = A.select_settings(SWEEP, "aues")
    npo = {r["lr"]: r for r in rows if r["method"] == "npo"}
    assert (npo[1e-2]["seeds"], npo[1e-2]["aues"], npo[1e-2]["aues_std"]) == ([1, 2], pytest.approx(0.6),
                                                                              pytest.approx(sqrt(0.02)))
    assert _chosen(rows) == {"npo": (2e-2, 2), "ga": (2e-2, 2)}
    # Under mu95 npo's lr 1e-2 (MU95 -2 against -6) wins; ga's AUES .3 is again equal, so fewer epochs decide.
    assert _chosen(A.select_settings(SWEEP, "mu95")) == {"npo": (1e-2, 2), "ga": (2e-2, 2)}
    # Order of the results does not matter.
    assert _chosen(A.select_settings(SWEEP[::-1], "aues")) == {"npo": (2e-2, 2), "ga": (2e-2, 2)}
    assert "the highest aues (mean over its seeds)" in A.selection_rule("aues")


def test_sweep_refuses_a_repeated_seed_and_an_unknown_rule():
    with pytest.raises(ConfigError, match=r"npo lr=0.01 hyper_param=0.1 epochs=2 has seeds \[1, 1\]: a seed repeats"):
        A.select_settings([SWEEP[0], SWEEP[0]])
    with pytest.raises(ConfigError, match=r"select='best'; expected one of \['aues', 'mu95'\]"):
        A.select_settings(SWEEP, "best")


def test_a_setting_that_diverged_for_any_seed_is_shown_but_not_chosen():
    diverged = {**sweep_result("npo", 2e-2, 2, 2, aues=None, mu95=None), "diverged": "loss became nan at step 3"}
    rows = A.select_settings([*SWEEP, diverged], "aues")
    npo = {r["lr"]: r for r in rows if r["method"] == "npo"}
    assert (npo[2e-2]["diverged"], npo[2e-2]["aues"], npo[2e-2]["seeds"]) == ([2], None, [1, 2])
    assert _chosen(rows)["npo"] == (1e-2, 2)  # the better mean AUES (.65) belongs to a setting that diverged once
    alone = A.select_settings([diverged], "aues")
    assert not alone[0]["chosen"]


def _write_sweep(root: Path, results: list[dict]) -> None:
    for i, result in enumerate(results):
        path = root / f"run{i}" / "sweep_result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(result))


def test_sweep_cli_writes_the_table(tmp_path, capsys):
    _write_sweep(tmp_path / "sweep", SWEEP)
    A.main(["sweep", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    table = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert table["select"] == "aues" and {m: r["lr"] for m, r in table["chosen"].items()} == {"npo": 2e-2, "ga": 2e-2}
    with open(tmp_path / "out" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and [r for r in rows if r["chosen"] == "True" and r["method"] == "npo"][0]["lr"] == "0.02"
    out = capsys.readouterr().out
    assert "| npo | 0.01 | 0.1 | 2 | 1 2 | 0.600 ± 0.141 | -2.000 ± 0.000 |  |" in out
    assert (tmp_path / "out" / "sweep.md").read_text().startswith("Selection rule (select=aues)")


def test_sweep_refuses_results_scored_against_different_models(tmp_path):
    _write_sweep(tmp_path, [SWEEP[0], sweep_result("npo", 1e-2, 2, 2, 0.5, -2.0, theta_o="/other")])
    with pytest.raises(ConfigError, match="differ in theta_o"):
        A.load_sweep(tmp_path)
    with pytest.raises(ConfigError, match="no sweep_result.json under"):
        A.load_sweep(tmp_path / "empty")


def _injection(tmp_path: Path, theta_r: tuple[float, float], theta_os: list[tuple[int, float, float]],
               *options: str) -> list[str]:
    """theta_r's and each seed's theta_o's (FS, RS) written as eval JSONs; the `injection` arguments."""
    write_eval(tmp_path / "theta_r", summary(rs=theta_r[1], fs=theta_r[0], mu=0.6, log10_fq=None))
    models = []
    for seed, fs, rs in theta_os:
        model = tmp_path / f"seed{seed}" / "checkpoint-100"
        write_eval(model, summary(rs=rs, fs=fs, mu=0.6, log10_fq=-1.0))
        (model / "run_config.json").write_text(json.dumps({"seed": seed}))
        models.append(str(model))
    return ["injection", "--theta-r", str(tmp_path / "theta_r"), "--forget-split", SPLIT, *options, *models]


def test_injection_that_lowered_forget_strength_and_kept_retention_is_verified(tmp_path, capsys):
    out = tmp_path / "inj.json"
    A.main(_injection(tmp_path, (0.95, 0.99), [(1, 0.30, 0.96), (2, 0.40, 0.94)], "--out", str(out)))
    result = json.loads(out.read_text())
    # seed 1: FS drop 0.95 - 0.30 = 0.65, RS drop 0.99 - 0.96 = 0.03; seed 2: 0.55 and 0.05 (the bound, kept).
    assert [r["seed"] for r in result["theta_o"]] == [1, 2]
    assert [r["fs_drop"] for r in result["theta_o"]] == pytest.approx([0.65, 0.55])
    assert [r["rs_drop"] for r in result["theta_o"]] == pytest.approx([0.03, 0.05])
    assert [r["verified"] for r in result["theta_o"]] == [True, True] and result["verified"] is True
    assert (result["min_fs_drop"], result["max_rs_drop"]) == (0.5, 0.05)
    table = capsys.readouterr().out
    assert ("| model | seed | Forget Strength | Retain Strength | FS drop | RS drop | FS drop ≥ 0.5 | RS drop ≤ 0.05 |"
            in table)
    assert "| theta_o | 1 | 0.300 | 0.960 | 0.650 | 0.030 | yes | yes |" in table
    assert "| theta_o | 2 | 0.400 | 0.940 | 0.550 | 0.050 | yes | yes |" in table


def test_injection_that_left_forget_strength_unchanged_fails(tmp_path, capsys):
    # The case: theta_o's Forget Strength equals theta_r's (0.837), retention intact.
    out = tmp_path / "inj.json"
    with pytest.raises(SystemExit) as failed:
        A.main(_injection(tmp_path, (0.837, 0.99), [(1, 0.837, 0.99), (2, 0.30, 0.98)], "--out", str(out)))
    assert str(failed.value.code) == ("injection failed: Forget Strength dropped by only 0.000 (< 0.5) in seed 1; "
                                      "comparing regions of an unchanged model would mean nothing")
    assert "| theta_o | 1 | 0.837 | 0.990 | 0.000 | 0.000 | no | yes |" in capsys.readouterr().out  # table first
    result = json.loads(out.read_text())
    assert result["verified"] is False and [r["verified"] for r in result["theta_o"]] == [False, True]
    # A lower bar lets the same models through.
    A.main(_injection(tmp_path, (0.837, 0.99), [(1, 0.837, 0.99)], "--min-fs-drop", "0"))


def test_injection_that_cost_retention_fails(tmp_path, capsys):
    args = _injection(tmp_path, (0.95, 0.99), [(1, 0.30, 0.96), (2, 0.40, 0.90)])
    with pytest.raises(SystemExit) as failed:
        A.main(args)
    assert str(failed.value.code) == ("injection failed: Retain Strength dropped by 0.090 (> 0.05) in seed 2; "
                                      "comparing regions of a damaged model would mean nothing")
    assert "| theta_o | 2 | 0.400 | 0.900 | 0.550 | 0.090 | yes | no |" in capsys.readouterr().out
    A.main([*args[:5], "--max-rs-drop", "0.1", *args[5:]])
    assert "| 0.090 | yes | yes |" in capsys.readouterr().out


def test_injection_needs_both_strengths_of_every_model(tmp_path):
    args = _injection(tmp_path, (0.95, 0.99), [])
    with pytest.raises(ConfigError, match=r"theta_o \(.*nowhere\) has not been evaluated on forget10"):
        A.main([*args, str(tmp_path / "nowhere")])
    write_eval(tmp_path / "forget_only", {"forget_strength": 0.3, "retain_strength": None})
    with pytest.raises(ConfigError, match=r"forget_only\) has no forget/retain strength"):
        A.main([*args, str(tmp_path / "forget_only")])


def test_aggregate_does_not_import_torch(processes):
    # aggregate.py runs once per table in the scripts; torch would add ~5 s to each call.
    code = "import sys, aggregate; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# A stand-in for eval_tofu.py: logs each call's models (one line per process) and writes the summary the test left in
# each model's directory, with the config fields eval.sh and aggregate.py read.
STUB = """
import ast, json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
models = ast.literal_eval(args.pop("model_path"))
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(" ".join(sorted(os.path.basename(m) for m in models)) + "\\n")
for model in models:
    out = os.path.join(model, "eval_results", "eval_" + args["forget_split"] + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(os.path.join(model, "fake_summary.json")) as f:
        summary = json.load(f)
    with open(out, "w") as f:
        json.dump({"config": {**args, "model_path": model}, "per_sample": {}, "summary": summary}, f)
"""


def test_eval_sh_evaluates_theta_o_and_every_checkpoint_in_one_process(processes, tmp_path):
    retain, theta_o, run = tmp_path / "retain", tmp_path / "theta o's", tmp_path / "run"  # quoted for Hydra
    for label, rs, fs, mu, fq in POINTS + [("retain", 0.5, 0.9, 0.59, None)]:
        model = {"theta_o": theta_o, "retain": retain}.get(label, run / label)
        model.mkdir(parents=True)
        (model / "trainer_state.json").write_text("{}")  # what makes a checkpoint complete
        (model / "fake_summary.json").write_text(json.dumps(summary(rs, fs, mu, fq)))
    retain_eval = str(eval_path(retain, SPLIT).resolve())
    (tmp_path / "stub.py").write_text(STUB)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": sys.executable, "EVAL_CMD": f"{sys.executable} {tmp_path / 'stub.py'}",
           "STUB_LOG": str(log), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    args = [str(ROOT / "scripts" / "eval.sh"), "--theta-o", str(theta_o), "--retain-model", str(retain),
            "--out", str(out), str(run)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == ["retain", "checkpoint-10 checkpoint-5 checkpoint-9 theta o's"]
    assert json.loads(eval_path(run / "checkpoint-9", SPLIT).read_text())["config"]["retain_result"] == retain_eval
    (record,) = json.loads((out / "runs.json").read_text())["runs"]
    assert (record["aues"], record["mu95"], record["chosen_checkpoint"]) == (pytest.approx(0.56), -5.0, "checkpoint-5")
    assert (out / A.MU_FQ_PLOT).is_file() and "| run | 0.560 |" in done.stdout

    # Again, configured from the environment, with other evaluation settings: one evaluator process for theta_o and
    # the checkpoints (eval_tofu.py decides which stored results are current), the settings passed on.
    env.update(RUNS=str(run), THETA_O=str(theta_o), RETAIN_EVAL=retain_eval, OUT=str(out), EVAL_ARGS="max_samples=100")
    again = subprocess.run([str(ROOT / "scripts" / "eval.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert log.read_text().splitlines()[2:] == ["checkpoint-10 checkpoint-5 checkpoint-9 theta o's"]
    assert json.loads(eval_path(theta_o, SPLIT).read_text())["config"]["max_samples"] == "100"

    # --evaluate-only (controlled.sh's check of theta_o before unlearning): no run directories, no scores.
    only = subprocess.run([str(ROOT / "scripts" / "eval.sh"), "--evaluate-only", "--theta-o", str(theta_o),
                           "--retain-model", str(retain), "--out", str(tmp_path / "none")],
                          env={**env, "RUNS": "", "RETAIN_EVAL": ""}, capture_output=True, text=True, timeout=120)
    assert only.returncode == 0, only.stderr
    assert log.read_text().splitlines()[3:] == ["retain", "theta o's"] and not (tmp_path / "none").exists()
