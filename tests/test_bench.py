"""The benchmark scripts run end to end at their smallest settings and print their ratio lines."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from conftest import ROOT

from mask_generator import ATTRIBUTIONS

sys.path.insert(0, str(ROOT / "bench"))
from common import LLAMA31_8B_PARAMS  # noqa: E402

from gpu_check import CHECKS  # noqa: E402

# Mostly imports of torch and transformers (three processes for bench_unlearn); ~35 s together on 2 idle cores. The
# integration tier runs two tests at a time and gpu_check's first DeepSpeed use builds an op (torch_extensions): a
# timeout there kills the build and leaves its lock behind, which stalls every later DeepSpeed run, so it is generous.
TIMEOUT_S = 300


def _run(run_script, script: str, tiny_path: Path, *extra: str) -> str:
    proc = run_script(script, "--model_path", str(tiny_path), "--data_path", "synthetic", "--n_examples", "8", *extra,
                      timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# ") and "command: " in proc.stdout and "torch threads 1" in proc.stdout
    return proc.stdout


def test_bench_masks_prints_a_ratio_for_every_method(run_script, tiny_path):
    out = _run(run_script, "bench/bench_masks.py", tiny_path, "--ig_steps", "2", "--repeats", "1")
    for name in ["forward+backward", *ATTRIBUTIONS]:
        assert re.search(rf"^\| {re.escape(name)} \| [\d.]+ \| [\d.]+x \| [\d.]+ \| ", out, re.M), name
    assert re.search(r"^\| forward\+backward \| [\d.]+ \| 1\.00x \|", out, re.M)
    # today's code against the reference revision's: the same masks, within float rounding of the scores
    for name in ATTRIBUTIONS:
        assert re.search(rf"^\| {name} \|( [^|]+ \|){{4}} [\d.]+x \| [\d.e+-]+ \| True \|$", out, re.M), name
        assert re.search(rf"^\| {name} \(reference\) \| [\d.]+ \| [\d.]+x \|", out, re.M), name


def test_bench_masks_wide_prints_peak_memory_ratios(run_script, tiny_path):
    out = _run(run_script, "bench/bench_masks.py", tiny_path, "--wide", "2", "64", "128", "--methods", "memflex_down",
               "random_down")
    for name in ("memflex_down", "random_down"):
        row = rf"^\| {name} \| [\d.]+ MiB \| [\d.]+ MiB \| ([\d.]+x|n/a) \| [\d.e+-]+ \| True \|$"
        assert re.search(row, out, re.M), name


def test_bench_unlearn_prints_state_time_and_memory_ratios(run_script, tiny_path):
    out = _run(run_script, "bench/bench_unlearn.py", tiny_path, "--steps", "3", "--warmup", "1", "--ref_steps", "2",
               "--batch_size", "8")
    state = re.search(r"^optimizer state ratio masked/full: ([\d.]+) \(goal <= 0\.05: met\)$", out, re.M)
    # Deterministic, unlike the timings: 10% of 2 x 512 value vectors against every parameter of the tiny model.
    assert state and float(state.group(1)) <= 0.05
    assert re.search(r"^step time ratio masked/full: [\d.]+ mean, [\d.]+ median \(goal <= 1\.0: (met|NOT met)\)$",
                     out, re.M)
    assert re.search(r"^peak RSS ratio resident/cached: [\d.]+ ", out, re.M)
    assert re.search(r"^analytical saving of the cache: one model's parameters = [\d,]+ B", out, re.M)


def test_bench_finetune_prints_a_ratio_for_every_setting(run_script, tiny_path):
    proc = run_script("bench/bench_finetune.py", "--model_path", str(tiny_path), "--data_path", "synthetic",
                      "--split", "forget01", "--steps", "2", "--warmup", "1", "--threads", "1", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("baseline (random batches, full logits)", "answer-only head", "length-grouped batches",
                 "both (unlearn.py, tiny)"):
        assert re.search(rf"^\| {re.escape(name)} \| \d+ \| [\d.]+ \| [\d.]+x \| [\d.]+ \|$", proc.stdout, re.M), name
    assert re.search(r"^\| baseline \(random batches, full logits\) \| \d+ \| [\d.]+ \| 1\.00x \|", proc.stdout, re.M)


def test_bench_eval_prints_the_mia_on_off_time_ratio(run_script, tiny_path):
    proc = run_script("bench/bench_eval.py", "--model_path", str(tiny_path), "--data_path", "synthetic", "--mia",
                      "--max_samples", "4", "--repeats", "2", "--threads", "1", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\| 2 \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \| [\d.]+ \| [\d.]+ \|$", proc.stdout, re.M)
    assert re.search(r"^MIA on/off evaluation time ratio: [\d.]+ wall, [\d.]+ CPU \(medians over pairs; "
                     r"goal <= 1\.15: (met|NOT met)\)$", proc.stdout, re.M)


def test_bench_memory_counts_the_real_shapes_and_partitions_zero2(run_script):
    # 2 x 64 tokens: the fewest at which a step's activations outweigh its lm_head gradient (bench_memory's docstring).
    proc = run_script("bench/bench_memory.py", "--family", "llama3.1-8b-inst", "--widths", "64,32", "--batch", "2",
                      "--seq_len", "64", timeout=3 * TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[2].replace(",", "").isdigit():
            rows[cells[0], cells[1]] = cells
    # Published counts: Llama-3.1-8B's parameters; 10% of its 32 x 14336 value vectors of 4096; LoRA r=8 on all
    # seven projections (peft's count for Llama-3-8B).
    assert {int(r[2].replace(",", "")) for r in rows.values()} == {LLAMA31_8B_PARAMS}
    assert rows["masked 10%, cached reference NLLs (npo)", "any"][3] == "187,904,000"
    assert rows["LoRA r=8, npo", "any"][3] == "20,971,520"
    # bf16 weights: 2 B each; ZeRO-2 divides gradients and optimizer state (fp32 masters + 2 Adam moments) by N.
    one, eight = rows["full fine-tune, ZeRO-2", "1"], rows["full fine-tune, ZeRO-2", "8"]
    assert float(one[4]) == round(LLAMA31_8B_PARAMS * 2 / 2**30, 2) and float(one[5]) == float(one[4])
    assert float(one[6]) == round(LLAMA31_8B_PARAMS * 12 / 2**30, 2)
    assert abs(float(eight[6]) - float(one[6]) / 8) <= 0.01 and eight[4] == one[4]
    resident = rows["masked 10%, resident reference model (kl)", "any"]
    cached = rows["masked 10%, cached reference NLLs (npo)", "any"]
    assert abs(float(resident[4]) - float(cached[4]) - float(one[4])) <= 0.01  # a second bf16 model
    assert all(float(r[7]) > 0 for r in rows.values())  # activations per token, fitted
    assert re.search(r"^masked checkpoint on disk \(bf16\): compact [\d.]+ GiB .* vs full [\d.]+ GiB: 0\.02\d\dx$",
                     proc.stdout, re.M)


def test_gpu_check_tiny_runs_every_check_on_the_cpu(run_script):
    proc = run_script("bench/gpu_check.py", "--tiny", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["check"], r["shape"]) for r in results] == [(name, family) for name, family, _ in CHECKS]
    for r in results:
        assert r["device"] == "cpu" and r["peak_gib"] is None
    masked = [r for r in results if r["check"] == "masked_npo"]
    # Adam's steps move every fp32 master; bf16 rounding hides some of those moves in the checkpoint.
    assert all(r["changed_fp32_masters"] == 1.0 and 0 < r["changed_bf16_checkpoint"] < 1.0 for r in masked)
    full = next(r for r in results if r["check"] == "full_deepspeed")
    assert full["bf16"] and full["zero_stage"] == 2
    evaluation = next(r for r in results if r["check"] == "evaluation")
    assert evaluation["generations"] == evaluation["scored_sequences"]


def test_bench_checkpoints_prints_the_disk_ratio(run_script, tiny_path):
    proc = run_script("bench/bench_checkpoints.py", "--model_family", "tiny", "--epochs", "1", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported compact checkpoint equals the full one: yes" in proc.stdout
    ratio = re.search(r"^disk ratio compact/full: ([\d.]+) \(goal <= 0\.15: met\)$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) <= 0.15  # deterministic: 10% of the value vectors against the model


def test_bench_trajectory_prints_the_speed_up_and_agreement(run_script, tiny_path):
    proc = run_script("bench/bench_trajectory.py", "--data_path", "synthetic", "--checkpoints", "1", "--eval_args",
                      "max_samples=2 max_new_tokens=2 splits=[forget,retain]", timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^per-sample values: max \|difference\| 0 \(goal <= 1e-06: met\)$", proc.stdout, re.M)
    assert re.search(r"^speed-up one process / one process per model: [\d.]+x \(goal >= 2\.0: (met|NOT met)\)$",
                     proc.stdout, re.M)


def test_bench_switch_prints_each_arm_against_a_swap(run_script):
    proc = run_script("bench/bench_switch.py", "--layers", "2", "--divisor", "64", "--checkpoints", "2",
                      timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama3.1-8b-inst, 2 layers, d_model 64, bf16" in proc.stdout
    for arm in ("read from the disk: imports", "in the page cache (mean of 2:"):
        assert re.search(rf"^\| a fresh process, θ_o {re.escape(arm)}.* \| [\d.]+ \| \d+x \|$", proc.stdout, re.M), arm
    assert re.search(r"^\| one process, each later one: .* \| [\d.]+ \| 1x \|$", proc.stdout, re.M)


def test_bench_localization_prints_a_row_per_mask_and_writes_json(run_script, tiny_path, tmp_path):
    import torch

    from masks import make_meta, save_mask

    paths = []
    masks = {"first": [torch.arange(10), torch.arange(5)], "last": [torch.arange(500, 512), torch.tensor([0])]}
    for name, indices in masks.items():
        paths.append(tmp_path / f"{name}.pt")
        save_mask(paths[-1], indices, make_meta("test", "normal", 0.01, 0, "tiny", 2, 512, "forget01", "synthetic"))
    out = tmp_path / "localization.json"
    proc = run_script("bench/bench_localization.py", "--model_path", str(tiny_path), "--data_path", "synthetic",
                      "--forget_split", "forget01", "--retain_subset", "8", "--seeds", "2", "--threads", "1",
                      "--masks", *map(str, paths), "--out", str(out), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# ") and "40 forget01 and 8 retain99 examples" in proc.stdout
    rows = re.findall(r"^\| (first|last) \| (\d+) \|.*\| (yes|no \(.*\)) \|$", proc.stdout, re.M)
    assert [(name, int(n)) for name, n, _ in rows] == [("first", 15), ("last", 13)]
    result = json.loads(out.read_text())
    assert set(result["masks"]) == {"first", "last"} and len(result["masks"]["first"]["random"]) == 2
