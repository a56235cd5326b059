"""The GPU-scale training branches, taken on CPU: a process group whose backend serves one device type only,
DeepSpeed in one process and on 2 ranks (gloo), its accumulation boundary and its resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, command, final_checkpoint, final_weights, subprocess_env
from safetensors.torch import load_file

from checkpoints import compact_meta

DS_CONFIG = str(ROOT / "config" / "ds_config.json")
MASK = [torch.tensor([1, 2, 3, 200]), torch.tensor([10, 400])]


def _collectives(rank: int, init_file: str, backend: str | None) -> None:
    """One rank: join a 2-rank group (built by init_distributed on a pretend GPU node when backend is None), then
    run every collective the entry points use on CPU values."""
    import runtime
    from evaluator import map_batches
    from trainer import _mean_across_ranks

    if backend is None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=Path(init_file).read_text())
        torch.cuda.is_available = lambda: True
        torch.cuda.set_device = lambda index: None
        # The CPU wheel has no NCCL: gloo stands in for it on the cuda slot, so the group serves each device type
        # exactly as the GPU node's does.
        real = runtime.process_group_backend
        runtime.process_group_backend = lambda device_type: real(device_type, accelerator_backend="gloo")
        _, _, device = runtime.init_distributed()
        assert device.type == "cuda"
    else:
        dist.init_process_group(backend, init_method=f"file://{init_file}.store", rank=rank, world_size=2)
    try:
        assert _mean_across_ranks(torch.tensor(float(rank), dtype=torch.float64)) == 0.5
        assert runtime.broadcast_object(f"from {rank}") == "from 0"
        assert map_batches([[0], [1]], lambda batch: [batch[0] * 10], "test") == [0, 10]
    finally:
        dist.destroy_process_group()


def test_process_group_serves_cpu_tensors_on_gpu_nodes(processes, tmp_path):
    port_file = tmp_path / "port"
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port_file.write_text(str(s.getsockname()[1]))
    # What a plain "nccl" group is: a backend for CUDA tensors only. Any CPU tensor in a collective fails.
    with pytest.raises(Exception, match="No backend type associated with device type cpu"):
        mp.spawn(_collectives, args=(str(tmp_path / "nccl_like"), "cuda:gloo"), nprocs=2)
    mp.spawn(_collectives, args=(str(port_file), None), nprocs=2)


def test_gpu_group_backend_pairs_nccl_with_gloo():
    from runtime import process_group_backend

    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


# ---- one optimizer step on 2 ranks is one step on 1 rank with the concatenated batch ----

STEP = dict(lr=1e-3, weight_decay=0.1, epochs=1, grad_accum=1, warmup_ratio=0.0, lr_scheduler="constant",
            max_grad_norm=1.0, seed=0, save_checkpoint=False, save_steps=0, save_each_epoch=False)


def _one_step(rank: int, world: int, tiny_path: str, out: str) -> None:
    """Train the tiny model for one step on 8 forget01 examples: world x (8 / world) per rank. The loss is the mean of
    the per-sequence NLLs, whose mean over equal-sized rank shares is the mean over the whole batch (a token mean
    averaged across ranks equals the token mean of the concatenation only when the ranks hold equal token counts)."""
    from checkpointer import Checkpointer
    from dataloader import UnlearnDataset, sequence_nll
    from models import family_config, load_model, load_tokenizer
    from tofu import load_tofu
    from trainer import TrainSettings, train

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        tokenizer = load_tokenizer("tiny", tiny_path)
        data = UnlearnDataset(load_tofu("forget01", "synthetic")[:8], [], [], tokenizer, family_config("tiny"), 64,
                              ("forget",), seed=0)
        model = load_model(tiny_path, torch.device("cpu"))
        train(model, list(model.parameters()), data, lambda m, b: sequence_nll(m, b["forget"]).mean(),
              TrainSettings(batch_size=8 // world, **STEP), Checkpointer(Path(out)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_one_step_on_two_ranks_equals_one_step_on_the_concatenated_batch(processes, tiny_path, tmp_path):
    # fork: the ranks inherit the imported modules (spawn would import torch again in each)
    mp.start_processes(_one_step, args=(2, str(tiny_path), str(tmp_path / "two")), nprocs=2, start_method="fork")
    _one_step(0, 1, str(tiny_path), str(tmp_path / "one"))
    history = {n: json.loads((final_checkpoint(tmp_path / n) / "trainer_state.json").read_text())["history"]
               for n in ("one", "two")}
    assert len(history["one"]) == len(history["two"]) == 1
    assert history["two"][0]["loss"] == pytest.approx(history["one"][0]["loss"], rel=1e-6)
    before = load_file(str(tiny_path / "model.safetensors"))
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert _max_diff(one, before) > 0.5 * STEP["lr"]  # the step moved the weights
    # Adam's first step is lr * g / (|g| + eps): for gradients near eps, sums taken in another order move it by a
    # fraction of lr (2e-3 lr measured); a rank's share missing from the gradient would move it by ~lr.
    assert _max_diff(one, two) <= 1e-2 * STEP["lr"]


def _args(tiny_path: Path, out: Path, *extra: str) -> list[str]:
    return ["unlearn.py", "model_family=tiny", f"model_path={tiny_path}", "data_path=synthetic",
            "forget_split=forget01", "forget_loss=grad_diff", f"output_dir={out}", *extra]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _deepspeed_optimizer_steps(checkpoint: Path) -> set[int]:
    files = list((checkpoint / "deepspeed").rglob("*optim_states.pt"))
    assert len(files) == 2, files  # one ZeRO partition per rank
    steps = set()
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        for group in state if isinstance(state, list) else [state]:
            steps |= {int(s["step"]) for s in group["state"].values()}
    return steps


# 40 forget01 examples on 2 ranks at batch 4: 5 micro-batches per rank and epoch, so with grad_accum=2 each epoch
# ends on a group of one. DeepSpeed's own counter would carry that micro-batch into the next epoch's first step.
UNEVEN = ("epochs=2", "batch_size=4", "grad_accum=2", "save_steps=2", "lr_scheduler=cosine", "warmup_ratio=0.2")


@pytest.fixture(scope="module")
def uneven_runs(run_script, tiny_path, tmp_path_factory):
    from masks import save_mask

    root = tmp_path_factory.mktemp("uneven")
    save_mask(root / "mask.pt", MASK, {"method": "hand", "n_layers": 2, "d_ff": 512})
    runs = {}
    for name, extra in (("plain", ()), ("deepspeed", (f"deepspeed={DS_CONFIG}",))):
        result = run_script(*_args(tiny_path, root / name, *UNEVEN, f"mask_path={root / 'mask.pt'}", *extra), nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = root / name
    return root, runs


def test_deepspeed_steps_like_the_trainer_with_an_uneven_last_group(uneven_runs):
    _, runs = uneven_runs
    plain, ds = final_checkpoint(runs["plain"]), final_checkpoint(runs["deepspeed"])
    assert plain.name == ds.name == "checkpoint-6"  # 3 steps per epoch: groups of 2, 2 and 1 micro-batches
    assert _max_diff(final_weights(runs["plain"]), final_weights(runs["deepspeed"])) <= 1e-5
    plain_history, ds_history = (json.loads((c / "trainer_state.json").read_text())["history"] for c in (plain, ds))
    assert [h["lr"] for h in plain_history] == pytest.approx([h["lr"] for h in ds_history])
    # The logged gradient norm comes from the engine under DeepSpeed (before clipping, as clip_grad_norm_ returns).
    assert [h["grad_norm"] for h in ds_history] == pytest.approx([h["grad_norm"] for h in plain_history], rel=1e-4)
    assert _deepspeed_optimizer_steps(ds) == {6}


def test_deepspeed_keeps_the_mask_and_writes_only_its_own_state(uneven_runs, tiny_path):
    _, runs = uneven_runs
    after, before = final_weights(runs["deepspeed"]), load_file(str(tiny_path / "model.safetensors"))
    for name, value in before.items():
        if name.endswith("mlp.down_proj.weight"):
            idx = MASK[int(name.split(".")[2])]
            keep = torch.ones(value.shape[1], dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(after[name][:, keep], value[:, keep])
            assert not torch.equal(after[name][:, idx], value[:, idx])
        else:
            assert torch.equal(after[name], value), name
    checkpoints = sorted(runs["deepspeed"].glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    # Optimizer state (DeepSpeed's partitions, no torch state dict posing as a full one) only in the newest.
    assert [p.name for p in checkpoints if (p / "deepspeed").exists()] == ["checkpoint-6"]
    assert all(compact_meta(p) is not None and not (p / "model.safetensors").exists() for p in checkpoints)
    state = torch.load(checkpoints[-1] / "trainer_state.pt", weights_only=True)
    assert "optimizer" not in state and set(state["trainable"]) == {
        f"model.layers.{i}.mlp.down_proj.masked_values" for i in (0, 1)}


def _kill_tree(root: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL torchrun and every worker: its workers run in sessions of their own, so killing the launcher (or its
    process group) would leave them training."""
    procs = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
    assert len(procs) >= 3, procs  # the launcher and two ranks
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    root.wait()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"ranks survived the kill: {alive}"
    return procs


def test_deepspeed_resumes_after_sigkill_of_every_rank(run_script, uneven_runs, tiny_path):
    root, runs = uneven_runs
    out = root / "killed"
    args = _args(tiny_path, out, *UNEVEN, f"mask_path={root / 'mask.pt'}", f"deepspeed={DS_CONFIG}")
    launcher = subprocess.Popen(command(*args, nproc=2), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-3").is_dir() and launcher.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert launcher.poll() is None, "the run finished before it could be killed"
    _kill_tree(launcher)
    assert not [p for p in out.glob("checkpoint-*") if json.loads((p / "trainer_state.json").read_text())["final"]]

    resumed = run_script(*args[:-1], nproc=2)  # without deepspeed=: refused, the optimizer state is DeepSpeed's
    assert resumed.returncode != 0 and "was written with DeepSpeed" in resumed.stderr
    resumed = run_script(*args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stdout
    assert _max_diff(final_weights(out), final_weights(runs["deepspeed"])) <= 1e-6
    assert _deepspeed_optimizer_steps(final_checkpoint(out)) == {6}


def test_deepspeed_in_one_process_trains_bf16_with_fp32_masters(run_script, tiny_path, tmp_path):
    """`python unlearn.py deepspeed=...` (no torchrun): full-parameter bf16 training at lr 1e-5 moves (nearly) as many
    weights as the same run in fp32, rounded to bf16 for the comparison."""
    common = ("forget_loss=ga", "epochs=8", "batch_size=8", "lr=1e-5", "lr_scheduler=constant", "save_checkpoint=false")
    for name, extra in (("bf16", ("precision=bf16", f"deepspeed={DS_CONFIG}")), ("fp32", ("precision=fp32",))):
        result = run_script(*_args(tiny_path, tmp_path / name, *common, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    before = {k: v.bfloat16() for k, v in load_file(str(tiny_path / "model.safetensors")).items()}
    after = {name: final_weights(tmp_path / name) for name in ("bf16", "fp32")}
    assert {v.dtype for v in after["bf16"].values()} == {torch.bfloat16}
    moved = {name: sum((w[k].bfloat16() != before[k]).sum().item() for k in before) for name, w in after.items()}
    # 40 Adam steps of 1e-5: bf16 weights alone round most of them away (half a bf16 ulp of 0.02 is 6e-5).
    assert moved["bf16"] >= 0.9 * moved["fp32"] > 0.5 * sum(v.numel() for v in before.values())
