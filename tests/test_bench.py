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
    # today's code against the reference revision's: the same masks, within float rounding of the scores
    for name in ATTRIBUTIONS:
        assert re.search(rf"^\| {name} \|( [^|]+ \|){{4}} [\d.]+x \| [\d.e+-]+ \| True \|$", out, re.M), name
        assert re.search(rf"^\| {name} \(reference\) \| [\d.]+ \| [\d.]+x \|", out, re.M), name


def test_bench_masks_wide_prints_peak_memory_ratios(tiny_path):
    out = _run("bench/bench_masks.py", tiny_path, "--wide", "2", "64", "128", "--methods", "memflex_down", "random_down")
    for name in ("memflex_down", "random_down"):
        assert re.search(rf"^\| {name} \| [\d.]+ MiB \| [\d.]+ MiB \| ([\d.]+x|n/a) \| [\d.e+-]+ \| True \|$", out, re.M), name


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
