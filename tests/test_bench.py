"""The benchmark scripts run end to end at their smallest settings and print their ratio lines."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import run_script
from mask_generator import ATTRIBUTIONS

# Mostly imports of torch and transformers (three processes for bench_unlearn); ~35 s together on 2 busy cores.
TIMEOUT_S = 120


def _run(script: str, tiny_path: Path, *extra: str) -> str:
    proc = run_script(script, "--model_path", str(tiny_path), "--data_path", "synthetic", "--n_examples", "8", *extra,
                      timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# ") and "command: " in proc.stdout and "torch threads 1" in proc.stdout
    return proc.stdout


def test_bench_masks_prints_a_ratio_for_every_method(tiny_path):
    out = _run("bench/bench_masks.py", tiny_path, "--ig_steps", "2", "--repeats", "1")
    for name in ["forward+backward", *ATTRIBUTIONS]:
        assert re.search(rf"^\| {re.escape(name)} \| [\d.]+ \| [\d.]+x \| [\d.]+ \| ", out, re.M), name
    assert re.search(r"^\| forward\+backward \| [\d.]+ \| 1\.00x \|", out, re.M)


def test_bench_unlearn_prints_state_time_and_memory_ratios(tiny_path):
    out = _run("bench/bench_unlearn.py", tiny_path, "--steps", "3", "--warmup", "1", "--ref_steps", "2",
               "--batch_size", "8")
    state = re.search(r"^optimizer state ratio masked/full: ([\d.]+) \(goal <= 0\.05: met\)$", out, re.M)
    # Deterministic, unlike the timings: 10% of 2 x 512 value vectors against every parameter of the tiny model.
    assert state and float(state.group(1)) <= 0.05
    assert re.search(r"^step time ratio masked/full: [\d.]+ mean, [\d.]+ median \(goal <= 1\.0: (met|NOT met)\)$",
                     out, re.M)
    assert re.search(r"^peak RSS ratio resident/cached: [\d.]+ ", out, re.M)
    assert re.search(r"^analytical saving of the cache: one model's parameters = [\d,]+ B", out, re.M)


def test_bench_finetune_prints_a_ratio_for_every_setting(tiny_path):
    proc = run_script("bench/bench_finetune.py", "--model_path", str(tiny_path), "--data_path", "synthetic",
                      "--split", "forget01", "--steps", "2", "--warmup", "1", "--threads", "1", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("baseline (random batches, full logits)", "answer-only head", "length-grouped batches",
                 "both (unlearn.py, tiny)"):
        assert re.search(rf"^\| {re.escape(name)} \| \d+ \| [\d.]+ \| [\d.]+x \| [\d.]+ \|$", proc.stdout, re.M), name
    assert re.search(r"^\| baseline \(random batches, full logits\) \| \d+ \| [\d.]+ \| 1\.00x \|", proc.stdout, re.M)


def test_bench_checkpoints_prints_the_disk_ratio(tiny_path):
    proc = run_script("bench/bench_checkpoints.py", "--model_family", "tiny", "--epochs", "1", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported compact checkpoint equals the full one: yes" in proc.stdout
    ratio = re.search(r"^disk ratio compact/full: ([\d.]+) \(goal <= 0\.15: met\)$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) <= 0.15  # deterministic: 10% of the value vectors against the model


def test_bench_trajectory_prints_the_speed_up_and_agreement(tiny_path):
    proc = run_script("bench/bench_trajectory.py", "--data_path", "synthetic", "--checkpoints", "1", "--eval_args",
                      "max_samples=2 max_new_tokens=2 splits=[forget,retain]", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^per-sample values: max \|difference\| 0 \(goal <= 1e-06: met\)$", proc.stdout, re.M)
    assert re.search(r"^speed-up one process / one process per model: [\d.]+x \(goal >= 2\.0: (met|NOT met)\)$",
                     proc.stdout, re.M)
