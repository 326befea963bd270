"""An adapter on disk: ``adapter.safetensors`` (tensors, never pickle) + ``adapter_config.json``.

The config holds the LoRA settings read back from the model (r, alpha, dropout, rslora, dora,
target modules, layers, trainable modules), the fingerprint of the pretrained weights the
adapter was added to (``base_fingerprint``, see ``model.base_fingerprint``) plus whatever the
caller adds (base model, label names, max length), so that ``apply_adapter`` can rebuild the
same model, and refuse another base.
"""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .io import write_atomically
from .model import inject_lora, load_lora_state_dict, lora_settings, lora_state_dict

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


def save_adapter(directory: str | os.PathLike, model: nn.Module, config: dict | None = None) -> Path:
    """Write the adapter tensors and config into ``directory`` (created if needed).

    Returns the directory. Each file is replaced atomically.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in lora_state_dict(model).items()}
    fingerprint = getattr(model, "lora_base_fingerprint", None)
    full_config = {**lora_settings(model), **({"base_fingerprint": fingerprint} if fingerprint else {}),
                   **(config or {})}
    write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(state, str(path)))
    write_atomically(directory / CONFIG_NAME,
                      lambda path: path.write_text(json.dumps(full_config, indent=2) + "\n"))
    return directory


def load_adapter(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(state, config)`` back from ``directory``.

    Raises:
        FileNotFoundError: naming the missing directory or file.
        ValueError: when the config is not valid JSON.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"adapter directory {directory} has no {name}")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON: {error}") from None
    return load_file(str(directory / WEIGHTS_NAME)), config


class BaseMismatch(ValueError):
    """The base weights differ from those the adapter was trained on (other fingerprints)."""

    def __init__(self, expected: str, found: str | None):
        self.expected, self.found = expected, found
        super().__init__(f"the adapter was trained on base weights with fingerprint {expected}, "
                         f"these have {found}")


def apply_adapter(model: nn.Module, state: dict[str, torch.Tensor], config: dict,
                  force: bool = False) -> list[str]:
    """Inject LoRA into a fresh base ``model`` as ``config`` says and load ``state`` into it.

    Raises:
        ValueError: the adapter does not fit the model (``load_lora_state_dict``: other modules
        or shapes).
        BaseMismatch: it fits, but ``config`` records a ``base_fingerprint`` and the weights of
        ``model``'s adapted modules hash to another one (unless ``force``). An adapter without
        one loads.
    """
    names = inject_lora(model, target_modules=config["target_modules"], r=config["r"],
                        alpha=config["alpha"], dropout=config.get("dropout", 0.0),
                        trainable_modules=config.get("trainable_modules", ()),
                        layers=config.get("layers"), rslora=config.get("rslora", False),
                        dora=config.get("dora", False))
    load_lora_state_dict(model, state)  # first: another shape is named as such
    expected, found = config.get("base_fingerprint"), getattr(model, "lora_base_fingerprint", None)
    if expected and expected != found and not force:
        raise BaseMismatch(expected, found)
    return names
