"""LoRA in plain PyTorch. The core (this namespace) imports only torch and safetensors.

    delta_W = (alpha / r) * B @ A        y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r)

``layer.py`` holds the math, ``variants.py`` DoRA, PiSSA and LoRA+, ``quantize.py`` the int8 / NF4
base, ``model.py`` puts it into a model, ``adapter.py`` saves it, ``peft_format.py``
writes and reads it in Hugging Face peft's format, ``multi.py`` runs many adapters on one base in
one batch.
The training job starts at ``lora.training.train`` (the loop is ``_train``; its pieces are
``config``, ``data``, ``progress``, ``run_folder``, ``checkpoint``, ``evaluation``, ``distributed``,
``signals``); inference at ``lora.inference.load_classifier``. The README's file map lists them all.
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
