"""Inference with a trained adapter: rebuild the model, merge the adapter, predict.

    model, tokenizer = load_classifier("runs/20250101-120000")
    classify(model, tokenizer, "Stocks rally as oil prices fall")     # -> "Business"
    classify(model, tokenizer, ["Team wins the cup", "New chip"])     # -> ["Sports", "Sci/Tech"]
    predict_proba(model, tokenizer, texts)                            # (N, num_labels) numpy

``load_classifier`` reads our run folders and peft LoRA folders of sequence classifiers
(``lora/peft_format.py``), refuses an adapter whose base weights differ from those it was
trained on (``base_fingerprint``) unless ``force``, and leaves the adapter's config on the
model as ``model.adapter_config``, and
the prediction functions read from it what training did to the text before tokenising
(``clean``) and how long inputs were (``max_length``): inference sees text as training did.
"""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError

from .adapter import CONFIG_NAME, WEIGHTS_NAME, BaseMismatch, REQUIRED_KEYS, apply_adapter, load_adapter, read_config
from .backbone import base_label_names, load_classifier_model, load_tokenizer
from .data import clean_text, tokenize
from .errors import UsageError
from .model import merge_lora, quantize_base, unmerge_lora
from .peft_format import NotMappable, is_peft_folder, load_peft_adapter
from .provenance import version_warning
from .device import pick_device
from .evaluation import batched_logits
from .io import write_atomically
from .run_folder import RUNS_DIR

# What a merge is checked on when the caller gives no texts: short, long, empty.
CHECK_TEXTS = [
    "Stocks rally as oil prices fall",
    "Team wins the cup after a late goal in extra time",
    "Scientists unveil a faster computer chip for online research and space missions",
    "",
]
# Merged and unmerged probabilities may differ by float rounding, never by more than this.
MERGE_TOLERANCE = 1e-3
# A peft adapter that records no max length reads at most this many tokens (roberta-base's limit).
PEFT_MAX_LENGTH = 512


def latest_run(runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """The most recently written folder under ``runs_dir`` that holds an adapter."""
    runs = [d for d in Path(runs_dir).glob("*")
            if (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file()]
    if not runs:
        raise UsageError(f"no run with an adapter under {runs_dir}/; "
                         "train one with train.py or name one with --adapter")
    return max(runs, key=lambda d: d.stat().st_mtime)


def read_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``load_adapter`` (or ``load_peft_adapter`` for a peft folder) with every problem (missing
    or unreadable file, missing key, a peft adapter we cannot map) as a UsageError. The config
    comes through ``lora.adapter.read_config`` either way."""
    try:
        if is_peft_folder(adapter_dir) and not (adapter_dir / WEIGHTS_NAME).is_file():
            state, config = load_peft_adapter(adapter_dir)
            return state, read_config({**_peft_defaults(adapter_dir, state, config), **config})
        state, config = load_adapter(adapter_dir)
    except NotMappable as error:
        raise UsageError(f"{adapter_dir}: {error}") from None
    except (OSError, ValueError, SafetensorError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise UsageError(f"{adapter_dir / CONFIG_NAME} has no {', '.join(missing)}; "
                         "was it written by train.py?")
    return state, config


def _peft_defaults(adapter_dir: Path, state: dict[str, torch.Tensor], config: dict) -> dict:
    """What a peft folder from elsewhere does not record: the label names (``id2label`` of a
    ``config.json`` in the folder, else None: the base's, see ``load_classifier``) and the max
    length (None: the tokenizer's, at most ``PEFT_MAX_LENGTH``). Texts are not cleaned."""
    labels = None
    if (adapter_dir / "config.json").is_file():
        id2label = json.loads((adapter_dir / "config.json").read_text()).get("id2label") or {}
        labels = [id2label[str(i)] for i in range(len(id2label))] or None
    return {"labels": labels, "max_length": None, "clean": False, "num_labels": _head_size(state)}


def _head_size(state: dict[str, torch.Tensor]) -> int:
    """The number of labels of a saved head: the smallest output size of its weight matrices
    (RoBERTa's head is ``dense`` (hidden, hidden) then ``out_proj`` (labels, hidden))."""
    return min(tensor.shape[0] for name, tensor in state.items()
               if tensor.ndim == 2 and not name.endswith((".lora_A", ".lora_B")))


def load_classifier(adapter_dir: str | os.PathLike, device: str = "auto", merge: bool = True,
                    check_texts: list[str] | None = None, base_model: str | None = None,
                    force: bool = False):
    """The adapter's base model with the adapter applied, in eval mode on ``device``.

    Args:
        adapter_dir: a folder written by ``save_adapter`` (a run folder of ``train.py``), or a
            peft LoRA folder of a sequence classifier (head in ``modules_to_save``).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        merge: fold every LoRA update into its base weight: inference then costs what the
            base model costs. The merge is checked on ``check_texts`` (default: a few built-in
            headlines); if merged predictions differ from unmerged ones (or merging would put
            NaN in a weight) the model stays unmerged and a warning says so.
        base_model: the base to load instead of the one the adapter names (hub id or folder).
        force: load the adapter even onto base weights other than those it was trained on.

    The base is quantized as the adapter's config records (``quantize_base``, ``double_quant``),
    so the adapter meets the weights it was trained against; merged, it is then a float model
    holding ``dequantize(Wq) + scaling * B @ A`` (see ``merge_lora``).

    Returns:
        ``(model, tokenizer)``; ``model.adapter_config`` holds the adapter's config.

    Raises:
        UsageError: a missing or unreadable adapter, one that does not fit its base model
        (other target modules, other shapes, another number of labels), a peft adapter we
        cannot map, or other base weights than the adapter's (unless ``force``).
    """
    adapter_dir = Path(adapter_dir)
    state, config = read_adapter(adapter_dir)
    if warning := version_warning(config):
        warnings.warn(warning, stacklevel=2)
    base = base_model or config["base_model"]
    if base is None:
        raise UsageError(f"adapter {adapter_dir} names no base model (base_model_name_or_path); give one")
    device = pick_device(device)
    tokenizer = load_tokenizer(base)
    config["max_length"] = config["max_length"] or min(tokenizer.model_max_length, PEFT_MAX_LENGTH)
    if config["labels"] is None:  # a peft adapter: the base's label names when they fit its head
        names = base_label_names(base)
        config["labels"] = names if len(names) == config["num_labels"] else [
            f"LABEL_{i}" for i in range(config["num_labels"])]
    model = load_classifier_model(base, config["labels"])
    try:
        apply_adapter(model, state, config, force=force)
        if config["quantize_base"] is not None:  # the base it was trained on
            quantize_base(model, config["quantize_base"], config["double_quant"])
    except BaseMismatch as mismatch:
        raise UsageError(f"adapter {adapter_dir} was trained on base {config['base_model']!r} (fingerprint "
                         f"{mismatch.expected}), not on base {base!r} (fingerprint {mismatch.found}); "
                         "--force (force=True) loads it anyway") from None
    except (ValueError, TypeError) as error:
        raise UsageError(f"adapter {adapter_dir} does not fit base model {base!r}: {error}") from None
    model.adapter_config = config
    model.to(device).eval()
    if merge:
        _merge_checked(model, tokenizer, check_texts or CHECK_TEXTS)
    return model, tokenizer


def _merge_checked(model, tokenizer, texts: list[str]) -> None:
    """Merge the LoRA updates unless that changes the predictions on ``texts``; if it does,
    unmerge (the base weights come back bit for bit) and warn."""
    unmerged = predict_proba(model, tokenizer, texts, progress=False)
    try:
        merge_lora(model)
    except ValueError as error:  # NaN or inf in a merged weight
        unmerge_lora(model)
        warnings.warn(f"{error}; predicting with the adapter unmerged (slower)", stacklevel=3)
        return
    merged = predict_proba(model, tokenizer, texts, progress=False)
    difference = np.abs(merged - unmerged).max()
    if (merged.argmax(axis=1) != unmerged.argmax(axis=1)).any() or difference > MERGE_TOLERANCE:
        unmerge_lora(model)
        warnings.warn(f"merged predictions differ from unmerged ones on {len(texts)} sample texts "
                      f"(largest probability difference {difference:.2g}); "
                      "predicting with the adapter unmerged (slower)", stacklevel=3)


def predict_proba(model, tokenizer, texts: list[str], batch_size: int = 64,
                  max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """Class probabilities, float32 numpy ``(N, num_labels)``, row ``i`` for ``texts[i]``.

    Texts are cleaned if the adapter was trained on cleaned text, tokenised and truncated to
    ``max_length`` (default: the adapter's), then batched by length so that each batch pads
    little (dynamic padding); rows go back to input order. Every text gets a row: an empty one
    is just the special tokens (one unknown token for a tokenizer that adds none).
    """
    settings = getattr(model, "adapter_config", {})  # {} for a model not from load_classifier
    texts = [clean_text(text) for text in texts] if settings.get("clean") else list(texts)
    if not texts:
        return np.empty((0, model.config.num_labels), dtype=np.float32)
    max_length = max_length or settings.get("max_length", tokenizer.model_max_length)
    token_ids = [ids or [tokenizer.unk_token_id] for ids in tokenize(texts, tokenizer, max_length)]
    logits = batched_logits(model, token_ids, batch_size, tokenizer.pad_token_id, progress=progress)
    return logits.softmax(dim=-1).numpy()  # softmax in float32 whatever the model ran in


def classify(model, tokenizer, text_or_texts: str | list[str], batch_size: int = 64):
    """The label name for one text, or the list of label names for a list of texts."""
    single = isinstance(text_or_texts, str)
    texts = [text_or_texts] if single else list(text_or_texts)
    probabilities = predict_proba(model, tokenizer, texts, batch_size, progress=not single)
    names = [model.config.id2label[int(index)] for index in probabilities.argmax(axis=1)]
    return names[0] if single else names


def save_predictions(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV without the index, atomically: never half a file. Returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: table.to_csv(temporary, index=False))
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
    return path
