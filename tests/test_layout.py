"""layout.py: the names of run directories, checkpoints, masks and eval results, from Python and from its CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

import layout
from io_utils import run_main


def _cli(capsys, *args: str) -> SimpleNamespace:
    """`python layout.py *args` in-process: its exit status, stdout and stderr."""
    code = 0
    try:
        run_main(lambda: layout.main(list(args)))
    except SystemExit as exit_info:
        code = exit_info.code
        if isinstance(code, str):  # what the interpreter does with SystemExit("message")
            print(code, file=sys.stderr)
            code = 1
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def _checkpoint(run: Path, step: int, final: bool = False, state: bool = False) -> Path:
    path = layout.checkpoint_path(run, step)
    path.mkdir(parents=True)
    (path / layout.INFO_FILE).write_text(json.dumps({"step": step, "final": final}))
    if state:
        (path / layout.STATE_FILE).write_bytes(b"")
    return path


def test_layout_does_not_import_torch(processes):
    # The scripts call it for every name they need; torch would add ~5 s to each call.
    code = "import sys, layout; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_save_root_the_user_set_is_honoured_for_a_checkpoint_model_path(tmp_path):
    c = {"output_dir": None, "mask_path": None, "batch_size": 4, "grad_accum": 2, "forget_split": "forget01",
         "forget_loss": "npo", "lora_r": 0, "lr": 1e-5, "weight_decay": 0.01, "epochs": 5, "model_family": "tiny",
         "model_path": str(tmp_path / "theta" / "checkpoint-5")}
    leaf = "forget01/npo/lora_r0/masked_False/lr_1e-05_wd_0.01_ep_5_bs_16"
    assert layout.run_dir({**c, "save_root": None}, 2) == tmp_path / "theta" / "checkpoint-5" / leaf
    assert layout.run_dir({**c, "save_root": str(tmp_path / "runs")}, 2) == tmp_path / "runs/tiny/TOFU/default" / leaf
    assert layout.run_dir({**c, "save_root": None, "model_path": None}, 2) == Path(".") / "tiny/TOFU/default" / leaf
    masked = {**c, "save_root": "r", "mask_path": "/m/x_mask_normal_0.1_s1.pt", "output_dir": None}
    assert layout.run_dir(masked, 1).parts[-2] == "masked_x_mask_normal_0.1_s1"
    assert layout.run_dir({**c, "output_dir": str(tmp_path / "o"), "save_root": None}, 2) == tmp_path / "o"


def test_a_sweep_names_every_axis_it_varies():
    c = {"forget_loss": "npo", "mask_path": "/m/x_mask_normal_0.1_s1.pt", "lr": 1e-05, "hyper_param": 0.1,
         "epochs": 5, "seed": 3}
    assert layout.sweep_run_dir("/s", c) == Path("/s/npo/masked_x_mask_normal_0.1_s1/lr_1e-05_hp_0.1_ep_5_s3")
    assert layout.sweep_run_dir("s", {**c, "mask_path": None}).parts[-2] == "masked_False"


def test_checkpoints_final_and_resumable(tmp_path):
    run = tmp_path / "run"
    assert layout.checkpoints(run) == [] and layout.final_checkpoint(run) is None
    for step in (9, 10, 5):
        _checkpoint(run, step, state=step == 10)
    (run / "checkpoint-11").mkdir()  # no trainer_state.json: not written by a finished save
    (run / ".checkpoint-12.abc.tmp").mkdir()
    (run / "checkpoint-x").mkdir()
    assert [step for step, _ in layout.checkpoints(run)] == [5, 9, 10]  # by number, not by string
    assert layout.resumable_checkpoint(run) == run / "checkpoint-10"
    assert layout.final_checkpoint(run) is None  # an interrupted run: the highest step is not final
    _checkpoint(run, 8, final=True)
    assert layout.final_checkpoint(run) == run / "checkpoint-8"


def test_mask_and_eval_paths(tmp_path):
    assert (layout.mask_path("/m", "grad_down", "llama2", "forget10", "global", 0.1, 3)
            == "/m/grad_down/llama2/TOFU/default/forget10/grad_down_mask_global_0.1_s3.pt")
    assert layout.mask_path("m", "a", "f", "s", "normal", 1, 0).endswith("a_mask_normal_1.0_s0.pt")
    assert layout.eval_path("/x/ckpt", "forget01") == Path("/x/ckpt/eval_results/eval_forget01.json")
    assert layout.eval_path("/x/ckpt", "forget01", "/o") == Path("/o/eval_forget01.json")
    assert layout.EVAL_RESULT_RE.fullmatch(layout.eval_path("m", "forget10").name)


def test_cli(tmp_path, capsys):
    run = tmp_path / "run with space"
    for step in (10, 9):
        _checkpoint(run, step, final=step == 10)
    assert _cli(capsys, "checkpoints", str(run)).stdout.splitlines() == [str(run / "checkpoint-9"),
                                                                         str(run / "checkpoint-10")]
    assert _cli(capsys, "final", str(run)).stdout.strip() == str(run / "checkpoint-10")
    unfinished = tmp_path / "unfinished"
    _checkpoint(unfinished, 3)
    done = _cli(capsys, "final", str(unfinished))
    assert done.returncode == 1 and "holds no checkpoint marked final" in done.stderr and not done.stdout
    missing = _cli(capsys, "checkpoints", str(run), str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: run directory {tmp_path / 'nowhere'} does not exist"
    assert _cli(capsys, "eval-path", "--forget-split", "forget01", "a", "b c").stdout.splitlines() == [
        "a/eval_results/eval_forget01.json", "b c/eval_results/eval_forget01.json"]
    masks = _cli(capsys, "mask-path", "--mask-root", "R", "--attribution", "random_down", "--model-family", "tiny",
                 "--forget-split", "forget01", "--variant", "random_complement", "--ratio", "0.10", "--seed", "2")
    assert masks.stdout.strip() == layout.mask_path("R", "random_down", "tiny", "forget01", "random_complement", 0.1, 2)


@pytest.mark.parametrize("ratio", ["0.1", "1", "0.05"])
def test_cli_mask_path_matches_what_generate_mask_writes(capsys, ratio):
    # generate_mask.py passes the config's ratio as Hydra parsed it (a float): the CLI must spell it the same way.
    done = _cli(capsys, "mask-path", "--mask-root", "R", "--attribution", "a", "--model-family", "f",
                "--forget-split", "s", "--ratio", ratio, "--seed", "1")
    assert done.stdout.strip() == layout.mask_path("R", "a", "f", "s", "normal", float(ratio), 1)
