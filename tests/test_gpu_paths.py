"""GPU paths checked on a CPU: the flash-attn choice with fake flash_attn packages, and the GPU environment's pins."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import models

ROOT = Path(__file__).resolve().parents[1]

# ---- flash-attn: used only when its kernel really runs ----

# __init__.py of flash_attn packages that are installed but unusable, and what their failure says.
BROKEN = [
    pytest.param('raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10")', "ImportError: flash_attn_2",
                 id="import: built against another torch"),
    pytest.param('raise OSError("libcudart.so.11.0: cannot open shared object file")', "OSError: libcudart",
                 id="import: missing CUDA library"),
    pytest.param("def flash_attn_func(q, k, v, causal=False):\n"
                 "    raise RuntimeError('FlashAttention only supports Ampere GPUs or newer.')\n",
                 "RuntimeError: FlashAttention only supports Ampere", id="call: unsupported GPU"),
    pytest.param("def flash_attn_func(qkv, cu_seqlens, max_seqlen, dropout_p):\n    return qkv\n", "TypeError",
                 id="call: another generation's signature"),
]
WORKING = "def flash_attn_func(q, k, v, causal=False):\n    return q\n"
CPU = torch.device("cpu")


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """Installs a `flash_attn` package with the given __init__.py source: first on sys.path, imported afresh."""
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)

    def install(source: str) -> None:
        (tmp_path / "flash_attn").mkdir()
        (tmp_path / "flash_attn" / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    sys.modules.pop("flash_attn", None)


@pytest.mark.parametrize("source, reason", BROKEN)
def test_flash_attn_trial_reports_why_a_broken_install_fails(fake_flash_attn, source, reason):
    fake_flash_attn(source)
    assert models.flash_attn_error(CPU).startswith(reason)


def test_flash_attn_trial_passes_a_working_install(fake_flash_attn):
    fake_flash_attn(WORKING)
    assert models.flash_attn_error(CPU) is None


@pytest.mark.parametrize("source, reason", BROKEN)
def test_broken_flash_attn_falls_back_to_sdpa_with_a_warning(fake_flash_attn, monkeypatch, caplog, source, reason):
    fake_flash_attn(source)
    monkeypatch.setattr(models, "is_flash_attn_2_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="loc_unlearn"):
        assert models.attention_implementation(CPU) == "sdpa"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "flash-attn is installed but fails" in caplog.text and reason in caplog.text


def test_working_flash_attn_is_chosen_and_logged(fake_flash_attn, monkeypatch, caplog):
    fake_flash_attn(WORKING)
    monkeypatch.setattr(models, "is_flash_attn_2_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="loc_unlearn"):
        assert models.attention_implementation(CPU) == "flash_attention_2"
    assert "attention: flash_attention_2" in caplog.text
    # What transformers cannot use (not installed, too old, no GPU) is never tried.
    monkeypatch.setattr(models, "is_flash_attn_2_available", lambda: False)
    assert models.attention_implementation(CPU) == "sdpa"


# ---- Models are read straight onto their device ----

def test_load_model_reads_weights_onto_the_device_without_moving_a_host_copy(tiny_path, monkeypatch):
    """On the meta device nothing can be copied: the weights land there only if from_pretrained put them there."""
    moves = []
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(a) or real_to(self, *a, **k))
    model = models.load_model(str(tiny_path), torch.device("meta"), torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    assert moves == []


# ---- The GPU environment installs what the CPU one does ----

def _pins(lines: list[str]) -> dict[str, str]:
    """name -> version of the `name==version` requirement lines (comments and pip options skipped)."""
    pins = [line.split("#")[0].strip() for line in lines]
    return dict(pin.lower().split("==") for pin in pins if pin and not pin.startswith("-"))


def test_gpu_environment_pins_equal_requirements_txt():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip) == _pins((ROOT / "requirements.txt").read_text().splitlines())
    # The same torch version, from PyTorch's CUDA wheel index.
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in pip


def test_gpu_setup_installs_the_deepspeed_version_of_the_cpu_setup():
    def deepspeed_pins(script: str) -> list[str]:
        return re.findall(r"deepspeed==(\S+)", (ROOT / "scripts" / script).read_text())

    assert deepspeed_pins("setup_gpu.sh") == deepspeed_pins("setup.sh") and len(deepspeed_pins("setup.sh")) == 1
