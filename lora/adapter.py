"""An adapter on disk: ``adapter.safetensors`` (tensors, never pickle) + ``adapter_config.json``.

The config holds the LoRA settings read back from the model (r, alpha, dropout, rslora, dora,
target modules, layers, trainable modules), the fingerprint of the pretrained weights the
adapter was added to (``base_fingerprint``, see ``model.base_fingerprint``) plus whatever the
caller adds (base model, label names, max length), so that ``apply_adapter`` can rebuild the
same model, and refuse another base.

Every reader of an adapter (training's final evaluation, ``predict.py``, several adapters,
``lora-serve``, ``lora-export``, ``inspect_lora.py``) gets its config through ``read_config``:
the one place that knows what older files lack or wrote differently.
"""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .io import write_atomically
from .model import inject_lora, load_lora_state_dict, lora_settings, lora_state_dict
from .quantize import scheme_from_file

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
# What every adapter that train.py writes records: without these inference cannot rebuild it.
REQUIRED_KEYS = ("base_model", "labels", "max_length", "r", "alpha", "target_modules")
# What a file may lack, and what its absence meant: keys added after the first files were
# written (dropout 0, a float base, no fingerprint...), and what a peft folder from elsewhere
# does not record (``lora.peft_format``).
OPTIONAL_KEYS = {"dropout": 0.0, "rslora": False, "dora": False, "layers": None, "trainable_modules": [],
                 "clean": False, "quantize_base": None, "double_quant": False, "base_fingerprint": None,
                 "provenance": {}}


def read_config(raw: dict) -> dict:
    """An adapter's config as it means today, whichever version wrote it: every key of
    ``OPTIONAL_KEYS`` present (its default where the file has none), and ``quantize_base``
    None for a float base (older files wrote ``"none"``). Readers then index the config
    (``config["quantize_base"]``), never guess a default of their own. The other keys stay as
    they are (``lora.inference`` refuses a file without one of ``REQUIRED_KEYS``)."""
    config = {**OPTIONAL_KEYS, **raw}
    config["quantize_base"] = scheme_from_file(config["quantize_base"])
    return config


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
    """Read ``(state, config)`` back from ``directory``; the config through ``read_config``.

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
    return load_file(str(directory / WEIGHTS_NAME)), read_config(config)


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
    config = read_config(config)
    names = inject_lora(model, target_modules=config["target_modules"], r=config["r"], alpha=config["alpha"],
                        dropout=config["dropout"], trainable_modules=config["trainable_modules"],
                        layers=config["layers"], rslora=config["rslora"], dora=config["dora"])
    load_lora_state_dict(model, state)  # first: another shape is named as such
    expected, found = config["base_fingerprint"], getattr(model, "lora_base_fingerprint", None)
    if expected and expected != found and not force:
        raise BaseMismatch(expected, found)
    return names
