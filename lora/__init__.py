"""LoRA in plain PyTorch. The core (this namespace) imports only torch and safetensors.

    delta_W = (alpha / r) * B @ A        y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)

Read ``layer.py`` first (the math, about 150 lines), then ``model.py`` (putting it into a model,
the encoder families' names and heads). ``config.py`` holds ``LoRAConfig``, ``variants.py`` DoRA,
PiSSA, LoRA+ and LoRA on slices of a fused q/k/v Linear, ``quantize.py`` the int8 / NF4 base,
``adapter.py`` the adapter folder, ``peft_format.py`` peft's, ``inspection.py`` what an adapter did,
``data.py`` AG News, ``classifier.py`` a pretrained classifier with an adapter.
The jobs built on it live in sub-packages: ``lora.train``, ``lora.search``, ``lora.serve``, and
``lora.cli`` the command lines.
"""

__version__ = "0.3.0"  # the one place it is written: pyproject.toml reads it from here

from .adapter import AdapterConfig, apply_adapter, load_adapter, save_adapter
from .config import InputError, LoRAConfig
from .layer import LoRALinear
from .model import (
    count_parameters,
    dequantize_base,
    inject_lora,
    layer_index,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    parameter_table,
    quantize_base,
    unmerge_lora,
)
from .quantize import Int8Linear, NF4Linear, QuantizedLinear
from .variants import DoRALinear, FusedQKVLoRALinear, lora_plus_groups, pissa_init_

__all__ = [
    "LoRALinear",
    "LoRAConfig",
    "DoRALinear",
    "FusedQKVLoRALinear",
    "pissa_init_",
    "lora_plus_groups",
    "inject_lora",
    "merge_lora",
    "unmerge_lora",
    "lora_layers",
    "layer_index",
    "lora_state_dict",
    "load_lora_state_dict",
    "AdapterConfig",
    "save_adapter",
    "load_adapter",
    "apply_adapter",
    "count_parameters",
    "parameter_table",
    "quantize_base",
    "dequantize_base",
    "QuantizedLinear",
    "Int8Linear",
    "NF4Linear",
    "InputError",
]
