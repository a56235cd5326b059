"""Model families: their config, the locally built `tiny` model, loading with the right dtype and attention, and
where a model keeps its decoder layers and value vectors."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.utils import is_flash_attn_2_available

from runtime import ConfigError, atomic_path, barrier, is_main
from tofu import load_tofu

log = logging.getLogger("loc_unlearn")

MODEL_CONFIG_PATH = Path(__file__).resolve().parent / "config" / "model_config.yaml"
# Locally built models (the tiny families) live under $LOC_UNLEARN_CACHE/tiny, by default .cache/tiny in the
# repository; the tests point it at a temporary directory.
CACHE_ENV = "LOC_UNLEARN_CACHE"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"


def tiny_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE) / "tiny"

# The tiny family's chat format: a dedicated end-of-turn token that doubles as EOS, and a pad token of its own.
TINY_SPECIAL = {"bos": "<|begin|>", "eot": "<|end|>", "pad": "<pad>", "user": "<|user|>", "assistant": "<|assistant|>"}
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list (`model.model.layers` for Llama/OLMo-2), also found through DDP or PEFT wrappers."""
    found = [m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.split(".")[-1] == "layers"]
    if len(found) != 1:
        raise ValueError(f"expected exactly one `layers` ModuleList in {type(model).__name__}, found {len(found)}")
    return found[0]


def value_vectors(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The MLP down-projection of every decoder layer: column i of layer l's weight is value vector (l, i).

    Llama and OLMo-2 both name it `mlp.down_proj`; the layers are found through DDP or PEFT wrappers, but a
    down-projection that PEFT itself wrapped is refused, as its weight is then not the whole story.
    """
    downs = []
    for i, layer in enumerate(decoder_layers(model)):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(down, torch.nn.Linear):
            raise ValueError(f"layer {i} has no mlp.down_proj Linear; only Llama/OLMo-2 style MLPs are supported")
        downs.append(down)
    return downs


def value_vector_shape(model: torch.nn.Module | PretrainedConfig) -> tuple[int, int]:
    """(n_layers, d_ff): decoder layers and value vectors per layer, of a model or of its config alone."""
    if isinstance(model, PretrainedConfig):
        return model.num_hidden_layers, model.intermediate_size
    downs = value_vectors(model)
    d_ff = {down.weight.shape[1] for down in downs}
    if len(d_ff) != 1:
        raise ValueError(f"layers have different d_ff {sorted(d_ff)}; not supported")
    return len(downs), d_ff.pop()


def model_families() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(MODEL_CONFIG_PATH.read_text())


def family_config(name: str) -> dict[str, Any]:
    families = model_families()
    if name not in families:
        raise ConfigError(f"unknown model_family={name!r}; expected one of {sorted(families)}")
    return families[name]


def _tiny_corpus(data_path: str | None) -> list[str]:
    texts: list[str] = []
    for split in ("full", "real_authors_perturbed", "world_facts_perturbed", "retain_perturbed", "forget10_perturbed"):
        for row in load_tofu(split, data_path):
            texts.extend(str(v) for v in row.values() if isinstance(v, str))
            texts.extend(row.get("perturbed_answer", []))
    return texts


def build_tiny_model(out_dir: str | Path, data_path: str | None, seed: int = 0, family: str = "tiny") -> Path:
    """Build a locally built family's random-init Llama and its BPE tokenizer (trained on the data), save_pretrained."""
    arch = family_config(family)["architecture"]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=arch["vocab_size"],
        special_tokens=list(TINY_SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(data_path), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=TINY_SPECIAL["bos"],
        eos_token=TINY_SPECIAL["eot"],
        pad_token=TINY_SPECIAL["pad"],
        padding_side="right",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["n_layers"],
        num_attention_heads=arch["n_heads"],
        num_key_value_heads=arch["n_heads"],
        max_position_embeddings=arch["max_position"],
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
    log.info("built %s model (%d parameters, vocab %d) at %s", family, model.num_parameters(), len(fast), out_dir)
    return Path(out_dir)


def tiny_model_path(data_path: str | None, seed: int = 0, family: str = "tiny") -> Path:
    """The cached initial model of a locally built family for this data source and seed, built on first use (rank 0)."""
    arch = family_config(family)["architecture"]
    key = hashlib.sha256(json.dumps([str(data_path), seed, arch], sort_keys=True).encode()).hexdigest()[:12]
    path = tiny_cache() / f"init_{key}"
    if is_main() and not path.exists():
        build_tiny_model(path, data_path, seed, family)
    barrier()
    return path


def resolve_model_path(model_family: str, model_path: str | None, data_path: str | None, seed: int = 0) -> str:
    """Explicit path, else the hub key of the family, else (tiny, tiny-wide) the locally built initial model."""
    fam = family_config(model_family)
    if model_path:
        path = Path(model_path)
        if path.exists() and not (path / "config.json").is_file():
            raise ConfigError(f"model_path={model_path} is not a model directory (no config.json)")
        if not path.exists() and fam["hf_key"] is None:
            raise ConfigError(f"model_path={model_path} does not exist")
        return str(model_path)
    if fam["hf_key"]:
        return fam["hf_key"]
    return str(tiny_model_path(data_path, seed, model_family))


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The config's `precision` (bf16, fp32); null: bf16 on a GPU, fp32 on a CPU."""
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ConfigError(f"precision={precision!r}; expected one of {sorted(DTYPES)} or null (bf16 on GPU, fp32 on "
                          "CPU)")
    return precision


def flash_attn_error(device: torch.device) -> str | None:
    """Why flash-attn's kernel fails on device (None when it runs), from one call on a tiny input.

    An installed flash-attn can still be unusable (built against another torch, so its import fails on an
    undefined symbol, or another flash-attn generation under the same name): without this trial the run would end
    in a traceback at the first forward pass.
    """
    try:
        from flash_attn import flash_attn_func

        q = torch.zeros(1, 2, 1, 64, device=device, dtype=torch.bfloat16)  # (batch, sequence, heads, head dim)
        flash_attn_func(q, q, q, causal=True)
    except Exception as err:  # ImportError, OSError, RuntimeError, TypeError ...: any failure rules it out
        return f"{type(err).__name__}: {err}"
    return None


def attention_implementation(device: torch.device) -> str:
    """flash_attention_2 when transformers can use flash-attn and its kernel runs on device, else sdpa."""
    if not is_flash_attn_2_available():
        return "sdpa"
    error = flash_attn_error(device)
    if error is not None:
        log.warning("attention: sdpa, as flash-attn is installed but fails on %s (%s)", device, error)
        return "sdpa"
    log.info("attention: flash_attention_2 (flash-attn runs on %s)", device)
    return "flash_attention_2"


def load_tokenizer(model_family: str, path: str):
    fam = family_config(model_family)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = fam["pad_token"]
    return tokenizer


def load_model(path: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model at `path`, its weights read straight onto `device` in `dtype` (no full copy in host memory).

    Loading to the CPU and then moving would hold every rank's whole model in host memory at once: 8 ranks x 16 GB
    at 8B in bf16. A single-device `device_map` makes transformers place each tensor on `device` as it is read.
    """
    dtype = dtype or DTYPES[resolve_precision(None, device)]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attention_implementation(device), device_map={"": device},
            trust_remote_code=False,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load a model from {path}: {str(err).splitlines()[0]}") from None
    log.info("loaded model from %s onto %s (%s, %s, %d parameters)", path, device, dtype,
             model.config._attn_implementation, model.num_parameters())
    return model


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build a local family's initial model (random init + BPE tokenizer).")
    parser.add_argument("--family", default="tiny", help="a family of config/model_config.yaml with an architecture")
    parser.add_argument("--data_path", default="synthetic", help="TOFU directory or 'synthetic' (tokenizer corpus)")
    parser.add_argument("--out", default=None, help="output directory (default: the cache used by model_family=tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if family_config(args.family)["architecture"] is None:
        parser.error(f"--family {args.family} is a hub model, not a locally built one")
    if args.out:
        path = build_tiny_model(args.out, args.data_path, args.seed, args.family)
    else:
        path = tiny_model_path(args.data_path, args.seed, args.family)
    print(path)


if __name__ == "__main__":
    main()
