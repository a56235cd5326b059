"""Choose what trains: selected value vectors only (a mask), LoRA adapters, or every parameter.

Masked training moves each selected down_proj column into a small parameter of its own (`masked_values`, shape
d_model x k; the column itself is zeroed) and adds its product with the input to the layer's output in a forward
hook. Every other weight is frozen, so the optimizer holds state for the selected values only and nothing outside
the mask can move, weight decay included.

Trainable values (masked values, LoRA adapters) are fp32 master copies whatever the model's dtype: at lr 1e-5 most
Adam updates to a bf16 weight are smaller than half its ulp and round away, and which values still move would then
depend on their magnitude. The frozen model stays in its own dtype, and checkpoints are written in it.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models import decoder_layers

MASKED_VALUES = "masked_values"


def _add_masked_values(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    # The selected columns of W are zeroed when the mask is applied, so W x + V x[idx] is the output of W with those
    # columns replaced by V, whatever the frozen columns held before: a resumed run loads them trained (and rounded
    # to bf16) and must compute exactly what the uninterrupted run did.
    selected_inputs = inputs[0].index_select(-1, module.mask_index)
    return output + F.linear(selected_inputs, module.masked_values.to(output.dtype))


def apply_value_vector_mask(model: nn.Module, indices: Iterable[torch.Tensor]) -> list[nn.Parameter]:
    """Freeze the model and make only the selected value vectors (down_proj columns) trainable."""
    model.requires_grad_(False)
    trainable = []
    for layer, idx in zip(decoder_layers(model), indices):
        if len(idx) == 0:
            continue
        down = layer.mlp.down_proj
        down.register_buffer("mask_index", idx.to(down.weight.device, torch.long), persistent=False)
        down.masked_values = nn.Parameter(down.weight[:, down.mask_index].detach().float())
        down.weight.data[:, down.mask_index] = 0
        down.register_forward_hook(_add_masked_values)
        trainable.append(down.masked_values)
    return trainable


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> tuple[nn.Module, list]:
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
    for name, module in model.named_modules():
        if hasattr(module, MASKED_VALUES):
            weight = module.weight.detach().clone()
            weight[:, module.mask_index] = module.masked_values.detach().to(weight.dtype)
            state[f"{name}.weight"] = weight
    return state


def base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model
