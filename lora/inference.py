"""Inference with a trained adapter: rebuild the model, merge the adapter, predict.

    model, tokenizer = load_classifier("runs/20250101-120000")
    classify(model, tokenizer, "Stocks rally as oil prices fall")     # -> "Business"
    classify(model, tokenizer, ["Team wins the cup", "New chip"])     # -> ["Sports", "Sci/Tech"]
    predict_proba(model, tokenizer, texts)                            # (N, num_labels) numpy

``load_classifier`` leaves the adapter's config on the model as ``model.adapter_config``, and
the prediction functions read from it what training did to the text before tokenising
(``clean``) and how long inputs were (``max_length``): inference sees text as training did.
"""
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError

from .adapter import CONFIG_NAME, WEIGHTS_NAME, apply_adapter, load_adapter, write_atomically
from .backbone import load_classifier_model, load_tokenizer
from .data import clean_text, tokenize
from .errors import UsageError
from .model import merge_lora, quantize_base, unmerge_lora
from .provenance import version_warning
from .runtime import RUNS_DIR, batched_logits, pick_device

# What a merge is checked on when the caller gives no texts: short, long, empty.
CHECK_TEXTS = [
    "Stocks rally as oil prices fall",
    "Team wins the cup after a late goal in extra time",
    "Scientists unveil a faster computer chip for online research and space missions",
    "",
]
# Merged and unmerged probabilities may differ by float rounding, never by more than this.
MERGE_TOLERANCE = 1e-3
REQUIRED_CONFIG = ("base_model", "labels", "max_length", "r", "alpha", "target_modules")


def latest_run(runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """The most recently written folder under ``runs_dir`` that holds an adapter."""
    runs = [d for d in Path(runs_dir).glob("*")
            if (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file()]
    if not runs:
        raise UsageError(f"no run with an adapter under {runs_dir}/; "
                         "train one with train.py or name one with --adapter")
    return max(runs, key=lambda d: d.stat().st_mtime)


def read_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``load_adapter`` with every problem (missing or unreadable file, missing key) as a UsageError."""
    try:
        state, config = load_adapter(adapter_dir)
    except (OSError, ValueError, SafetensorError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        raise UsageError(f"{adapter_dir / CONFIG_NAME} has no {', '.join(missing)}; "
                         "was it written by train.py?")
    return state, config


def load_classifier(adapter_dir: str | os.PathLike, device: str = "auto", merge: bool = True,
                    check_texts: list[str] | None = None):
    """The adapter's base model with the adapter applied, in eval mode on ``device``.

    Args:
        adapter_dir: a folder written by ``save_adapter`` (a run folder of ``train.py``).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        merge: fold every LoRA update into its base weight: inference then costs what the
            base model costs. The merge is checked on ``check_texts`` (default: a few built-in
            headlines); if merged predictions differ from unmerged ones (or merging would put
            NaN in a weight) the model stays unmerged and a warning says so.

    The base is quantized as the adapter's config records (``quantize_base``, ``double_quant``),
    so the adapter meets the weights it was trained against; merged, it is then a float model
    holding ``dequantize(Wq) + scaling * B @ A`` (see ``merge_lora``).

    Returns:
        ``(model, tokenizer)``; ``model.adapter_config`` holds the adapter's config.

    Raises:
        UsageError: a missing or unreadable adapter, or one that does not fit its base model
        (other target modules, other shapes, another number of labels).
    """
    adapter_dir = Path(adapter_dir)
    state, config = read_adapter(adapter_dir)
    if warning := version_warning(config):
        warnings.warn(warning, stacklevel=2)
    device = pick_device(device)
    tokenizer = load_tokenizer(config["base_model"])
    model = load_classifier_model(config["base_model"], config["labels"])
    try:
        apply_adapter(model, state, config)
        if config.get("quantize_base", "none") != "none":  # the base the adapter was trained on
            quantize_base(model, config["quantize_base"], config.get("double_quant", False))
    except (ValueError, TypeError) as error:
        raise UsageError(f"adapter {adapter_dir} does not fit base model "
                         f"{config['base_model']!r}: {error}") from None
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
