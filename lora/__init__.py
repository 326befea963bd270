"""LoRA in plain PyTorch. The core (this namespace) imports only torch and safetensors.

    delta_W = (alpha / r) * B @ A        y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)

``layer.py`` holds the math, ``variants.py`` DoRA, PiSSA and LoRA+, ``model.py`` puts it into a
model, ``adapter.py`` saves it, ``multi.py`` runs many adapters on one base in one batch.
Data, training and inference live in ``lora.data``, ``lora.training``, ``lora.inference``.
"""
__version__ = "0.3.0"  # the one place it is written: pyproject.toml reads it from here

from .adapter import apply_adapter, load_adapter, save_adapter
from .layer import LoRALinear
from .model import (count_parameters, dequantize_base, inject_lora, layer_index,
                    load_lora_state_dict, lora_layers, lora_settings, lora_state_dict, merge_lora,
                    parameter_table, quantize_base, unmerge_lora)
from .multi import AdapterWeights, MultiAdapterModel
from .quantize import Int8Linear, NF4Linear, QuantizedLinear
from .variants import DoRALinear, lora_plus_groups, pissa_init_

__all__ = [
    "LoRALinear", "DoRALinear", "pissa_init_", "lora_plus_groups", "inject_lora", "merge_lora",
    "unmerge_lora", "lora_layers", "layer_index",
    "lora_state_dict", "load_lora_state_dict", "lora_settings", "save_adapter", "load_adapter",
    "apply_adapter", "count_parameters", "parameter_table",
    "quantize_base", "dequantize_base", "QuantizedLinear", "Int8Linear", "NF4Linear",
    "MultiAdapterModel", "AdapterWeights",
]
