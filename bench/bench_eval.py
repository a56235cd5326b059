"""Benchmark of the TOFU evaluator: a full forget10 evaluation of a tiny model, then the batched evaluator against a
one-sample-at-a-time loop over the same metrics on the first N rows of every split, checked to agree. With --mia:
instead, the full forget10 evaluation timed with membership inference off and on (against holdout10), alternately,
and the on/off time ratio.

    python bench/bench_eval.py --data_path ../shared/data/tofu [--subset 16] [--model_path DIR] [--threads 2]
    python bench/bench_eval.py --data_path ../shared/data/tofu --model_path DIR --mia [--repeats 3]

The loop is written independently of evaluator.py (full-vocabulary log-softmax of one unpadded sequence at a time,
argmax for ES, generate() on one prompt with the default dynamic cache), so agreement also cross-checks the
batched implementation. Only dataloader.encode_qa (formatting) and metrics.py (formulas) are shared.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/bench_eval.py`, which puts bench/ (not the repo root) on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Idle OpenMP threads spin for the CPU by default; on a machine shared with other jobs that slows a 2-thread run
# several-fold. Passive waiting keeps the thread count; set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

import evaluator as E  # noqa: E402
import metrics as M  # noqa: E402
from dataloader import IGNORE_INDEX, encode_qa  # noqa: E402
from models import family_config, load_model, load_tokenizer, resolve_model_path  # noqa: E402
from tofu import load_tofu  # noqa: E402

DATA = {"forget": "forget10_perturbed", **E.SPLIT_DATA}
TOLERANCE = 1e-5
MIA_GOAL = 1.15  # evaluation time with MIA on / off
# Scores in [0, 1] are compared absolutely: near r = 1, 1 - r turns a 1e-6 relative change of r into a large
# relative one.
BOUNDED = ("truth_ratio_score", "rouge_l_recall", "es")


@torch.no_grad()
def one_at_a_time(model, tokenizer, family, split: str, rows: list[dict], settings: E.EvalSettings) -> dict:
    """The split's per-sample metrics, one unpadded sequence per forward pass and one prompt per generate()."""
    factual = split in E.FACTUAL_SPLITS
    config = GenerationConfig(do_sample=False, max_new_tokens=settings.max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out: dict[str, list] = {k: [] for k in ("prob", "truth_ratio", "truth_ratio_score", "generation", "es")}
    for row in tqdm(rows, desc=f"one at a time: {split}", leave=False):
        variants = [row["answer"], *([] if factual else [row["paraphrased_answer"]]), *row["perturbed_answer"]]
        probs, es = [], None
        for i, text in enumerate(variants):
            enc = encode_qa(tokenizer, family, row["question"], text, settings.max_length)
            logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :-1].float()
            labels = torch.tensor(enc["labels"][1:])
            answer = labels != IGNORE_INDEX
            logp = logits.log_softmax(-1)[answer].gather(-1, labels[answer, None]).squeeze(-1)
            probs.append(float(M.answer_prob([-logp.mean().item()])[0]))
            if i == 0:
                correct = (logits[answer].argmax(-1) == labels[answer]).numpy()
                es = M.extraction_strength(correct, settings.es_convention)
                start = next(j for j, label in enumerate(enc["labels"]) if label != IGNORE_INDEX)
                prompt = torch.tensor([enc["input_ids"][:start]])
        if factual:
            p_para, p_pert = probs[0], probs[1:]
            out["prob"].append(float(M.normalized_true_prob([probs[0]], [p_pert])[0]))
        else:
            p_para, p_pert = probs[1], probs[2:]
            out["prob"].append(probs[0])
        ratio = float(M.truth_ratio([p_para], [p_pert])[0])
        out["truth_ratio"].append(ratio)
        kind = "forget" if split == "forget" else "retain"
        out["truth_ratio_score"].append(float(M.truth_ratio_score([ratio], kind)[0]))
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        out["generation"].append(tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True))
        out["es"].append(es)
    out["rouge_l_recall"] = M.rouge_l_recall(out["generation"], [r["answer"] for r in rows]).tolist()
    return out


def compare(split: str, batched: dict, single: dict) -> None:
    for key, values in single.items():
        if key == "es" and "es" not in batched:
            continue
        if key == "generation":
            differing = [i for i, (a, b) in enumerate(zip(batched[key], values)) if a != b]
            assert not differing, f"{split}: generations differ at rows {differing}"
        else:
            rtol, atol = (0.0, TOLERANCE) if key in BOUNDED else (TOLERANCE, 0.0)
            np.testing.assert_allclose(batched[key], values, rtol=rtol, atol=atol, err_msg=f"{split}.{key}")


def mia_ratio(model, tokenizer, family, data: dict, holdout: list[dict], settings: E.EvalSettings,
              repeats: int) -> None:
    """Time run_evaluation without and with the holdout split (MIA off / on) in adjacent pairs, alternating which goes
    first, and print each pair and the median of the pairs' on/off ratios, in wall and in CPU time."""
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for r in range(repeats):
        for label in ("off", "on") if r % 2 == 0 else ("on", "off"):
            runs = data if label == "off" else {**data, E.HOLDOUT: holdout}
            wall, cpu = time.perf_counter(), time.process_time()
            E.run_evaluation(model, tokenizer, family, runs, settings)
            times[label].append((time.perf_counter() - wall, time.process_time() - cpu))
    n = sum(len(rows) for rows in data.values())
    print(f"## full forget10 evaluation ({n} questions), MIA off vs on ({len(holdout)} holdout10 answers, "
          f"mia_k={settings.mia_k}); {repeats} adjacent pairs, alternating order")
    print("| pair | MIA off s (CPU s) | MIA on s (CPU s) | ratio wall | ratio CPU |\n|---|---|---|---|---|")
    ratios = []
    for r, ((off, off_cpu), (on, on_cpu)) in enumerate(zip(times["off"], times["on"])):
        ratios.append((on / off, on_cpu / off_cpu))
        print(f"| {r + 1} | {off:.1f} ({off_cpu:.1f}) | {on:.1f} ({on_cpu:.1f}) | {on / off:.3f} | "
              f"{on_cpu / off_cpu:.3f} |")
    # Pairs are adjacent in time and the ratio is taken within each, so load that drifts between pairs cancels; CPU
    # time also leaves out the time other processes held the cores.
    wall, cpu = np.median(ratios, axis=0)
    print(f"\nMIA on/off evaluation time ratio: {wall:.3f} wall, {cpu:.3f} CPU (medians over pairs; goal <= "
          f"{MIA_GOAL}: {'met' if max(wall, cpu) <= MIA_GOAL else 'NOT met'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", default=os.environ.get("TOFU_DIR", str(ROOT / ".." / "shared" / "data" / "tofu")),
                   help="TOFU directory of JSON-lines files (default: $TOFU_DIR, else ../shared/data/tofu)")
    p.add_argument("--model_path", default=None, help="a tiny-family model (default: the initial tiny model)")
    p.add_argument("--subset", type=int, default=16, help="rows per split for the one-at-a-time comparison")
    p.add_argument("--skip_full", action="store_true", help="skip the full forget10 evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--mia", action="store_true", help="only time the full evaluation with MIA off and on (ratio)")
    p.add_argument("--repeats", type=int, default=3, help="--mia: evaluations of each kind, alternating (default 3)")
    p.add_argument("--max_samples", type=int, default=None, help="--mia: the first N rows of every split (default all)")
    args = p.parse_args()
    if args.subset < 1 or args.repeats < 1 or (args.max_samples is not None and args.max_samples < 1):
        p.error("--subset, --repeats and --max_samples must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print("# eval_tofu evaluator: batched vs one sample at a time")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average (1/5/15 min) {load}")
    print(f"software: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")

    path = resolve_model_path("tiny", args.model_path, args.data_path)
    family = family_config("tiny")
    tokenizer = load_tokenizer("tiny", path)
    model = load_model(path, torch.device("cpu"))
    print(f"model: {path} ({model.num_parameters():,} parameters)\n")
    settings = E.EvalSettings(max_length=family["max_length"])
    data = {split: load_tofu(name, args.data_path)[: args.max_samples] for split, name in DATA.items()}
    if args.mia:
        mia_ratio(model, tokenizer, family, data, load_tofu("holdout10", args.data_path)[: args.max_samples], settings,
                  args.repeats)
        return

    if not args.skip_full:
        start = time.perf_counter()
        _, timing = E.run_evaluation(model, tokenizer, family, data, settings)
        total = time.perf_counter() - start
        n = sum(len(rows) for rows in data.values())
        print(f"## full forget10 evaluation (batched; {settings})")
        print("| split | samples | s | samples/s |\n|---|---|---|---|")
        for split, t in timing.items():
            print(f"| {split} | {t['samples']} | {t['seconds']:.1f} | {t['samples_per_s']:.1f} |")
        print(f"| all four, with ES | {n} | {total:.1f} | {n / total:.1f} |\n")

    subset = {split: rows[: args.subset] for split, rows in data.items()}
    start = time.perf_counter()
    batched, batched_timing = E.run_evaluation(model, tokenizer, family, subset, settings)
    batched_s = time.perf_counter() - start
    single_timing, single = {}, {}
    for split, rows in subset.items():
        start = time.perf_counter()
        single[split] = one_at_a_time(model, tokenizer, family, split, rows, settings)
        single_timing[split] = time.perf_counter() - start
        compare(split, batched[split], single[split])
    single_s = sum(single_timing.values())

    print(f"## batched vs one at a time: the first {args.subset} rows of every split, the same metrics "
          f"(probabilities, truth ratio, {settings.max_new_tokens}-token greedy generation + ROUGE-L, ES)")
    print("| split | samples | batched s | one-at-a-time s | speed-up |\n|---|---|---|---|---|")
    for split, rows in subset.items():
        b, s = batched_timing[split]["seconds"], single_timing[split]
        print(f"| {split} | {len(rows)} | {b:.1f} | {s:.1f} | {s / b:.1f}x |")
    print(f"| all | {sum(len(r) for r in subset.values())} | {batched_s:.1f} | {single_s:.1f} | "
          f"{single_s / batched_s:.1f}x |")
    print(f"\nper-sample values agree (probabilities and truth ratios to a relative {TOLERANCE}, scores in [0, 1] "
          f"to an absolute {TOLERANCE}); generations are identical")


if __name__ == "__main__":
    main()
