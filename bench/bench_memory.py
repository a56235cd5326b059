"""Memory per GPU of every path at the real shapes (Llama-3.1-8B, OLMo-2-7B), counted on a CPU.

    python bench/bench_memory.py                       # both shapes, a few minutes on 2 cores
    python bench/bench_memory.py --family llama3.1-8b-inst --widths 64,32 --seq_len 64   # smoke test

Weights, gradients and optimizer state are the bytes of the code's own objects at the real shape, built on the
meta device (shapes and dtypes, no storage): the model from its transformers config in bf16, the real mask
(mask_generator's random_down + masks.select_top at get_mask_tofu.yaml's ratio, applied by
masking.MaskedValues) or LoRA (masking.apply_lora with the family's target modules), gradients shaped
as autograd makes them (the parameter's shape and dtype), and torch.optim.AdamW as the trainer builds it, stepped
once, its state read back.

Full fine-tuning runs under DeepSpeed ZeRO-2 (config/ds_config.json) in bf16 mode. Per GPU it holds the whole
bf16 model and 1/N of the rest: ZeRO-2 partitions the optimizer state (fp32 master weights, Adam's two moments)
and the reduced bf16 gradients over the N data-parallel ranks (DeepSpeed's ZeRO docs: "Stage 2: The reduced
16-bit gradients for updating the model weights are also partitioned such that each process retains only the
gradients corresponding to its portion of the optimizer states"). Not counted: the reduce buckets
(`reduce_bucket_size` values in bf16) and the fp32 copy of a rank's gradient partition made at the step.
Masked and LoRA runs keep their small trainable values on every GPU, so their rows hold for any N.

Activations cannot be built on the meta device: the losses select answer positions, a data-dependent shape. They
are measured on the CPU in bf16 as the peak bytes of the tensors created during one step (the loss, forward and
backward; each gradient of a trained tensor is dropped once accumulated, as gradients have their own column), on
narrow models of the same structure: the same depth, vocabulary, head counts and GQA groups, with d_model and
d_ff divided by each of --widths (head_dim shrinks with them, down to 2: at head_dim 1 the CPU attention takes
another path). Bytes per token are the growth of the peak from --seq_len to twice as many tokens, so what does not
grow with the tokens (weight-sized gradients and statistics, in their own columns) drops out, provided the tokens'
activations outweigh the largest weight-sized transient (the lm_head gradient of full fine-tuning): at 2 x 64
tokens per part and more they do; at 2 x 16 the full fine-tune row comes out negative. Every per-token tensor
of a decoder layer is d_model- or d_ff-wide or per head, and the answer-position logits are vocabulary-wide, so
bytes per token are a + b x width: the least-squares line through the narrow widths, read at width 1, is the
estimate, and its largest residual is printed as the check. The line follows the peak's moment at the narrow
widths; should the peak move to another moment at full width, the true peak is higher (a lower bound). Sequences
are half prompt, half answer. Tokens per micro-batch at scale count every sequence at the family's max_length (an
upper bound) in each of the loss's parts.
"""
from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable
from dataclasses import dataclass

# common must come first: it puts the repo root on sys.path for the imports below.
from common import ROOT, print_header, tensor_bytes

import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, LlamaConfig, Olmo2Config, PretrainedConfig

from dataloader import IGNORE_INDEX, LOSSES, REF_NLL_KEY, get_loss
from evaluator import score_answers
from mask_generator import accumulate_statistics, compute_scores
from masking import MaskedValues, apply_lora, masked_modules
from masks import select_top
from models import family_config, value_vectors
from tofu import load_tofu

# The published configs (config.json of meta-llama/Llama-3.1-8B-Instruct and allenai/OLMo-2-1124-7B-Instruct),
# written from memory: neither is downloaded here. Llama-3.1's rope_scaling is left out; it moves no byte.
SHAPES: dict[str, PretrainedConfig] = {
    "llama3.1-8b-inst": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False),
    "olmo2-7b-inst": Olmo2Config(vocab_size=100352, hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                 max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False),
}
CONFIG = {name: yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())
          for name in ("forget_tofu", "get_mask_tofu", "eval_tofu")}
LORA_R = 8  # the README's LoRA example; config/forget_tofu.yaml's lora_r is 0 (off)
ATTRIBUTION = "wagle_down"  # gradients of every down_proj over forget and retain: the heaviest of the usual methods
ZERO_GPUS = (1, 4, 8)
MAX_DIVISOR = 64  # head_dim 128 / 64 = 2 in both shapes
GPU_BYTES = 80 * 10**9
# One loss of each reference family (dataloader.LossSpec): the measured row stands for all losses of its family.
LOSS_FAMILIES = {"no reference": "grad_diff", "cached reference NLLs": "npo", "resident reference model": "kl"}


def reference_family(name: str) -> str:
    spec = LOSSES[name]
    return ("resident reference model" if spec.resident_ref else
            "cached reference NLLs" if spec.cached_ref else "no reference")


def narrow(config: PretrainedConfig, divisor: int) -> PretrainedConfig:
    """The same structure with d_model and d_ff divided by `divisor` (head counts kept, head_dim shrinks)."""
    hidden = config.hidden_size // divisor
    return type(config)(**{**config.to_dict(), "hidden_size": hidden,
                           "intermediate_size": config.intermediate_size // divisor,
                           "head_dim": hidden // config.num_attention_heads})


def reshaped(config: PretrainedConfig, divisor: int = 1, layers: int | None = None) -> PretrainedConfig:
    """The config narrowed by `divisor` (1: as it is) and with `layers` decoder layers (None: its own)."""
    config = narrow(config, divisor) if divisor > 1 else config
    return type(config)(**{**config.to_dict(), "num_hidden_layers": layers}) if layers else config


def build(config: PretrainedConfig, device: str) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")


def random_mask(model: nn.Module) -> list[torch.Tensor]:
    """generate_mask.py's random_down mask at get_mask_tofu.yaml's ratio (scores need only the model's shape)."""
    scores = compute_scores("random_down", model, None, None, {"seed": 0})
    return select_top(scores, CONFIG["get_mask_tofu"]["ratio"])


def make_trainable(model: nn.Module, path: str, family: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """What unlearn.py trains on each path: every parameter, the masked values, or LoRA adapters."""
    if path == "full":
        return model, list(model.parameters())
    if path == "masked":
        return model, MaskedValues(random_mask(model)).attach(model).parameters()
    lora = CONFIG["forget_tofu"]
    return apply_lora(model, LORA_R, lora["lora_alpha"], lora["lora_dropout"],
                      family_config(family)["lora_target_modules"])


def gradients_and_adamw_state(params: list[nn.Parameter]) -> tuple[int, int]:
    """Bytes of the parameters' gradients and of AdamW's state after one step (meta tensors: shapes only)."""
    for p in params:
        p.grad = torch.zeros_like(p)  # autograd gives a gradient its parameter's shape and dtype
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)  # as trainer.train builds it
    optimizer.step()
    grads = tensor_bytes(p.grad for p in params)
    state = tensor_bytes(v for s in optimizer.state.values() for v in s.values())
    for p in params:
        p.grad = None
    return grads, state


# ---- activations, measured on narrow models ----

class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and alive at once (CPUs keep no allocator stats).

    Each new storage is counted when an op returns it and released when it is freed (a finalizer on the storage,
    whose Python object lives as long as the storage does); views and in-place results share an input's storage
    and add nothing.
    """

    def __enter__(self) -> PeakTensorBytes:
        self.live, self.peak, self._sizes = 0, 0, {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in inputs and key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def synthetic_part(vocab: int, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Random tokens, the second half of each sequence the answer."""
    input_ids = torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@dataclass
class Measure:
    """A step on a narrow model: the peak bytes of the tensors it created, and the tokens it processed."""
    peak: int
    tokens: int


def measure_training(config: PretrainedConfig, family: str, path: str, loss: str, batch: int, seq_len: int) -> Measure:
    model, trainable = make_trainable(build(config, "cpu"), path, family)
    for p in trainable:
        p.register_post_accumulate_grad_hook(_drop_grad)
    spec = get_loss(loss)
    parts = {part: synthetic_part(config.vocab_size, batch, seq_len) for part in spec.parts}
    for part in spec.cached_ref:
        parts[part][REF_NLL_KEY] = torch.zeros(batch)
    ref_model = build(config, "cpu").requires_grad_(False).eval() if spec.resident_ref else None
    cfg = {"hyper_param": spec.default_hyper_param, "retain_weight": 1.0, "seed": 0}
    with PeakTensorBytes() as peak:
        spec(model, parts, ref_model, cfg).backward()
    return Measure(peak.peak, batch * seq_len * len(spec.parts))


def measure_scoring(config: PretrainedConfig, batch: int, seq_len: int) -> Measure:
    model = build(config, "cpu")
    part = synthetic_part(config.vocab_size, batch, seq_len)
    encodings = [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(part["input_ids"], part["labels"])]
    with PeakTensorBytes() as peak:
        score_answers(model, encodings, batch)
    return Measure(peak.peak, batch * seq_len)


def measure_kv_cache(config: PretrainedConfig, batch: int, seq_len: int) -> Measure:
    model = build(config, "cpu")
    with torch.no_grad():
        cache = model(input_ids=synthetic_part(config.vocab_size, batch, seq_len)["input_ids"],
                      use_cache=True).past_key_values
    return Measure(tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values)), batch * seq_len)


def measure_attribution(config: PretrainedConfig, batch: int, seq_len: int) -> Measure:
    model = build(config, "cpu")
    forget, retain = (synthetic_part(config.vocab_size, batch, seq_len) for _ in range(2))
    with PeakTensorBytes() as peak:
        accumulate_statistics(ATTRIBUTION, model, [forget], [retain], {"progress": False})
    return Measure(peak.peak, batch * seq_len)


def statistics_per_down_weight(config: PretrainedConfig) -> float:
    """Bytes of the attribution's summed statistics per down_proj weight, as it allocates them."""
    model = build(config, "cpu")
    forget, retain = (synthetic_part(config.vocab_size, 1, 8) for _ in range(2))
    stats = accumulate_statistics(ATTRIBUTION, model, [forget], [retain], {"progress": False})
    return tensor_bytes(stats.values()) / sum(down.weight.numel() for down in value_vectors(model))


def per_token_at_full_width(measure: Callable[[PretrainedConfig, int], Measure], config: PretrainedConfig,
                            divisors: list[int], seq_len: int) -> tuple[float, float, list[float]]:
    """(bytes per token at full width, largest relative residual of the line, bytes per token at each width)."""
    xs = [1 / d for d in divisors]
    ys = []
    for d in divisors:
        short, long = measure(narrow(config, d), seq_len), measure(narrow(config, d), 2 * seq_len)
        ys.append((long.peak - short.peak) / (long.tokens - short.tokens))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    residual = max(abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys))
    return intercept + slope, residual, ys


# ---- the table ----

@dataclass
class Row:
    path: str
    gpus: str
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    act_per_token: float
    tokens: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.act_per_token * self.tokens


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_rows(rows: list[Row]) -> None:
    print("| path | GPUs | parameters | trainable values | weights GiB | gradients GiB | optimizer state GiB "
          "| activations KiB/token | tokens | total GiB | fits 80 GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.path} | {r.gpus} | {r.parameters:,} | {r.trainable:,} | {gib(r.weights)} | {gib(r.gradients)} | "
              f"{gib(r.optimizer)} | {r.act_per_token / 1024:.1f} | {r.tokens:,} | {gib(r.total)} | "
              f"{'yes' if r.total <= GPU_BYTES else 'no'} |")


def report(family: str, divisors: list[int], batch: int, seq_len: int) -> None:
    config, fam = SHAPES[family], family_config(family)
    max_len = fam["max_length"]
    fits: dict[str, tuple[float, float, list[float]]] = {}

    def activation(name: str, measure: Callable[[PretrainedConfig, int], Measure]) -> float:
        fits[name] = per_token_at_full_width(measure, config, divisors, seq_len)
        return fits[name][0]

    def tokens(loss: str, sequences: int) -> int:
        return sequences * max_len * len(get_loss(loss).parts)

    rows = []
    model = build(config, "meta")
    n_params = sum(p.numel() for p in model.parameters())
    weights = tensor_bytes(model.parameters())

    # Full fine-tuning (forget_loss=learn) under ZeRO-2: fp32 masters and their AdamW state, partitioned.
    grads, _ = gradients_and_adamw_state(list(model.parameters()))
    masters = [nn.Parameter(p.detach().float()) for p in model.parameters()]
    _, adam = gradients_and_adamw_state(masters)
    act = activation("full fine-tune", lambda c, t: measure_training(c, family, "full", "learn", batch, t))
    for n in ZERO_GPUS:
        rows.append(Row("full fine-tune, ZeRO-2", str(n), n_params, n_params, weights, grads // n,
                        (tensor_bytes(masters) + adam) // n, act, tokens("learn", fam["batch_size"])))
    del masters

    n_forget = len(load_tofu(CONFIG["forget_tofu"]["forget_split"], "synthetic"))  # as many as in real TOFU
    masked, trainable = make_trainable(build(config, "meta"), "masked", family)
    m_grads, m_adam = gradients_and_adamw_state(trainable)
    m_weights = tensor_bytes(masked.parameters())
    for ref, loss in LOSS_FAMILIES.items():
        spec = get_loss(loss)
        extra = tensor_bytes(build(config, "meta").parameters()) if spec.resident_ref else 0
        # unlearn.reference_nll: one fp32 value per example of each cached part
        extra += tensor_bytes(torch.empty(n_forget, device="meta") for _ in spec.cached_ref)
        act = activation(f"masked, {ref}", lambda c, t, l=loss: measure_training(c, family, "masked", l, batch, t))
        rows.append(Row(f"masked 10%, {ref} ({loss})", "any", n_params, sum(p.numel() for p in trainable),
                        m_weights + extra, m_grads, m_adam, act, tokens(loss, fam["batch_size"])))

    lora, adapters = make_trainable(build(config, "meta"), "lora", family)
    l_grads, l_adam = gradients_and_adamw_state(adapters)
    act = activation("LoRA", lambda c, t: measure_training(c, family, "lora", "npo", batch, t))
    rows.append(Row(f"LoRA r={LORA_R}, npo", "any", n_params, sum(p.numel() for p in adapters),
                    tensor_bytes(lora.parameters()), l_grads, l_adam, act, tokens("npo", fam["batch_size"])))

    ev = CONFIG["eval_tofu"]
    act = activation("evaluation scoring", lambda c, t: measure_scoring(c, batch, t))
    rows.append(Row("evaluation: scoring", "any", n_params, 0, weights, 0, 0, act, ev["batch_size"] * max_len))
    act = activation("evaluation KV cache", lambda c, t: measure_kv_cache(c, batch, t))
    rows.append(Row(f"evaluation: generation (KV cache, {ev['generation_batch_size']} prompts)", "any", n_params, 0,
                    weights, 0, 0, act, ev["generation_batch_size"] * max_len))

    # The attribution's down_proj gradients (model dtype) and statistics: bytes per down_proj weight as measured.
    down = [d.weight for d in value_vectors(model)]
    per_weight = statistics_per_down_weight(narrow(config, divisors[-1]))
    act = activation(f"attribution {ATTRIBUTION}", lambda c, t: measure_attribution(c, batch, t))
    rows.append(Row(f"attribution {ATTRIBUTION}", "any", n_params, 0,
                    weights + int(per_weight * sum(w.numel() for w in down)), tensor_bytes(down), 0, act,
                    CONFIG["get_mask_tofu"]["batch_size"] * max_len))

    print(f"## {family}: {n_params:,} parameters, bf16")
    print()
    print_rows(rows)
    print()
    print("activation fits, bytes per token (width = 1/divisor):")
    print()
    print("| measured path | " + " | ".join(f"1/{d}" for d in divisors) + " | full width | largest residual |")
    print("|---|" + "---:|" * (len(divisors) + 2))
    for name, (full, residual, ys) in fits.items():
        print(f"| {name} | " + " | ".join(f"{y:,.0f}" for y in ys) + f" | {full:,.0f} | {residual:.1%} |")
    print()
    families = {ref: sorted(n for n in LOSSES if reference_family(n) == ref) for ref in LOSS_FAMILIES}
    print("loss families: " + "; ".join(f"{ref}: {', '.join(names)}" for ref, names in families.items()))

    values = [m.masked_values for _, m in masked_modules(masked)]
    indices = [m.mask_index for _, m in masked_modules(masked)]
    value_bytes = sum(v.numel() for v in values) * torch.empty((), dtype=torch.bfloat16).element_size()
    compact = value_bytes + tensor_bytes(indices)
    print(f"masked checkpoint on disk (bf16): compact {gib(compact)} GiB (masked values {gib(value_bytes)} + "
          f"indices {gib(tensor_bytes(indices))}) vs full {gib(weights)} GiB: {compact / weights:.4f}x")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", action="append", choices=sorted(SHAPES), help="a shape (default: both)")
    p.add_argument("--widths", default="64,32,16", help="divisors of d_model and d_ff for the measured narrow models")
    p.add_argument("--batch", type=int, default=2, help="sequences per part in the measured steps")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sequence in the measured steps")
    args = p.parse_args()
    divisors = sorted((int(d) for d in args.widths.split(",")), reverse=True)
    if len(divisors) < 2:
        p.error("--widths needs at least two divisors to fit a line")
    if max(divisors) > MAX_DIVISOR:
        p.error(f"--widths: at most {MAX_DIVISOR} (head_dim 2)")
    print_header("Memory per GPU at the real shapes (meta-device objects + activations measured on narrow models)")
    print(f"GPU budget: {GPU_BYTES:,} B (an 80 GB card); activations measured with batch {args.batch} x "
          f"{args.seq_len} tokens per part")
    print()
    for family in args.family or sorted(SHAPES):
        report(family, divisors, args.batch, args.seq_len)


if __name__ == "__main__":
    main()
