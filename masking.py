"""Choose what trains: selected value vectors only (a mask), LoRA adapters, or every parameter.

Masked training keeps each selected down_proj column in a small parameter of its own (`masked_values`, shape
d_model x k) and adds its change to the layer's output in a forward hook. Every other weight is frozen, so the
optimizer holds state for the selected values only and nothing outside the mask can move, weight decay included.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models import decoder_layers

MASKED_VALUES = "masked_values"


def _add_masked_delta(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    # W x + (V - W[:, idx]) x[idx] equals the output of W with columns idx replaced by V, without copying W.
    selected_inputs = inputs[0].index_select(-1, module.mask_index)
    return output + F.linear(selected_inputs, module.masked_values - module.weight[:, module.mask_index])


def apply_value_vector_mask(model: nn.Module, indices: Iterable[torch.Tensor]) -> list[nn.Parameter]:
    """Freeze the model and make only the selected value vectors (down_proj columns) trainable."""
    model.requires_grad_(False)
    trainable = []
    for layer, idx in zip(decoder_layers(model), indices):
        if len(idx) == 0:
            continue
        down = layer.mlp.down_proj
        down.register_buffer("mask_index", idx.to(down.weight.device, torch.long), persistent=False)
        down.masked_values = nn.Parameter(down.weight[:, down.mask_index].detach().clone())
        down.register_forward_hook(_add_masked_delta)
        trainable.append(down.masked_values)
    return trainable


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> tuple[nn.Module, list]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of an ordinary checkpoint: masked values written into their columns, LoRA merged."""
    if hasattr(model, "peft_config"):
        import copy

        return copy.deepcopy(model).merge_and_unload().state_dict()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(MASKED_VALUES)}
    for name, module in model.named_modules():
        if hasattr(module, MASKED_VALUES):
            weight = module.weight.detach().clone()
            weight[:, module.mask_index] = module.masked_values.detach()
            state[f"{name}.weight"] = weight
    return state


def base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model
