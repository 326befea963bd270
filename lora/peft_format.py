"""Our adapter <-> Hugging Face peft's LoRA format, both ways (imports only torch, safetensors, json).

A peft LoRA folder holds ``adapter_model.safetensors`` and ``adapter_config.json``. For a
sequence classifier (``task_type`` ``SEQ_CLS``) the classification head trains in full and is
saved whole (``modules_to_save``). The tensors map one to one::

    ours                                  peft (on disk, adapter name dropped)
    X.lora_A             (r, in)          base_model.model.X.lora_A.weight
    X.lora_B             (out, r)         base_model.model.X.lora_B.weight
    X.lora_magnitude     (out,)  DoRA     base_model.model.X.lora_magnitude_vector
    classifier.P         the head         base_model.model.classifier.P

and so do the settings: ``r``, ``alpha`` -> ``lora_alpha``, ``dropout`` -> ``lora_dropout``,
``rslora`` -> ``use_rslora``, ``dora`` -> ``use_dora``, ``layers`` -> ``layers_to_transform``,
``trainable_modules`` -> ``modules_to_save``, ``base_model`` -> ``base_model_name_or_path``.
A PiSSA adapter is already saved as the plain rank-``2r`` LoRA on the pretrained weights
(``model.lora_state_dict``), which is also what peft saves after its conversion.

LoRA on ``k`` slices of a fused q/k/v Linear (ModernBERT's ``Wqkv``) is written as what it is, one
LoRA of rank ``k r`` on the whole ``Wqkv``: ``A`` as it is (the ``A_i`` stacked), ``B`` block-
structured with zero rows for the slices not adapted (``variants.stack_slices``), and
``lora_alpha = k * alpha`` (``sqrt(k) * alpha`` with rsLoRA) for the same scaling; beside other
targets of rank ``r``, through peft's ``rank_pattern`` and ``alpha_pattern``. Read back, it is
that plain rank-``k r`` LoRA on ``Wqkv``: the same function.

What peft's config has no field for (label names, max length, cleaning, the base fingerprint,
quantization) goes to ``lora_extras.json`` beside it: peft ignores that file, and reading the
folder back gives our adapter as it was.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import AdapterConfig
from .config import InputError, LoRAConfig
from .model import layer_index, path_in_layer
from .variants import QKV_ROLES, stack_slices

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
EXTRAS_NAME = "lora_extras.json"
PREFIX = "base_model.model."
# Our LoRA tensor name endings and peft's on disk (peft before 0.14 saved DoRA's with ``.weight``).
LORA_SUFFIXES = {
    ".lora_A": (".lora_A.weight",),
    ".lora_B": (".lora_B.weight",),
    ".lora_magnitude": (".lora_magnitude_vector", ".lora_magnitude_vector.weight"),
}
# The settings our config keeps that peft's does not (written to EXTRAS_NAME).
LORA_SETTINGS = ("r", "alpha", "dropout", "rslora", "dora", "target_modules", "layers", "trainable_modules")
# peft options that change what the saved tensors mean; an adapter using them is refused.
UNSUPPORTED = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
}
# init_lora_weights values under which peft changes the base weights (saved unconverted,
# such an adapter only works on the changed base).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class NotMappable(InputError):
    """A peft adapter our LoRA cannot reproduce (another tuner or task, an unsupported option)."""


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds peft's two files."""
    directory = Path(directory)
    return (directory / PEFT_WEIGHTS_NAME).is_file() and (directory / PEFT_CONFIG_NAME).is_file()


def _is_lora(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in LORA_SUFFIXES)


def to_peft(state: dict[str, torch.Tensor], config: AdapterConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Our ``(state, config)`` (``load_adapter``'s) as peft's ``(tensors, adapter_config)``.

    ``target_modules`` are our target names when peft's rule (a module whose dotted name ends
    with ``.target``, in ``layers_to_transform``) picks the same modules: every target a plain
    name that an adapted module carries and no module of the head does. Otherwise (a path such
    as ``output.dense``, which peft would also match in ``attention.output.dense``; ``dense``
    with a head that has a ``dense`` too; a generic name such as DeBERTa's ``query``, whose
    module is ``query_proj``; slices of a fused Linear) they are the full names of the adapted
    modules, which peft matches exactly.

    Raises:
        NotMappable: an adapter whose head keeps its hidden layer frozen (``head`` ``"lora"`` or
        ``"linear"``): that layer may be the identity ``inject_lora`` set, which peft's base lacks.
    """
    lora = config.lora
    if lora.head != "full":
        raise NotMappable(
            f"an adapter with head {lora.head!r} keeps the head's hidden layer frozen, at the identity when the "
            "checkpoint lacks it: peft's base model would bring its own; export an adapter trained with head full"
        )
    # Slices of a fused q/k/v Linear: B (k, h, r) -> the block-structured B' (3 h, k r).
    fused = {name: tensor for name, tensor in state.items() if name.endswith(".lora_B") and tensor.ndim == 3}
    slices = tuple(role for role in QKV_ROLES if role in lora.target_modules)
    tensors = {}
    for name, tensor in state.items():
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        key = name.removesuffix(suffix) + LORA_SUFFIXES[suffix][0] if suffix else name
        tensors[PREFIX + key] = (stack_slices(tensor, slices) if name in fused else tensor).contiguous()
    head_modules = {part for name in state if not _is_lora(name) for part in name.split(".")[:-1]}
    adapted = sorted(name.removesuffix(".lora_A") for name in state if name.endswith(".lora_A"))
    targets = list(lora.target_modules)
    carried = {name.rsplit(".", 1)[-1] for name in adapted}
    if fused or any("." in target or target in head_modules or target not in carried for target in targets):
        targets = adapted
    rank, alpha = lora.r, lora.alpha
    k = len(slices)
    fused_rank, fused_alpha = k * lora.r, lora.alpha * (k**0.5 if lora.rslora else k)
    patterns = {}
    if fused and len(fused) == len(adapted):  # every adapted module is fused: one rank
        rank, alpha = fused_rank, fused_alpha
    elif fused:
        names = [name.removesuffix(".lora_B") for name in fused]
        patterns = {
            "rank_pattern": dict.fromkeys(names, fused_rank),
            "alpha_pattern": dict.fromkeys(names, fused_alpha),
        }
    return tensors, {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": config.base_model,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "layers_to_transform": None if lora.layers is None else list(lora.layers),
        "layers_pattern": None,
        "use_rslora": lora.rslora,
        "use_dora": lora.dora,
        "modules_to_save": list(lora.trainable_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        **patterns,
    }


def from_peft(tensors: dict[str, torch.Tensor], peft_config: dict) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """peft's ``(tensors, adapter_config)`` as our ``(state, config)``; the config holds our LoRA
    settings and ``base_model`` (``base_model_name_or_path``, possibly None), nothing else.

    The adapted modules come from the tensor names: ``target_modules`` are their paths inside
    an encoder layer and ``layers`` their layer indices (``inject_lora`` adapts every path in
    every layer listed, so the adapter must adapt such a grid). ``trainable_modules`` are the
    ``modules_to_save`` that hold saved tensors: the classification head.

    Raises:
        NotMappable: another ``peft_type`` or ``task_type``, an option that changes what the
        tensors mean (``UNSUPPORTED``, ``bias``, a base-changing ``init_lora_weights``), a
        tensor that is neither LoRA nor in ``modules_to_save``, no saved head, or adapted
        modules that are not a grid of layers x paths.
    """
    peft_type, task_type = peft_config.get("peft_type"), peft_config.get("task_type")
    if peft_type != "LORA":
        raise NotMappable(f"peft_type {peft_type}: only LoRA adapters (peft_type LORA) can be read")
    if task_type != "SEQ_CLS":
        raise NotMappable(f"task_type {task_type}: only sequence-classification adapters (SEQ_CLS) can be read")
    used = [
        f"{option}={peft_config[option]!r}"
        for option, default in UNSUPPORTED.items()
        if peft_config.get(option, default) not in (default, None)
    ]
    if peft_config.get("bias", "none") != "none":
        used.append(f"bias={peft_config['bias']!r}")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        used.append(f"init_lora_weights={init!r} (saved against the changed base; save it converted)")
    if used:
        raise NotMappable(f"unsupported peft option(s): {', '.join(used)}")

    modules_to_save = [m for m in peft_config.get("modules_to_save") or [] if m]
    state, head_owners = {}, set()
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        ours = next(
            (ours for ours, theirs in LORA_SUFFIXES.items() for suffix in theirs if name.endswith(suffix)), None
        )
        if ours:
            suffix = next(s for s in LORA_SUFFIXES[ours] if name.endswith(s))
            state[name.removesuffix(suffix) + ours] = tensor
            continue
        owner = next(
            (m for m in modules_to_save if name == m or name.startswith(m + ".") or f".{m}." in f".{name}"), None
        )
        if owner is None or ".lora_" in name:
            raise NotMappable(f"tensor {key} is neither LoRA A/B/magnitude nor in modules_to_save {modules_to_save}")
        head_owners.add(owner)
        state[name] = tensor
    if not head_owners:
        raise NotMappable(
            f"the adapter saves no classification head (modules_to_save {modules_to_save} "
            "holds no tensor): its predictions would come from a random head"
        )

    adapted = sorted(name.removesuffix(".lora_A") for name in state if name.endswith(".lora_A"))
    if not adapted:
        raise NotMappable("the adapter has no LoRA tensors")
    outside = [name for name in adapted if layer_index(name) is None]
    if outside:
        raise NotMappable(f"adapted module(s) outside the encoder layers cannot be mapped: {', '.join(outside)}")
    paths = sorted({path_in_layer(name) for name in adapted})
    layers = sorted({layer_index(name) for name in adapted})
    if len(adapted) != len(paths) * len(layers):
        raise NotMappable(
            f"the adapter adapts different modules in different layers ({len(adapted)} modules, "
            f"{len(paths)} paths x {len(layers)} layers); only the same modules in each layer map"
        )
    try:  # peft's own defaults where its config is silent
        lora = LoRAConfig(
            r=peft_config["r"],
            alpha=peft_config.get("lora_alpha", 8),
            dropout=peft_config.get("lora_dropout", 0.0),
            rslora=peft_config.get("use_rslora", False),
            dora=peft_config.get("use_dora", False),
            target_modules=paths,
            layers=layers,
            trainable_modules=sorted(head_owners),
        )
    except (KeyError, ValueError) as error:
        raise NotMappable(f"peft's LoRA settings are not valid: {error}") from None
    return state, AdapterConfig(lora=lora, base_model=peft_config.get("base_model_name_or_path"))


def save_peft_adapter(
    directory: str | os.PathLike,
    state: dict[str, torch.Tensor],
    config: AdapterConfig,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write our adapter as a peft folder: peft's two files, and ``lora_extras.json`` with the
    rest of ``config`` (labels, max length, fingerprint...). ``base_model_name_or_path``: what
    peft and transformers should load as the base (default: ``config.base_model``; give the
    folder behind an alias such as ``minilm``). Returns the directory."""
    tensors, peft_config = to_peft(state, config)  # first: an adapter peft cannot hold leaves no folder
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config["base_model_name_or_path"] = base_model_name_or_path or peft_config["base_model_name_or_path"]
    save_file(tensors, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    extras = {key: value for key, value in config.to_json().items() if key not in LORA_SETTINGS}
    (directory / EXTRAS_NAME).write_text(json.dumps(extras, indent=2) + "\n")
    return directory


def load_peft_adapter(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """Read a peft LoRA folder as our ``(state, config)``: ``from_peft``, then the extras of
    ``lora_extras.json`` when the folder came from ``save_peft_adapter`` (our LoRA settings
    always come from peft's config, the file's other fields only add to them).

    Raises:
        NotMappable: see ``from_peft``. InputError: a config that is not valid JSON.
    """
    directory = Path(directory)
    try:
        peft_config = json.loads((directory / PEFT_CONFIG_NAME).read_text())
        extras = json.loads((directory / EXTRAS_NAME).read_text()) if (directory / EXTRAS_NAME).is_file() else {}
    except json.JSONDecodeError as error:
        raise InputError(f"{directory}: a config is not valid JSON: {error}") from None
    state, config = from_peft(load_file(str(directory / PEFT_WEIGHTS_NAME)), peft_config)
    lora = {key: value for key, value in config.to_json().items() if key in LORA_SETTINGS}
    return state, AdapterConfig.from_json(
        {**extras, **lora, "base_model": extras.get("base_model") or config.base_model}
    )
