"""sweep.py: a grid of unlearning settings on Hydra's multirun, run as a user runs it (basic launcher and submitit's
local launcher) on the synthetic data, and its config errors in-process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, ok
from hydra import initialize_config_dir

import sweep
from io_utils import ConfigError

DATA = "data_path=synthetic:10"
# The retain model's evaluation and the sweep's must score the same questions.
EVAL = ["max_samples=10", "max_new_tokens=20"]


def hydra_list(items: list[str]) -> str:
    return "[" + ",".join(f'"{item}"' for item in items) + "]"


@pytest.fixture(scope="module")
def models(run_script, tiny_path, tmp_path_factory) -> dict[str, Path]:
    """θ_o (the tiny initial model) and the retain model's eval JSON (another initialisation, so that forget quality
    varies), each in a directory of the test's own, since evaluations are written into the model directory."""
    from models import tiny_model_path

    root = tmp_path_factory.mktemp("sweep_models")
    theta_o = Path(shutil.copytree(tiny_path, root / "theta_o"))
    theta_r = Path(shutil.copytree(tiny_model_path("synthetic", 1), root / "theta_r"))
    ok(run_script("eval_tofu.py", f"model_path={theta_r}", DATA, *EVAL))
    return {"theta_o": theta_o, "retain_result": theta_r / "eval_results" / "eval_forget10.json"}


def grid(models: dict[str, Path], root: Path, *extra: str) -> list[str]:
    """Two npo settings (lr), 2 epochs each: a trajectory of θ_o and two checkpoints."""
    return ["sweep.py", "-m", f"model_path={models['theta_o']}", f"retain_result={models['retain_result']}", DATA,
            "forget_loss=npo", "lr=1e-2,3e-2", "epochs=2", f"save_root={root}",
            f"unlearn_args={hydra_list(['batch_size=8', 'lr_scheduler=constant'])}", f"eval_args={hydra_list(EVAL)}",
            *extra]


def check_table(root: Path, select: str) -> dict:
    """The table has both settings with their scores, and the chosen one follows the rule: the highest `select`,
    a tie to the other score, then to fewer epochs and the lower lr."""
    table = json.loads((root / "sweep.json").read_text())
    rows = table["settings"]
    assert table["select"] == select and [(r["method"], r["lr"], r["epochs"]) for r in rows] == [
        ("npo", 1e-2, 2), ("npo", 3e-2, 2)]
    for r in rows:
        assert isinstance(r["aues"], float) and isinstance(r["mu95"], float) and r["seeds"] == [42]
        (run_dir,) = r["run_dirs"]
        result = json.loads((Path(run_dir) / "sweep_result.json").read_text())
        assert (result["aues"], result["mu95"], result["n_checkpoints"]) == (r["aues"], r["mu95"], 2)
    other = {"aues": "mu95", "mu95": "aues"}[select]
    best = max(sorted(rows, key=lambda r: (r["epochs"], r["lr"])), key=lambda r: (r[select], r[other]))
    assert [r["chosen"] for r in rows] == [r is best for r in rows]
    assert table["chosen"]["npo"]["lr"] == best["lr"]
    assert (root / "sweep.md").read_text().startswith(f"Selection rule (select={select})")
    return table


def test_sweep_with_the_basic_launcher_skips_what_is_done_and_reuses_evaluations(run_script, models, tmp_path):
    root = tmp_path / "sweep"
    first = ok(run_script(*grid(models, root)))
    check_table(root, "aues")
    assert "Chosen setting per method" in first.stdout
    runs = sorted(p.parent for p in root.rglob("sweep_result.json"))
    done = {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*") if p.is_file()}

    # The first setting lost its result (e.g. killed while scoring): it is scored again from its finished run and
    # current evaluations; the second is skipped.
    (runs[0] / "sweep_result.json").unlink()
    again = ok(run_script(*grid(models, root)))
    assert again.stdout.count("skipped:") == 1 and again.stdout.count("run already complete") == 1
    assert again.stdout.count("reusing the per-sample results") == 3  # θ_o and both checkpoints
    assert "evaluating" not in again.stdout  # eval_tofu.py computed nothing
    changed = [p for p in done if p.stat().st_mtime_ns != done[p] and "eval_results" not in p.parts]
    assert changed == [runs[0] / "sweep_result.json"]
    check_table(root, "aues")


def test_sweep_with_the_submitit_local_launcher(run_script, models, tmp_path):
    root = tmp_path / "sweep"
    ok(run_script(*grid(models, root, "select=mu95", "hydra/launcher=submitit_local")))
    check_table(root, "mu95")
    assert list((root / ".submitit").rglob("*_log.out"))  # each job ran under submitit


def test_a_setting_whose_loss_diverges_is_recorded_and_the_single_run_writes_the_table(run_script, models,
                                                                                      tmp_path):
    root = tmp_path / "sweep"
    args = [a for a in grid(models, root) if not a.startswith(("-m", "lr=", "forget_loss="))]
    ok(run_script(*args, "forget_loss=ga", "lr=1e8", "epochs=1"))  # no -m: one job, Hydra's run mode
    (result,) = root.rglob("sweep_result.json")
    assert json.loads(result.read_text())["diverged"].startswith("loss became nan")
    table = json.loads((root / "sweep.json").read_text())
    assert table["chosen"] == {} and table["settings"][0]["diverged"] == [42]
    assert "| ga | 100000000.0 | None | 1 | 42 | diverged (seed 42) | — |" in (root / "sweep.md").read_text()


@pytest.mark.parametrize("overrides, line", [
    (["unlearn_args=[lr\\=1]"], "unlearn_args sets lr, which the sweep sets; give lr as a sweep key"),
    (["unlearn_args=[lrr\\=1]"], "unlearn_args: unknown key 'lrr' (did you mean lr?)"),
    (["eval_args=[model_path\\=x]"], "eval_args sets model_path, which the sweep sets"),
    (["eval_args=[max_samples\\=many]"], "eval_args: Error merging override max_samples=many"),
    (["eval_args=[max_samples\\=0]"], "max_samples=0 must be a positive integer or null"),
    (["hyper_param=1", "forget_loss=ga"], "hyper_param=1.0: not read by forget_loss=ga"),
    (["select=best"], "select='best'; expected one of ['aues', 'mu95']"),
    (["retain_result=null"], "retain_result=None; expected the retain model's eval JSON"),
])
def test_config_errors_are_one_line_before_any_work(tmp_path, tiny_path, overrides, line):
    retain = tmp_path / "retain.json"
    retain.write_text("{}")
    cfg = compose_config("sweep_tofu", [f"model_path={tiny_path}", f"retain_result={retain}", DATA,
                                        f"save_root={tmp_path / 'sweep'}", *overrides])
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None), \
            pytest.raises(ConfigError) as err:
        sweep.run_setting(cfg)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)
    assert not (tmp_path / "sweep").exists()
