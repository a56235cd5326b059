"""Sweep a grid of unlearning settings on Hydra's multirun. Each job is one setting (forget_loss, lr, hyper_param,
epochs, seed): it unlearns from model_path (θ_o), evaluates θ_o and every checkpoint against the retain model's
result, and writes <run dir>/sweep_result.json; at the end `aggregate.py sweep` writes the table with the chosen
setting per method.

    python sweep.py -m model_path=<θ_o> retain_result=<θ_r>/eval_results/eval_forget10.json data_path=... \\
        forget_loss=npo,grad_diff lr=1e-5,2e-5 epochs=2,5 save_root=sweeps/forget10
    python sweep.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 ...

A job whose sweep_result.json holds its config returns at once; otherwise unlearn.py resumes or skips its run and
eval_tofu.py reuses every current evaluation, so re-running the command finishes what an interrupted sweep left.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import eval_tofu
import unlearn
from aggregate import AUES_METHODS, SWEEP_SELECT, load_trajectory, score_run, write_sweep_table
from dataloader import get_loss
from io_utils import ConfigError, run_main, write_json
from layout import SWEEP_RESULT, checkpoints, sweep_run_dir
from runtime import setup_logging
from schema import (
    EvalConfig,
    SweepConfig,
    added_keys,
    error_line,
    hydra_entry,
    register,
    schema_keys,
    to_dict,
    unknown_key_line,
)
from trainer import NonFiniteLoss

log = logging.getLogger("loc_unlearn")

SCHEMA = register("sweep_tofu", SweepConfig)
# What the sweep passes on to unlearn.py and eval_tofu.py; unlearn_args and eval_args may set neither these nor
# where results go, which the sweep decides.
UNLEARN_KEYS = ("model_family", "model_path", "data_path", "forget_split", "mask_path", "forget_loss", "lr",
                "hyper_param", "epochs", "seed", "max_length")
EVAL_KEYS = ("model_family", "data_path", "forget_split", "max_length")
UNLEARN_OWN = (*UNLEARN_KEYS, "output_dir", "save_root")
EVAL_OWN = (*EVAL_KEYS, "model_path", "retain_result", "output_dir")
# The setting as the table groups it, read from the resolved unlearn.py config (family and loss defaults filled in).
SETTING_KEYS = ("forget_loss", "mask_path", "lr", "hyper_param", "epochs", "seed")
# Keys that change the table, not a setting's result: a result computed with another value here is still current.
NOT_RESULT_KEYS = ("select",)


def entry_config(config_name: str, schema: type, overrides: Sequence[str], values: Mapping[str, Any],
                 own: Sequence[str], arg: str) -> DictConfig:
    """config/<config_name>.yaml as its entry point composes it with the command-line `overrides` (`arg`:
    unlearn_args or eval_args), then the sweep's `values`."""
    keys = schema_keys(schema)
    if clash := sorted({o.lstrip("+~").split("=", 1)[0] for o in overrides} & set(own)):
        raise ConfigError(f"{arg} sets {', '.join(clash)}, which the sweep sets; give {clash[0]} as a sweep key "
                          f"(or leave it to the sweep)")
    if bad := added_keys(overrides, keys):
        raise ConfigError(f"{arg}: {unknown_key_line(bad[0], keys)}")
    try:
        cfg = hydra.compose(config_name=config_name, overrides=list(overrides))
    except CompactHydraException as err:
        raise ConfigError(f"{arg}: {error_line(err, keys)}") from None
    return OmegaConf.merge(cfg, values)


def check(c: dict[str, Any]) -> None:
    if c["select"] not in SWEEP_SELECT:
        raise ConfigError(f"select={c['select']!r}; expected one of {list(SWEEP_SELECT)}")
    if c["aues"] not in AUES_METHODS:
        raise ConfigError(f"aues={c['aues']!r}; expected one of {list(AUES_METHODS)}")
    if not (c["model_path"] and Path(c["model_path"]).is_dir()):
        raise ConfigError(f"model_path={c['model_path']}; expected θ_o, the local model directory every setting "
                          "unlearns (its evaluation is written into it)")
    if not (c["retain_result"] and Path(c["retain_result"]).is_file()):
        raise ConfigError(f"retain_result={c['retain_result']}; expected the retain model's eval JSON (python "
                          "eval_tofu.py model_path=<θ_r> ...), which MU95 needs")


def run_setting(cfg: DictConfig) -> Path:
    """One grid point: unlearn, evaluate the trajectory, score it; returns its result file."""
    setup_logging()
    c = to_dict(cfg)
    check(c)
    c.update(unlearn.absolute_paths(c))
    c["retain_result"] = str(Path(c["retain_result"]).resolve())
    unlearn_cfg = entry_config("forget_tofu", unlearn.SCHEMA, c["unlearn_args"], {k: c[k] for k in UNLEARN_KEYS},
                               UNLEARN_OWN, "unlearn_args")
    resolved = unlearn.resolve_loss_knobs(get_loss(c["forget_loss"]), unlearn.resolve(unlearn_cfg))
    # Composed and checked now, so that a bad eval_args stops the job before it trains; the checkpoints join
    # model_path once they exist.
    eval_cfg = entry_config("eval_tofu", EvalConfig, c["eval_args"], {**{k: c[k] for k in EVAL_KEYS},
                            "model_path": c["model_path"], "retain_result": c["retain_result"]}, EVAL_OWN, "eval_args")
    eval_tofu.resolve(eval_cfg)
    out = sweep_run_dir(Path(c["save_root"]).resolve(), resolved)
    result_file = out / SWEEP_RESULT
    record = {k: v for k, v in c.items() if k not in NOT_RESULT_KEYS}
    if result_file.is_file() and json.loads(result_file.read_text()).get("config") == record:
        log.info("skipped: %s holds the scores of this setting", result_file)
        return result_file

    setting = {k: resolved[k] for k in SETTING_KEYS}
    method = c["forget_loss"] + (f"/{Path(c['mask_path']).stem}" if c["mask_path"] else "")
    about = {"config": record, "method": method, "setting": setting, "run_dir": str(out), "theta_o": c["model_path"],
             "retain_result": c["retain_result"], "aues_method": c["aues"], "mu_threshold": c["mu_threshold"]}
    unlearn_cfg.output_dir = str(out)
    try:
        unlearn.unlearn(unlearn_cfg)
    except ConfigError as err:
        if not isinstance(err.__cause__, NonFiniteLoss):
            raise
        # In a grid a loss that turns non-finite (too high an lr) is an outcome of the setting: recorded, it is
        # shown in the table and never chosen, and the other jobs go on.
        write_json(result_file, {**about, "diverged": str(err), "aues": None, "mu95": None})
        log.warning("diverged: %s; wrote %s", err, result_file)
        return result_file
    eval_cfg.model_path = [c["model_path"], *(str(path) for _, path in checkpoints(out))]
    eval_tofu.evaluate(eval_cfg)
    score = score_run(load_trajectory(out, c["model_path"], c["forget_split"]), c["aues"], c["mu_threshold"])
    write_json(result_file, {**about, "diverged": None, **score})
    log.info("AUES %.4f, MU95 %.4f: wrote %s", score["aues"], score["mu95"], result_file)
    return result_file


class WriteTable(Callback):
    """At the end of the sweep, in the launching process: the table of every result under save_root."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_main(lambda: print(write_sweep_table(config.save_root, config.select, config.save_root)))

    def on_run_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED:  # a failed job's own error is what to report
            self.on_multirun_end(config)


@hydra.main(version_base=None, config_path="config", config_name="sweep_tofu")
def main(cfg: DictConfig) -> None:
    run_main(lambda: run_setting(cfg))


if __name__ == "__main__":
    # submitit runs each job in a new Python process, which imports the modules the pickled job refers to
    # (unlearn, eval_tofu, ...): the repository must be on its path whatever the working directory.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
    hydra_entry(main, SCHEMA)
