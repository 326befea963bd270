"""An adapter on disk: ``adapter.safetensors`` (tensors, never pickle) + ``adapter_config.json``.

``adapter_config.json`` is an ``AdapterConfig`` as JSON: the adapter's ``LoRAConfig``, the
fingerprint of the pretrained weights it was added to (``model.base_fingerprint``) and what
rebuilding its classifier needs (base model, label names, max length, cleaning, a quantized
base), so that ``apply_adapter`` can rebuild the same model and refuse another base.

``AdapterConfig.from_json`` is the one reader of that file, for every layout it ever had: keys
that older versions did not write get the value their absence meant, and ``"quantize_base":
"none"`` (before 0.3) is a float base. Every consumer (training's final evaluation, predict.py
alone and with several adapters, lora-serve, lora-export, inspect_lora.py) reads through it.
"""

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import InputError, LoRAConfig
from .model import inject_lora, injection, load_lora_state_dict, lora_state_dict, saved_lora_config
from .quantize import scheme_from_file

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
# The top of the checkout when the package runs from one (an editable install, the repository).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class AdapterConfig:
    """What ``adapter_config.json`` holds.

    Attributes:
        lora: the adapter's LoRA settings (a PiSSA adapter is saved as plain LoRA: see
            ``model.saved_lora_config``).
        base_model: the hub id or folder of the base it was trained on (None: a peft folder
            that names none).
        labels: the label names, in the head's order (None: a peft folder without them; the
            base's are used).
        max_length: inputs are truncated to this many tokens (None: the tokenizer's limit).
        clean: texts were cleaned before tokenising (``lora.data.clean_text``).
        quantize_base: the base was stored quantized in training (``"int8"``, ``"nf4"``; None:
            float), and ``double_quant`` with it.
        base_fingerprint: of the pretrained weights the adapter was added to (None: unknown).
        provenance: the versions and commit that wrote it (``provenance()``).
    """

    lora: LoRAConfig
    base_model: str | None = None
    labels: tuple[str, ...] | None = None
    max_length: int | None = None
    clean: bool = False
    quantize_base: str | None = None
    double_quant: bool = False
    base_fingerprint: str | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    def to_json(self) -> dict:
        """The file's flat layout: the LoRA settings first (without ``init``: an adapter on disk
        is always plain LoRA), then the rest."""
        lora = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self.lora).items()
            if key != "init"
        }
        rest = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
            if key != "lora"
        }
        return {**lora, **rest}

    @classmethod
    def from_json(cls, raw: dict) -> "AdapterConfig":
        """Read any layout this package (or ``lora.peft_format``) ever wrote: a key that a file
        lacks gets the value its absence meant (no dropout, plain LoRA, a float base, no
        fingerprint...), and ``"quantize_base": "none"`` is a float base.

        Raises:
            InputError: a file without the LoRA settings (``r``, ``alpha``), or with a value
            no ``LoRAConfig`` can hold.
        """
        lora_fields = {f.name for f in dataclasses.fields(LoRAConfig)}
        other_fields = {f.name for f in dataclasses.fields(cls)} - {"lora"}
        missing = [key for key in ("r", "alpha") if key not in raw]
        if missing:
            raise InputError(f"an adapter config without {', '.join(missing)}: not a LoRA adapter")
        try:
            lora = LoRAConfig(**{key: value for key, value in raw.items() if key in lora_fields})
        except (TypeError, ValueError) as error:
            raise InputError(f"the adapter's LoRA settings are not valid: {error}") from None
        rest = {key: value for key, value in raw.items() if key in other_fields}
        rest["quantize_base"] = scheme_from_file(rest.get("quantize_base"))
        rest["provenance"] = rest.get("provenance") or {}
        return cls(lora=lora, **rest)


def save_adapter(directory: str | os.PathLike, model: nn.Module, **about) -> Path:
    """Write the adapter of ``model`` (``lora_state_dict``) and its ``AdapterConfig`` into
    ``directory`` (created if needed); ``about``: the config's fields beside ``lora`` and
    ``base_fingerprint``, which come from the model (``base_model``, ``labels``...).

    Returns the directory. Each file is replaced atomically.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in lora_state_dict(model).items()}
    config = AdapterConfig(lora=saved_lora_config(model), base_fingerprint=injection(model).base_fingerprint, **about)
    write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(state, str(path)))
    write_atomically(
        directory / CONFIG_NAME, lambda path: path.write_text(json.dumps(config.to_json(), indent=2) + "\n")
    )
    return directory


def load_adapter(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """Read ``(state, config)`` back from ``directory``.

    Raises:
        FileNotFoundError: naming the missing directory or file.
        InputError: a config that is not valid JSON or not an adapter's (``AdapterConfig.from_json``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"adapter directory {directory} has no {name}")
    try:
        raw = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{directory / CONFIG_NAME} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{directory / CONFIG_NAME} is not an adapter config (a JSON object)")
    return load_file(str(directory / WEIGHTS_NAME)), AdapterConfig.from_json(raw)


class BaseMismatch(InputError):
    """The base weights differ from those the adapter was trained on (other fingerprints)."""

    def __init__(self, expected: str, found: str | None):
        self.expected, self.found = expected, found
        super().__init__(f"the adapter was trained on base weights with fingerprint {expected}, these have {found}")


def apply_adapter(
    model: nn.Module, state: dict[str, torch.Tensor], config: AdapterConfig, force: bool = False
) -> list[str]:
    """Inject LoRA into a fresh base ``model`` as ``config`` says and load ``state`` into it.

    Raises:
        ValueError: the adapter does not fit the model (``load_lora_state_dict``: other modules
        or shapes).
        BaseMismatch: it fits, but ``config`` records a ``base_fingerprint`` and the weights of
        ``model``'s adapted modules hash to another one (unless ``force``). An adapter without
        one loads.
    """
    names = inject_lora(model, config.lora)
    load_lora_state_dict(model, state)  # first: another shape is named as such
    expected, found = config.base_fingerprint, model.lora.base_fingerprint
    if expected and expected != found and not force:
        raise BaseMismatch(expected, found)
    return names


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary_path)``, then rename over ``path``: readers never see half a file,
    and a crash or Ctrl-C in the middle leaves the previous version in place."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- provenance
def git_state(root: Path = SOURCE_ROOT) -> dict:
    """``{"git_commit": sha, "git_dirty": bool}`` when ``root`` is the top of a git checkout,
    dirty meaning tracked files differ from that commit; ``{}`` anywhere else (an installed
    package, a folder inside some other repository, no git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return {}
        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": git("status", "--porcelain", "--untracked-files=no") != "",
        }
    except (OSError, subprocess.SubprocessError):
        return {}


def provenance() -> dict:
    """Where a result came from: this package's version, the git commit of the code that ran,
    and the torch and transformers versions. Plain strings only (``torch.__version__`` is a
    ``TorchVersion``, which ``torch.load`` with ``weights_only=True`` refuses)."""
    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = None
    return {
        "lora_version": __version__,
        **git_state(),
        "torch": str(torch.__version__),
        "transformers": transformers_version,
    }


def version_warning(config: AdapterConfig) -> str | None:
    """One line when the adapter was written by another major version of this package;
    ``None`` when the major versions agree or the adapter does not say (written before 0.3)."""
    trained = config.provenance.get("lora_version")
    if trained is None or trained.split(".")[0] == __version__.split(".")[0]:
        return None
    return (
        f"this adapter was trained with lora {trained} and this is lora {__version__}, "
        "another major version: its files may not be read as they were meant"
    )
