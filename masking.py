"""Choose what trains: selected value vectors only (a mask), LoRA adapters, or every parameter.

Masked training (`MaskedValues`) moves each selected down_proj column into a small parameter of its own
(`masked_values`, shape d_model x k; the column itself is zeroed) and adds its product with the input to the layer's
output in a forward hook. Every other weight is frozen, so the optimizer holds state for the selected values only
and nothing outside the mask can move, weight decay included.

Trainable values (masked values, LoRA adapters) are fp32 master copies whatever the model's dtype: at lr 1e-5 most
Adam updates to a bf16 weight are smaller than half its ulp and round away, and which values still move would then
depend on their magnitude. The frozen model stays in its own dtype, and checkpoints are written in it.

`zeroed_values` is the other use of a mask: the selected values set to zero for a block (the localization
sanity check, evaluator.localization_check), then restored.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from models import value_vectors

# The masters are registered on their down_proj under this name, so state dicts, trainer_state.pt and DeepSpeed
# checkpoints call them "<layer>.mlp.down_proj.masked_values"; runs saved before MaskedValues existed used it too.
MASKED_VALUES = "masked_values"


def _add_masked_values(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    # The selected columns of W are zeroed when the mask is attached, so W x + V x[idx] is the output of W with those
    # columns replaced by V, whatever the frozen columns held before: a resumed run loads them trained (and rounded
    # to bf16) and must compute exactly what the uninterrupted run did.
    selected_inputs = inputs[0].index_select(-1, module.mask_index)
    return output + F.linear(selected_inputs, module.masked_values.to(output.dtype))


class MaskedValues:
    """Only the selected value vectors of a model train (an adapter over its down_proj layers, removable).

    ``attach`` freezes the model and moves each selected column into an fp32 master (zeroing the column) that a
    forward hook adds back; ``remove`` writes the masters into their columns in the weight's dtype and takes the
    masters, indices and hooks away, leaving a plain model.
    """

    def __init__(self, indices: Sequence[torch.Tensor]) -> None:
        self.indices = list(indices)
        self._attached: list[tuple[nn.Linear, RemovableHandle]] = []

    def attach(self, model: nn.Module) -> MaskedValues:
        if self._attached:
            raise RuntimeError("this mask is already attached to a model; remove() it first")
        downs = value_vectors(model)
        if len(self.indices) != len(downs):
            raise ValueError(f"the mask has {len(self.indices)} layers but the model has {len(downs)}")
        if any(hasattr(down, MASKED_VALUES) for down in downs):
            raise ValueError("the model already has a value-vector mask attached")
        model.requires_grad_(False)
        for down, idx in zip(downs, self.indices):
            if len(idx) == 0:
                continue
            down.register_buffer("mask_index", idx.to(down.weight.device, torch.long), persistent=False)
            down.masked_values = nn.Parameter(down.weight[:, down.mask_index].detach().float())
            down.weight.data[:, down.mask_index] = 0
            self._attached.append((down, down.register_forward_hook(_add_masked_values)))
        return self

    def parameters(self) -> list[nn.Parameter]:
        """The fp32 masters, one per layer with selected values, in layer order: what the optimizer trains."""
        return [down.masked_values for down, _ in self._attached]

    @torch.no_grad()
    def remove(self) -> None:
        """Back to a plain model holding the trained values (it stays frozen; the masters are dropped)."""
        for down, handle in self._attached:
            down.weight[:, down.mask_index] = down.masked_values.to(down.weight.dtype)
            handle.remove()
            del down.masked_values, down.mask_index
        self._attached = []


@contextlib.contextmanager
def zeroed_values(model: nn.Module, indices: Sequence[torch.Tensor]) -> Iterator[None]:
    """The given value vectors (per-layer indices, as in a mask) set to zero inside the block: an ablation.

    Their columns are copied out first and written back on exit, also when the block raises, so the model leaves
    bit for bit as it came (a copy of the columns, not of the model: the ablation of an 8B model's 10% mask costs
    a tenth of its value weights, not the model).  A model with a MaskedValues attached is refused: its selected
    columns are already zero and the hook adds them back, so zeroing them would change nothing.
    """
    downs = value_vectors(model)
    if len(indices) != len(downs):
        raise ValueError(f"the mask has {len(indices)} layers but the model has {len(downs)}")
    if any(hasattr(down, MASKED_VALUES) for down in downs):
        raise ValueError("the model has a value-vector mask attached; remove() it before zeroing values")
    saved: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for down, idx in zip(downs, indices):
                idx = idx.to(down.weight.device, torch.long)
                saved.append((down, idx, down.weight[:, idx].clone()))
                down.weight[:, idx] = 0
        yield
    finally:
        with torch.no_grad():
            for down, idx, columns in saved:
                down.weight[:, idx] = columns


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, down_proj) of every layer whose values a MaskedValues has attached to ``model``."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, MASKED_VALUES)]


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]
               ) -> tuple[nn.Module, list]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    # autocast_adapter_dtype: fp32 adapters (masters) on a bf16 model; peft casts their input and output.
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


LORA_BASE = ".base_layer."  # peft's prefix of a wrapped layer's own weights in the state dict


@torch.no_grad()
def _lora_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What merge_and_unload() of a copy would hold, computed one LoRA layer at a time from the live model.

    Copying the model to merge it would double its memory; here only the merged target weights are new, and the
    live model stays unmerged and trainable. W + delta is added in fp32 and rounded once to W's dtype, as peft's
    in-place merge of fp32 adapters into a bf16 weight does, so the two agree to the bit.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    state = {k.replace(LORA_BASE, "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            merged = weight.float()
            for adapter in module.active_adapters:
                merged = merged + module.get_delta_weight(adapter)
            state[f"{name}.weight"] = merged.to(weight.dtype)
    return state


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of an ordinary checkpoint: masked values written into their columns, LoRA merged."""
    if hasattr(model, "peft_config"):
        return _lora_merged_state_dict(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(MASKED_VALUES)}
    for name, module in masked_modules(model):
        weight = module.weight.detach().clone()
        weight[:, module.mask_index] = module.masked_values.detach().to(weight.dtype)
        state[f"{name}.weight"] = weight
    return state


def base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model
