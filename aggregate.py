"""Trade-off aggregation of unlearning runs: AUES and MU95 of each run's evaluated trajectory (theta_o, then its
checkpoints in step order), trade-off plots, and seed-paired comparisons of groups of runs. See docs/metrics.md.

    python aggregate.py runs --theta-o MODEL_DIR --retain-eval RETAIN.json --out OUT RUN_DIR [RUN_DIR ...]
    python aggregate.py compare --group oracle OUT_A/runs.json --group random OUT_B/runs.json --out cmp.json
    python aggregate.py methods --group activation A/runs.json --group wagle W/runs.json --group random R/runs.json \
        --baseline random
    python aggregate.py methods-plot npo=methods_npo.json wga=methods_wga.json --out table1.png   # Table 1 as a plot
    python aggregate.py compare-plot npo=compare_npo.json wga=compare_wga.json --out controlled.png  # seed by seed
    python aggregate.py injection --theta-r THETA_R_DIR --out injection.json THETA_O_DIR [THETA_O_DIR ...]
    python aggregate.py sweep --select aues SWEEP_ROOT    # the table of a sweep.py grid, the chosen setting per method
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import metrics as M
from io_utils import ConfigError, atomic_path, run_main, write_json
from layout import RUN_CONFIG, SWEEP_RESULT, SWEEP_TABLE, checkpoints, eval_path

THETA_O = "theta_o"
AUES_METHODS = ("front", "trapezoid")  # metrics.aues's `method`
SCORES = ("aues", "mu95")  # a run's trade-off scores (score_run), each summarised over seeds
SCORE_LABELS = ("AUES (higher is better)", "MU95 (log10 FQ; higher is better)")  # their axis labels, in that order
CSV_FIELDS = ("name", "run_dir", "seed", "aues", "mu95", "chosen_checkpoint", "final_fs", "final_rs", "final_mu",
              "final_fq", "final_log10fq", "final_privleak", "n_checkpoints")
RS_FS_PLOT = "rs_fs.png"
MU_FQ_PLOT = "mu_fq.png"
PRIVLEAK_PLOT = "privleak_rs.png"

Trajectory = list[tuple[str, int, dict[str, Any]]]


def _summary(path: Path, missing_hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {missing_hint}")
    return json.loads(path.read_text())["summary"]


def load_trajectory(run_dir: str | os.PathLike, theta_o_dir: str | os.PathLike,
                    forget_split: str = "forget10") -> Trajectory:
    """(label, step, eval summary) of theta_o (step 0) and then of every checkpoint of the run, in step order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    steps = checkpoints(run_dir)
    if not steps:
        raise ConfigError(f"{run_dir} has no checkpoint-<step> directories; expected an unlearning run directory")
    trajectory = [(THETA_O, 0, _summary(eval_path(theta_o_dir, forget_split),
                                        f"theta_o ({theta_o_dir}) has not been evaluated on {forget_split}"))]
    for step, path in steps:
        # scripts/eval.sh evaluates every checkpoint before aggregating, so a gap is a failed or interrupted eval.
        hint = f"checkpoint {path} has no evaluation on {forget_split}; rerun scripts/eval.sh to evaluate it"
        trajectory.append((path.name, step, _summary(eval_path(path, forget_split), hint)))
    return trajectory


def model_seed(model_dir: str | os.PathLike) -> int | None:
    """The `seed` in a checkpoint's run_config.json (written by unlearn.py), or None."""
    path = Path(model_dir) / RUN_CONFIG
    return json.loads(path.read_text()).get("seed") if path.is_file() else None


def run_seed(run_dir: str | os.PathLike) -> int | None:
    """The seed of the run's newest checkpoint that has a run_config.json, or None."""
    for _, path in reversed(checkpoints(run_dir)):
        if (path / RUN_CONFIG).is_file():
            return model_seed(path)
    return None


def _column(trajectory: Trajectory, key: str, why: str) -> np.ndarray:
    values = [summary.get(key) for _, _, summary in trajectory]
    missing = [label for (label, _, _), value in zip(trajectory, values) if value is None]
    if missing:
        raise ConfigError(f"{key} is missing for {', '.join(missing)}: {why}")
    return np.array(values, dtype=float)


def score_run(trajectory: Trajectory, aues_method: str = "front", mu_threshold: float = 0.95) -> dict[str, Any]:
    """AUES and MU95 of a trajectory from load_trajectory, the model MU95 picks, and the final checkpoint's numbers.

    The chosen checkpoint is the model whose log10 FQ is the MU95 value (the earliest one on a tie; theta_o when no
    checkpoint beats it). n_checkpoints does not count theta_o.
    """
    rs = _column(trajectory, "retain_strength", "AUES needs the evaluations to include the retain split")
    fs = _column(trajectory, "forget_strength", "AUES needs the evaluations to include the forget split")
    mu = _column(trajectory, "model_utility", "MU95 needs the retain, real_authors and world_facts splits")
    log10_fq = _column(trajectory, "log10_forget_quality", "MU95 needs forget quality for every model; give "
                       "retain_result=<the retain model's eval JSON> to the evals (scripts/eval.sh does)")
    mu95 = M.mu95(mu, log10_fq, theta_o_index=0, threshold=mu_threshold)
    # The same qualifying set as metrics.mu95, to name the model that attains it.
    qualifies = mu >= mu_threshold * mu[0]
    qualifies[0] = True
    chosen = int(np.flatnonzero(qualifies & (log10_fq == mu95))[0])
    final_label, _, final = trajectory[-1]
    return {
        "aues": M.aues(rs, fs, method=aues_method),
        "aues_method": aues_method,
        "mu95": mu95,
        "mu_threshold": mu_threshold,
        "chosen_checkpoint": trajectory[chosen][0],
        "chosen_step": trajectory[chosen][1],
        "final_checkpoint": final_label,
        "final_fs": final["forget_strength"],
        "final_rs": final["retain_strength"],
        "final_mu": final["model_utility"],
        "final_fq": final["forget_quality"],
        "final_log10fq": final["log10_forget_quality"],
        # null when the evaluations ran without MIA or without retain_result
        "final_privleak": final.get("privleak"),
        "n_checkpoints": len(trajectory) - 1,
        "trajectory": [{"label": label, "step": step, "rs": r, "fs": f, "mu": u, "log10_fq": q,
                        "privleak": summary.get("privleak")}
                       for (label, step, summary), r, f, u, q in zip(trajectory, rs, fs, mu, log10_fq)],
    }


def default_names(run_dirs: Sequence[str]) -> list[str]:
    """Short run names for tables and legends: the path components in which the runs differ."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    if len(parts) == 1:
        return [parts[0][-1]]
    shortest = min(map(len, parts))
    lead = 0
    while lead < shortest - 1 and len({p[lead] for p in parts}) == 1:
        lead += 1
    trail = 0
    # Leave every name at least one component, also when one run directory nests inside another.
    while lead + trail < shortest - 1 and len({p[-1 - trail] for p in parts}) == 1:
        trail += 1
    return ["/".join(p[lead:len(p) - trail]) for p in parts]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        # A pipe inside a cell (the |Δ| columns) would end the cell: escaped, it renders as a pipe.
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def write_csv(path: Path, records: Sequence[dict[str, Any]], fields: Sequence[str] = CSV_FIELDS) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot_runs(records: Sequence[dict[str, Any]], retain_summary: dict[str, Any], out: Path) -> None:
    """RS vs FS and MU vs log10 FQ, one line per run starting at theta_o (a black star), the retain model in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta_o = records[0]["trajectory"][0]
    threshold = records[0]["mu_threshold"]
    for name, x, y, xlabel, ylabel, retain_x, retain_y in (
            (RS_FS_PLOT, "rs", "fs", "Retain Strength (RS)", "Forget Strength (FS)", "retain_strength",
             "forget_strength"),
            (MU_FQ_PLOT, "mu", "log10_fq", "Model Utility (MU)", "log10 Forget Quality", "model_utility",
             "log10_forget_quality")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for record in records:
            points = record["trajectory"]
            ax.plot([p[x] for p in points], [p[y] for p in points], marker="o", ms=3, label=record["name"])
        ax.plot(theta_o[x], theta_o[y], "k*", ms=14, zorder=5, label="θ_o")
        if name == MU_FQ_PLOT:
            ax.axvline(threshold * theta_o["mu"], color="gray", ls="--", label=f"{threshold:.0%} of θ_o's MU")
        # The retain model is usually evaluated without a reference, so it has no forget quality: then only its MU.
        rx, ry = retain_summary.get(retain_x), retain_summary.get(retain_y)
        if rx is not None and ry is not None:
            ax.plot(rx, ry, "rD", ms=8, zorder=5, label="retain model")
        elif rx is not None:
            ax.axvline(rx, color="red", ls=":", label=f"retain model's {xlabel}")
        _save_plot(fig, ax, xlabel, ylabel, out / name)


def plot_privleak(records: Sequence[dict[str, Any]], out: Path) -> None:
    """privleak against RS, one line per run from theta_o; the retain model sits at privleak 0 by definition."""
    missing = [f"{r['name']}/{p['label']}" for r in records for p in r["trajectory"] if p["privleak"] is None]
    if missing:
        raise ConfigError(f"privleak is missing for {', '.join(missing)}: evaluate with mia=true and "
                          f"retain_result=<the retain model's eval JSON> (scripts/eval.sh passes it)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for record in records:
        points = record["trajectory"]
        ax.plot([p["rs"] for p in points], [p["privleak"] for p in points], marker="o", ms=3, label=record["name"])
    theta_o = records[0]["trajectory"][0]
    ax.plot(theta_o["rs"], theta_o["privleak"], "k*", ms=14, zorder=5, label="θ_o")
    ax.axhline(0.0, color="red", ls=":", label="retain model (0 by definition)")
    _save_plot(fig, ax, "Retain Strength (RS)", "privleak (%)", out / PRIVLEAK_PLOT)


def _save_plot(fig, ax, xlabel: str, ylabel: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _write_png(fig, path)


def _write_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)


def cmd_runs(args: argparse.Namespace) -> None:
    names = args.names or default_names(args.run_dirs)
    if len(names) != len(args.run_dirs):
        raise ConfigError(f"--names gives {len(names)} names for {len(args.run_dirs)} run directories")
    if len(set(names)) != len(names):
        raise ConfigError(f"run names must be distinct, got {names}")
    if not Path(args.retain_eval).is_file():
        raise ConfigError(f"--retain-eval {args.retain_eval} does not exist; expected the retain model's eval JSON")
    retain = json.loads(Path(args.retain_eval).read_text())
    if retain.get("config", {}).get("forget_split", args.forget_split) != args.forget_split:
        raise ConfigError(f"--retain-eval {args.retain_eval} evaluates {retain['config']['forget_split']}, "
                          f"not --forget-split {args.forget_split}")
    records = [{"name": name, "run_dir": str(run_dir), "seed": run_seed(run_dir),
                **score_run(load_trajectory(run_dir, args.theta_o, args.forget_split), args.aues, args.mu_threshold)}
               for name, run_dir in zip(names, args.run_dirs)]
    out = Path(args.out)
    write_json(out / "runs.json", {"forget_split": args.forget_split, "theta_o": str(args.theta_o),
                                   "retain_eval": str(args.retain_eval), "retain_summary": retain["summary"],
                                   "runs": records})
    write_csv(out / "runs.csv", records)
    plot_runs(records, retain["summary"], out)
    plots = [RS_FS_PLOT, MU_FQ_PLOT]
    if args.privleak_plot:
        plot_privleak(records, out)
        plots.append(PRIVLEAK_PLOT)
    print(_markdown(["run", "AUES", "MU95", "chosen", "final FS", "final RS", "final MU", "final log10 FQ",
                     "final privleak", "ckpts"],
                    [[r["name"], _fmt(r["aues"]), _fmt(r["mu95"]), r["chosen_checkpoint"], _fmt(r["final_fs"]),
                      _fmt(r["final_rs"]), _fmt(r["final_mu"]), _fmt(r["final_log10fq"]), _fmt(r["final_privleak"]),
                      str(r["n_checkpoints"])]
                     for r in records]))
    print(f"\nwrote {out / 'runs.json'}, {out / 'runs.csv'}, " + ", ".join(str(out / p) for p in plots))


def load_group(paths: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The scored runs of one group: from runs.json files, `runs --out` directories, or run directories."""
    records = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "runs.json").is_file():
            if args.theta_o is None:
                raise ConfigError(f"{path} is a run directory; scoring it needs --theta-o")
            score = score_run(load_trajectory(path, args.theta_o, args.forget_split), args.aues, args.mu_threshold)
            records.append({"name": str(path), "run_dir": str(path), "seed": run_seed(path), **score})
        elif path.is_dir() or path.is_file():
            records += json.loads((path / "runs.json" if path.is_dir() else path).read_text())["runs"]
        else:
            raise ConfigError(f"{path} does not exist; expected a runs.json, a `runs --out` directory or a run "
                              "directory")
    return records


def load_groups(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, *paths in args.group:
        if not paths or name in groups:
            raise ConfigError(f"--group {name}: each group needs a new name followed by at least one path")
        groups[name] = load_group(paths, args)
    # Scores computed with different AUES methods or MU thresholds are not comparable.
    settings = {(r["aues_method"], r["mu_threshold"]) for runs in groups.values() for r in runs}
    if len(settings) > 1:
        raise ConfigError(f"the runs were scored with different (AUES method, MU threshold): {sorted(settings)}")
    return groups


def pair_runs(a: list[dict[str, Any]], b: list[dict[str, Any]], by_position: bool
              ) -> tuple[str, list[tuple[Any, dict[str, Any], dict[str, Any]]]]:
    """("seed" | "position", [(seed or index, run of a, run of b)]): by seed when every run has one, else by order."""
    seeds_a, seeds_b = [r.get("seed") for r in a], [r.get("seed") for r in b]
    if not by_position and None not in seeds_a + seeds_b:
        for seeds, runs in ((seeds_a, a), (seeds_b, b)):
            if len(set(seeds)) != len(seeds):
                raise ConfigError(f"seeds {seeds} repeat within a group ({runs[0]['name']}, ...), so pairing by seed "
                                  f"is ambiguous; pass --pairing position to pair by the order given")
        if set(seeds_a) != set(seeds_b):
            raise ConfigError(f"the groups' seeds differ: {sorted(seeds_a)} vs {sorted(seeds_b)}")
        by_a, by_b = dict(zip(seeds_a, a)), dict(zip(seeds_b, b))
        return "seed", [(s, by_a[s], by_b[s]) for s in sorted(seeds_a)]
    if len(a) != len(b):
        raise ConfigError(f"pairing by position needs groups of one size, got {len(a)} and {len(b)} runs")
    return "position", [(i, ra, rb) for i, (ra, rb) in enumerate(zip(a, b))]


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def compare_paired(a: list[dict[str, Any]], b: list[dict[str, Any]], by_position: bool
                   ) -> tuple[str, list[tuple[Any, dict[str, Any], dict[str, Any]]], dict[str, dict[str, float]]]:
    """pair_runs(a, b), then metrics.compare_groups of a against b for each score: (pairing, pairs, {score: stats})."""
    pairing, pairs = pair_runs(a, b, by_position)
    stats = {key: M.compare_groups([ra[key] for _, ra, _ in pairs], [rb[key] for _, _, rb in pairs])
             for key in SCORES}
    return pairing, pairs, stats


def _pairs_json(pairs: list[tuple[Any, dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"pair": key, "a": ra["run_dir"], "b": rb["run_dir"],
             **{f"{score}_{side}": run[score] for score in SCORES for side, run in (("a", ra), ("b", rb))}}
            for key, ra, rb in pairs]


def cmd_compare(args: argparse.Namespace) -> None:
    groups = load_groups(args)
    if len(groups) != 2:
        raise ConfigError(f"compare takes exactly two --group options, got {len(groups)}")
    (name_a, a), (name_b, b) = groups.items()
    pairing, pairs, stats = compare_paired(a, b, args.pairing == "position")
    result = {"groups": [name_a, name_b], "pairing": pairing, "aues_method": a[0]["aues_method"],
              "mu_threshold": a[0]["mu_threshold"], "pairs": _pairs_json(pairs), **stats}
    print(_markdown(["", name_a, name_b, "|Δ|", "p"],
                    [[label, _pm(s["mean_a"], s["std_a"]), _pm(s["mean_b"], s["std_b"]),
                      _pm(s["abs_delta_mean"], s["abs_delta_std"]), f"{s['p_value']:.3f}"]
                     for label, s in (("AUES", stats["aues"]), ("MU95", stats["mu95"]))]))
    print(f"\n{len(pairs)} pairs by {pairing}; p: exact paired permutation test")
    if args.out:
        write_json(args.out, result)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # Sample std (ddof=1, 0 for one run), as metrics.compare_groups reports it.
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def cmd_methods(args: argparse.Namespace) -> None:
    groups = load_groups(args)
    if args.baseline is not None and args.baseline not in groups:
        raise ConfigError(f"--baseline {args.baseline} is none of the groups ({', '.join(groups)})")
    result = {}
    for name, runs in groups.items():
        aues_mean, aues_std = _mean_std([r["aues"] for r in runs])
        mu95_mean, mu95_std = _mean_std([r["mu95"] for r in runs])
        result[name] = {"n": len(runs), "aues_mean": aues_mean, "aues_std": aues_std, "mu95_mean": mu95_mean,
                        "mu95_std": mu95_std, "run_dirs": [r["run_dir"] for r in runs]}
        if args.baseline is not None and name != args.baseline:
            # The group is `a` and the baseline `b` of compare_groups, paired as `compare` pairs them.
            pairing, pairs, stats = compare_paired(runs, groups[args.baseline], args.pairing == "position")
            result[name]["vs_baseline"] = {"baseline": args.baseline, "pairing": pairing,
                                           "pairs": _pairs_json(pairs), **stats}
    header = ["method", "AUES", "MU95", "n"]
    if args.baseline is not None:
        header += [f"AUES |Δ| vs {args.baseline}", "AUES p", f"MU95 |Δ| vs {args.baseline}", "MU95 p"]
    rows = []
    for name, g in result.items():
        row = [name, _pm(g["aues_mean"], g["aues_std"]), _pm(g["mu95_mean"], g["mu95_std"]), str(g["n"])]
        if args.baseline is not None:
            vs = g.get("vs_baseline")
            row += ["—"] * 4 if vs is None else [
                cell for key in SCORES
                for cell in (_pm(vs[key]["abs_delta_mean"], vs[key]["abs_delta_std"]), f"{vs[key]['p_value']:.3f}")]
        rows.append(row)
    print(_markdown(header, rows))
    if pairings := {g["vs_baseline"]["pairing"] for g in result.values() if "vs_baseline" in g}:
        print(f"\n|Δ|, p: each method's runs paired with {args.baseline}'s by {' and '.join(sorted(pairings))}; "
              "p: exact paired permutation test")
    if args.out:
        write_json(args.out, result)


def plot_methods(tables: dict[str, dict[str, Any]], out: Path, title: str | None = None) -> None:
    """Table 1 as a figure: per loss (x) one point per method, AUES and MU95 mean ± std over seeds (two panels).
    tables: loss -> the JSON `methods --out` wrote for that loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for table in tables.values() for m in table))
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, ylabel in zip(axes, SCORES, SCORE_LABELS):
        for i, method in enumerate(methods):
            points = [(j, table[method]) for j, table in enumerate(tables.values()) if method in table]
            ax.errorbar([j - 0.4 + (i + 0.5) * width for j, _ in points], [r[f"{key}_mean"] for _, r in points],
                        yerr=[r[f"{key}_std"] for _, r in points], fmt="o", capsize=3, label=method)
        ax.set_xticks(range(len(tables)), list(tables))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    _write_png(fig, out)


def read_loss_tables(items: Sequence[str], kind: str) -> dict[str, Any]:
    """{loss: JSON} from LOSS=JSON arguments, each the file `aggregate.py <kind> --out` wrote for that loss."""
    tables = {}
    for item in items:
        loss, sep, path = item.partition("=")
        if not sep or not loss or not path:
            raise ConfigError(f"{kind}-plot takes LOSS=JSON (a `{kind} --out` file), got {item!r}")
        if not Path(path).is_file():
            raise ConfigError(f"no such {kind} JSON for {loss}: {path}")
        tables[loss] = json.loads(Path(path).read_text())
    return tables


def cmd_methods_plot(args: argparse.Namespace) -> None:
    plot_methods(read_loss_tables(args.tables, "methods"), Path(args.out), args.title)
    print(f"wrote {args.out}")


def plot_compare(tables: dict[str, dict[str, Any]], out: Path, title: str | None = None) -> None:
    """The controlled experiment seed by seed: per loss (x) each pair's two scores joined by a line, group a on the
    left and group b on the right, with how often a was ahead and the permutation p above them (two panels).
    tables: loss -> the JSON `compare --out` wrote for that loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {tuple(table["groups"]) for table in tables.values()}
    if len(names) != 1:
        raise ConfigError(f"compare-plot draws one pair of groups, the tables compare {sorted(names)}")
    (name_a, name_b), = names
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, ylabel in zip(axes, SCORES, SCORE_LABELS):
        for j, table in enumerate(tables.values()):
            a, b = ([p[f"{key}_{side}"] for p in table["pairs"]] for side in "ab")
            for ya, yb in zip(a, b):
                ax.plot([j - 0.15, j + 0.15], [ya, yb], color="0.6", linewidth=0.8)
            ax.scatter([j - 0.15] * len(a), a, color="C0", zorder=3, label=name_a if j == 0 else None)
            ax.scatter([j + 0.15] * len(b), b, color="C1", marker="s", zorder=3, label=name_b if j == 0 else None)
            ahead = sum(ya > yb for ya, yb in zip(a, b))
            ax.annotate(f"{ahead}/{len(a)}, p {table[key]['p_value']:.3f}", (j, max(a + b)), xytext=(0, 6),
                        textcoords="offset points", ha="center", fontsize=8)
        ax.margins(y=0.15)  # room for the labels above the highest point
        ax.set_xticks(range(len(tables)), list(tables))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=f"n/N: {name_a} ahead", title_fontsize=7)
    if title:
        fig.suptitle(title)
    _write_png(fig, out)


def cmd_compare_plot(args: argparse.Namespace) -> None:
    tables = read_loss_tables(args.tables, "compare")
    for loss, table in tables.items():
        if any(f"{SCORES[0]}_a" not in p for p in table["pairs"]):
            raise ConfigError(f"the compare JSON for {loss} has no per-pair scores (written before they were "
                              "added); run `aggregate.py compare --out` again")
    plot_compare(tables, Path(args.out), args.title)
    print(f"wrote {args.out}")


# Drops are differences of values read back from JSON: 0.99 - 0.94 is 0.05000000000000004, which must pass "≤ 0.05".
DROP_TOLERANCE = 1e-9


def cmd_injection(args: argparse.Namespace) -> None:
    """Each theta_o's Forget and Retain Strength next to theta_r's: the forget set must have gone in (Forget Strength
    down by at least --min-fs-drop) without taking retention with it (Retain Strength down by at most --max-rs-drop).
    Any theta_o that fails exits with status 1 after the table, naming the condition, so a controlled experiment
    stops before comparing regions of a model the injection did not change."""
    def strengths(model: str, role: str) -> dict[str, float]:
        summary = _summary(eval_path(model, args.forget_split),
                           f"{role} ({model}) has not been evaluated on {args.forget_split}; run scripts/eval.sh")
        values = {key: summary.get(key) for key in ("forget_strength", "retain_strength")}
        if None in values.values():
            raise ConfigError(f"{role} ({model}) has no forget/retain strength; evaluate the forget and retain splits")
        return values

    reference = strengths(args.theta_r, "theta_r")
    rows = []
    for model in args.theta_o_dirs:
        s = strengths(model, "theta_o")
        fs_drop = reference["forget_strength"] - s["forget_strength"]
        rs_drop = reference["retain_strength"] - s["retain_strength"]
        injected = bool(fs_drop >= args.min_fs_drop - DROP_TOLERANCE)
        kept = bool(rs_drop <= args.max_rs_drop + DROP_TOLERANCE)
        rows.append({"theta_o": str(model), "seed": model_seed(model), **s, "fs_drop": fs_drop, "rs_drop": rs_drop,
                     "forget_injected": injected, "retention_kept": kept, "verified": injected and kept})
    yes_no = {True: "yes", False: "no"}
    print(_markdown(["model", "seed", "Forget Strength", "Retain Strength", "FS drop", "RS drop",
                     f"FS drop ≥ {args.min_fs_drop:g}", f"RS drop ≤ {args.max_rs_drop:g}"],
                    [["theta_r", "", _fmt(reference["forget_strength"]), _fmt(reference["retain_strength"]), "", "", "",
                      ""]]
                    + [["theta_o", str(r["seed"]), _fmt(r["forget_strength"]), _fmt(r["retain_strength"]),
                        _fmt(r["fs_drop"]), _fmt(r["rs_drop"]), yes_no[r["forget_injected"]],
                        yes_no[r["retention_kept"]]] for r in rows]))
    verified = all(r["verified"] for r in rows)
    if args.out:
        write_json(args.out, {"forget_split": args.forget_split, "theta_r": str(args.theta_r), **reference,
                              "min_fs_drop": args.min_fs_drop, "max_rs_drop": args.max_rs_drop, "verified": verified,
                              "theta_o": rows})
    failures = []
    for r in rows:
        where = f"seed {r['seed']}" if r["seed"] is not None else r["theta_o"]
        if not r["forget_injected"]:
            failures.append(f"Forget Strength dropped by only {r['fs_drop']:.3f} (< {args.min_fs_drop:g}) in {where}")
        if not r["retention_kept"]:
            failures.append(f"Retain Strength dropped by {r['rs_drop']:.3f} (> {args.max_rs_drop:g}) in {where}")
    if failures:
        model = "an unchanged model" if not all(r["forget_injected"] for r in rows) else "a damaged model"
        raise SystemExit(f"injection failed: {'; '.join(failures)}; comparing regions of {model} would mean nothing")


SWEEP_SELECT = ("aues", "mu95")
SWEEP_CSV_FIELDS = ("method", "lr", "hyper_param", "epochs", "seeds", "aues", "aues_std", "mu95", "mu95_std",
                    "diverged", "chosen")
# A setting's runs must have been scored alike, against one theta_o and one retain model, to be ranked together.
SWEEP_SHARED = ("aues_method", "mu_threshold", "theta_o", "retain_result")


def selection_rule(select: str) -> str:
    """The rule select_settings applies, in words (printed above the table and stored in sweep.json)."""
    other = {"aues": "mu95", "mu95": "aues"}[select]
    return (f"per method, the setting (lr, hyper_param, epochs) with the highest {select} (mean over its seeds); "
            f"a tie goes to the higher mean {other}, then to fewer epochs, a lower lr, a lower hyper_param; a setting "
            f"whose loss diverged for any seed is not chosen")


def load_sweep(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every sweep.py result (SWEEP_RESULT) under `root`, checked to have been scored alike."""
    files = sorted(Path(root).rglob(SWEEP_RESULT))
    if not files:
        raise ConfigError(f"no {SWEEP_RESULT} under {root}; expected the save_root of a sweep.py run")
    results = [json.loads(path.read_text()) for path in files]
    for key in SWEEP_SHARED:
        values = sorted({str(r[key]) for r in results})
        if len(values) > 1:
            raise ConfigError(f"the results under {root} differ in {key} ({', '.join(values)}); one table ranks "
                              f"settings scored alike: give each {key} its own save_root")
    return results


def select_settings(results: Sequence[dict[str, Any]], select: str = "aues") -> list[dict[str, Any]]:
    """One row per method and setting (lr, hyper_param, epochs): AUES and MU95 as mean and sample std over its seeds,
    and `chosen` on the one row per method that selection_rule(select) picks."""
    if select not in SWEEP_SELECT:
        raise ConfigError(f"select={select!r}; expected one of {list(SWEEP_SELECT)}")
    other = {"aues": "mu95", "mu95": "aues"}[select]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        s = r["setting"]
        groups.setdefault((r["method"], s["lr"], s["hyper_param"], s["epochs"]), []).append(r)
    rows = []
    for (method, lr, hyper_param, epochs), runs in groups.items():
        seeds = sorted(r["setting"]["seed"] for r in runs)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{method} lr={lr} hyper_param={hyper_param} epochs={epochs} has seeds {seeds}: a seed "
                              f"repeats ({', '.join(sorted(r['run_dir'] for r in runs))})")
        diverged = sorted(r["setting"]["seed"] for r in runs if r.get("diverged"))
        # A setting that diverged for any seed has no mean to rank and is never chosen.
        scores = {k: (None, None) if diverged else _mean_std([r[k] for r in runs]) for k in SCORES}
        rows.append({"method": method, "lr": lr, "hyper_param": hyper_param, "epochs": epochs, "seeds": seeds,
                     "aues": scores["aues"][0], "aues_std": scores["aues"][1], "mu95": scores["mu95"][0],
                     "mu95_std": scores["mu95"][1], "diverged": diverged, "chosen": False,
                     "run_dirs": sorted(r["run_dir"] for r in runs)})
    # Cheapest first (fewer epochs, lower lr and hyper_param), so that max(), which keeps the first of equal
    # maxima, breaks a tie in the scores the way the rule says.
    rows.sort(key=lambda r: (r["method"], r["epochs"], r["lr"], r["hyper_param"] is not None, r["hyper_param"] or 0))
    for method in dict.fromkeys(r["method"] for r in rows):
        if ranked := [r for r in rows if r["method"] == method and not r["diverged"]]:
            max(ranked, key=lambda r: (r[select], r[other]))["chosen"] = True
    return rows


def write_sweep_table(root: str | os.PathLike, select: str, out: str | os.PathLike) -> str:
    """Score table of a sweep: OUT/sweep.md, sweep.csv and sweep.json; returns the markdown."""
    results = load_sweep(root)
    rows = select_settings(results, select)
    shared = {key: results[0][key] for key in SWEEP_SHARED}
    chosen = [r for r in rows if r["chosen"]]

    header = ["method", "lr", "hyper_param", "epochs", "seeds", "AUES", "MU95"]

    def cells(r: dict[str, Any]) -> list[str]:
        scores = ([f"diverged (seed {' '.join(map(str, r['diverged']))})", "—"] if r["diverged"] else
                  [_pm(r["aues"], r["aues_std"]), _pm(r["mu95"], r["mu95_std"])])
        return [r["method"], str(r["lr"]), str(r["hyper_param"]), str(r["epochs"]), " ".join(map(str, r["seeds"])),
                *scores]

    markdown = "\n\n".join([
        f"Selection rule (select={select}): {selection_rule(select)}. AUES ({shared['aues_method']}) and MU95 "
        f"(MU ≥ {shared['mu_threshold']:g} × MU(θ_o)): mean ± sample std over seeds.",
        "Chosen setting per method:", _markdown(header, [cells(r) for r in chosen]),
        "Every setting:", _markdown([*header, "chosen"], [[*cells(r), "yes" if r["chosen"] else ""] for r in rows])])
    out = Path(out)
    with atomic_path(out / f"{SWEEP_TABLE}.md") as tmp:
        tmp.write_text(markdown + "\n")
    write_csv(out / f"{SWEEP_TABLE}.csv", [{**r, **{k: " ".join(map(str, r[k])) for k in ("seeds", "diverged")}}
                                           for r in rows], SWEEP_CSV_FIELDS)
    write_json(out / f"{SWEEP_TABLE}.json", {"select": select, "rule": selection_rule(select), **shared,
                                             "chosen": {r["method"]: r for r in chosen}, "settings": rows})
    return markdown


def cmd_sweep(args: argparse.Namespace) -> None:
    out = Path(args.out or args.root)
    print(write_sweep_table(args.root, args.select, out))
    print(f"\nwrote {', '.join(str(out / f'{SWEEP_TABLE}.{ext}') for ext in ('md', 'csv', 'json'))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    split = argparse.ArgumentParser(add_help=False)
    split.add_argument("--forget-split", default="forget10", help="the evaluations to read (default: forget10)")
    scoring = argparse.ArgumentParser(add_help=False, parents=[split])
    scoring.add_argument("--aues", choices=AUES_METHODS, default="front",
                         help="AUES variant (docs/metrics.md; default: front)")
    scoring.add_argument("--mu-threshold", type=float, default=0.95,
                         help="MU95 keeps models with MU >= this x MU(theta_o) (default: 0.95)")

    runs = commands.add_parser(
        "runs", parents=[scoring],
        help="score evaluated runs; write runs.json, runs.csv and two plots",
        description="Score each run's trajectory (theta_o, then its checkpoint-<step> directories in step order, read "
                    "from <model>/eval_results/eval_<split>.json) and write OUT/runs.json, OUT/runs.csv, "
                    f"OUT/{RS_FS_PLOT} and OUT/{MU_FQ_PLOT} (and OUT/{PRIVLEAK_PLOT} with --privleak-plot).",
        epilog="example: aggregate.py runs --theta-o models/init --retain-eval models/retain/eval_results/"
               "eval_forget10.json --out results/gd runs/a runs/b --names oracle random")
    runs.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="unlearning run directories")
    runs.add_argument("--theta-o", required=True, metavar="DIR", help="the model before unlearning (evaluated)")
    runs.add_argument("--retain-eval", required=True, metavar="JSON", help="the retain model's eval JSON (plotted)")
    runs.add_argument("--out", required=True, metavar="DIR", help="output directory")
    runs.add_argument("--names", nargs="+", metavar="NAME",
                      help="one name per run, given after the run directories (default: the path parts that differ)")
    runs.add_argument("--privleak-plot", action="store_true",
                      help=f"also plot privleak against RS ({PRIVLEAK_PLOT}); every model needs privleak")
    runs.set_defaults(func=cmd_runs)

    group_help = ("NAME PATH [PATH ...]: a group of runs, repeatable. A PATH is a runs.json from `runs`, a "
                  "`runs --out` directory (all its runs belong to the group), or a run directory (scored now with "
                  "--theta-o, --forget-split, --aues and --mu-threshold).")
    compare = commands.add_parser(
        "compare", parents=[scoring],
        help="seed-paired comparison of two groups (mean ± std, |Δ|, permutation p)",
        description="Compare the AUES and MU95 of two groups of runs, paired by seed: the `seed` in each run's "
                    f"{RUN_CONFIG} when every run has one (the sets of seeds must match), else by the order the runs "
                    "are given (within a runs.json: its order). |Δ| is the mean over pairs of |a - b|; p is the exact "
                    "paired permutation test (metrics.compare_groups).",
        epilog="example: aggregate.py compare --group oracle results/oracle --group random results/random "
               "--out cmp.json")
    methods = commands.add_parser(
        "methods", parents=[scoring],
        help="AUES and MU95 (mean ± std over runs) per group; with --baseline, each group's |Δ| and p against it",
        description="One row per group (e.g. an attribution method): AUES and MU95, mean ± sample std over its runs. "
                    "With --baseline NAME, also every other group's |Δ| (mean ± std over pairs) and exact paired "
                    "permutation p against group NAME, for AUES and for MU95, the runs paired as `compare` pairs "
                    "them.",
        epilog="example: aggregate.py methods --group activation results/act --group memflex results/mf "
               "--group wagle results/wagle --group random results/random --baseline random --out methods.json")
    for sub, func in ((compare, cmd_compare), (methods, cmd_methods)):
        sub.add_argument("--group", action="append", nargs="+", required=True, metavar="NAME_OR_PATH", help=group_help)
        sub.add_argument("--theta-o", metavar="DIR", help="theta_o, for groups given as run directories")
        sub.add_argument("--out", metavar="FILE.json", help="also write the table's numbers here")
        sub.add_argument("--pairing", choices=("auto", "position"), default="auto",
                         help="auto: by seed when every run has one, else by position (default: auto)")
        sub.set_defaults(func=func)
    methods.add_argument("--baseline", metavar="NAME", help="the group the others are compared with (e.g. random)")
    methods_plot = commands.add_parser(
        "methods-plot", help="Table 1 as a plot: AUES and MU95 per loss and method from `methods --out` JSONs",
        description="Two panels (AUES, MU95), one point per method and loss with its std over seeds as error bar, "
                    "from the JSON `aggregate.py methods --out` wrote for each loss.",
        epilog="example: aggregate.py methods-plot npo=out/methods/methods_npo.json wga=out/methods/methods_wga.json "
               "--out table1.png --title 'forget10, 10% masks'")
    methods_plot.add_argument("tables", nargs="+", metavar="LOSS=JSON", help="a loss's name and its methods JSON")
    compare_plot = commands.add_parser(
        "compare-plot", help="seed by seed as a plot: each pair's AUES and MU95 per loss from `compare --out` JSONs",
        description="Two panels (AUES, MU95): per loss, each pair's scores (group a left, group b right) joined by a "
                    "line, with how many pairs group a won and the permutation p, from the JSON `aggregate.py compare "
                    "--out` wrote for each loss.",
        epilog="example: aggregate.py compare-plot npo=out/controlled/compare_npo.json "
               "wga=out/controlled/compare_wga.json --out controlled.png")
    compare_plot.add_argument("tables", nargs="+", metavar="LOSS=JSON", help="a loss's name and its compare JSON")
    for sub, func in ((methods_plot, cmd_methods_plot), (compare_plot, cmd_compare_plot)):
        sub.add_argument("--out", required=True, metavar="FILE.png", help="the figure")
        sub.add_argument("--title", help="the figure's title")
        sub.set_defaults(func=func)

    injection = commands.add_parser(
        "injection", help="theta_o's Forget/Retain Strength against theta_r's (did the injection work?)",
        parents=[split],
        description="The controlled experiment's check on theta_o (theta_r with the forget set trained into V_tgt): "
                    "its Forget Strength must be at least --min-fs-drop below theta_r's, its Retain Strength within "
                    "--max-rs-drop of theta_r's. Reads each model's eval_tofu.py result; exits with status 1, naming "
                    "the condition, when any theta_o fails.",
        epilog="example: aggregate.py injection --theta-r out/theta_r/checkpoint-6750 --forget-split forget01 "
               "out/controlled/seed1/theta_o/checkpoint-1500 out/controlled/seed2/theta_o/checkpoint-1500")
    injection.add_argument("theta_o_dirs", nargs="+", metavar="THETA_O_DIR", help="injected models (evaluated)")
    injection.add_argument("--theta-r", required=True, metavar="DIR", help="the model before injection (evaluated)")
    injection.add_argument("--min-fs-drop", type=float, default=0.5,
                           help="the Forget Strength theta_o must lose against theta_r (default: 0.5)")
    injection.add_argument("--max-rs-drop", type=float, default=0.05,
                           help="the Retain Strength theta_o may lose against theta_r (default: 0.05)")
    injection.add_argument("--out", metavar="FILE.json", help="also write the table's numbers here")
    injection.set_defaults(func=cmd_injection)

    sweep = commands.add_parser(
        "sweep", help="the table of a sweep.py grid: every setting's AUES and MU95, the chosen one per method",
        description=f"Read every {SWEEP_RESULT} under SWEEP_ROOT (sweep.py's save_root) and write OUT/"
                    f"{SWEEP_TABLE}.md, .csv and .json: per method (forget_loss, and the mask when there is one) each "
                    "setting's AUES and MU95, mean ± sample std over its seeds, and the setting the selection rule "
                    "chooses. sweep.py runs it at the end of every (multi)run.",
        epilog="example: aggregate.py sweep sweeps/npo_grid --select mu95 --out results/npo_grid")
    sweep.add_argument("root", metavar="SWEEP_ROOT", help="the sweep's save_root")
    sweep.add_argument("--select", choices=SWEEP_SELECT, default="aues",
                       help="the score the chosen setting maximises, mean over seeds (default: aues)")
    sweep.add_argument("--out", metavar="DIR", help="output directory (default: SWEEP_ROOT)")
    sweep.set_defaults(func=cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run_main(main)
