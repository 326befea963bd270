"""Many adapters, one base: load N adapter folders onto one copy of the base weights and
classify a batch in which every row names its own adapter (``lora/multi.py`` does the math).

    adapters = load_adapters({"news": "runs/news", "spam": "runs/spam"})
    adapters.classify(["Stocks rally", "WIN A PRIZE NOW"], ["news", "spam"])   # -> ["Business", "spam"]
    adapters.predict_proba(texts, names)    # row i: numpy (len(labels of names[i]),)

Each adapter keeps its own rank, targets, scaling, head and label set, and what training did
to the text (``clean``, ``max_length``). Variants: rsLoRA and PiSSA adapters are plain LoRA
on disk; DoRA works (``MultiLoRALinear``). Adapters trained on a quantized base are refused
(``predict.py`` serves one of those at a time).
"""

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, version_warning
from ..classifier import load_classifier_model, load_tokenizer, pick_device, read_adapter
from ..config import InputError, SettingError
from ..data import clean_text, length_grouped_batches, pad_batch, tokenize
from .multi import AdapterWeights, MultiAdapterModel
from .onnx import OnnxClassifier, is_onnx_export, load_onnx_classifier

# An adapter's name is its folder's name: one path component, never "." or "..", no separator,
# nothing a URL or a shell would need to quote.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# The base model's own head is never used for predictions (every row names an adapter); it
# only has to exist, so it gets transformers' default two labels.
BASE_HEAD_LABELS = ["LABEL_0", "LABEL_1"]


class UnknownAdapter(InputError):
    """A name that is not (or no longer) served."""


@dataclass
class Adapter:
    """One served adapter: its name, folder, config (``labels``, ``clean``, ``max_length``...)."""

    name: str
    directory: Path
    config: AdapterConfig

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)


def check_same_base(config: dict, base_model: str, directory: Path) -> None:
    """Refuse an adapter trained on another base than ``base_model`` (by the base's name).

    The one place that decides whether an adapter belongs to a base: a check of the base's
    weights themselves (a fingerprint in the config) belongs here too.
    """
    if config.base_model != base_model:
        raise InputError(
            f"adapter {directory} was trained on base {config.base_model!r}, "
            f"not on {base_model!r}, the base served here"
        )


def read_served_adapter(
    name: str, directory: str | os.PathLike, base_model: str
) -> tuple[Adapter, AdapterWeights | OnnxClassifier]:
    """Read one adapter folder and check that it can be served on ``base_model``. An ONNX export
    (``lora-export --format onnx``) is served whole, by ONNX Runtime, beside the mixed batches.

    Raises:
        InputError: a missing or unreadable adapter, one of another base, one trained on a
        quantized base, or tensors that are not a LoRA adapter.
    """
    directory = Path(directory)
    if is_onnx_export(directory):
        classifier = load_onnx_classifier(directory)
        check_same_base(classifier.config, base_model, directory)
        return Adapter(name, directory, classifier.config), classifier
    state, config = read_adapter(directory)
    check_same_base(config, base_model, directory)
    if config.quantize_base is not None:
        raise InputError(
            f"adapter {directory} was trained on a {config.quantize_base} base; several "
            "adapters are served on a float base only (predict.py --adapter serves it alone)"
        )
    if config.lora.head != "full":
        raise InputError(
            f"adapter {directory} keeps the head's hidden layer frozen (head {config.lora.head}), which the "
            "served base does not rebuild; predict.py --adapter serves it alone"
        )
    if warning := version_warning(config):
        warnings.warn(f"{directory}: {warning}", stacklevel=3)
    try:
        weights = AdapterWeights.from_state(
            state, config.lora.r, config.lora.alpha, config.lora.rslora, config.lora.trainable_modules
        )
    except ValueError as error:
        raise InputError(f"adapter {directory}: {error}") from None
    return Adapter(name, directory, config), weights


def trained_on(directory: Path) -> str:
    """The base model an adapter folder or an ONNX export was made from."""
    if is_onnx_export(directory):
        return load_onnx_classifier(directory).config.base_model
    return read_adapter(directory)[1].base_model


class AdapterSet:
    """The adapters served on one base model, and mixed-batch prediction over them.

    ``set_adapters`` swaps the whole set (the base weights stay where they are); prediction
    and swapping hold one lock, so a server may call them from different threads.
    """

    def __init__(self, base_model: str, device: str = "auto"):
        self.base_model = base_model
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(base_model)
        base = load_classifier_model(base_model, BASE_HEAD_LABELS).to(self.device)
        self.model = MultiAdapterModel(base)
        self.adapters: dict[str, Adapter] = {}
        self._index: dict[str, int] = {}  # the LoRA adapters' rows in the mixed batches
        self._exports: dict[str, OnnxClassifier] = {}  # ONNX exports, each predicting on its own
        self._lock = threading.Lock()

    def set_adapters(self, adapters: list[tuple[Adapter, AdapterWeights | OnnxClassifier]]) -> None:
        """Serve exactly ``adapters`` from now on.

        Raises:
            InputError: an adapter that does not fit the base (other shapes, a module it lacks);
            the set is then empty.
        """
        lora = [(adapter, weights) for adapter, weights in adapters if isinstance(weights, AdapterWeights)]
        with self._lock:
            try:
                self.model.set_adapters([weights for _, weights in lora])
            except ValueError as error:
                self.adapters, self._index, self._exports = {}, {}, {}
                raise InputError(f"adapters do not fit base model {self.base_model!r}: {error}") from None
            self.adapters = {adapter.name: adapter for adapter, _ in adapters}
            self._index = {adapter.name: index for index, (adapter, _) in enumerate(lora)}
            self._exports = {adapter.name: export for adapter, export in adapters if isinstance(export, OnnxClassifier)}

    def kind(self, name: str) -> str:
        """How adapter ``name`` runs: ``lora`` (in the mixed batches), ``onnx`` or ``onnx int8``."""
        if name not in self._exports:
            return "lora"
        return "onnx int8" if self._exports[name].int8 else "onnx"

    def predict_proba(self, texts: list[str], adapters: list[str], batch_size: int = 64) -> list[np.ndarray]:
        """Row ``i``: float32 probabilities over the labels of adapter ``adapters[i]`` for ``texts[i]``.

        Each text is cleaned and truncated as its adapter was trained (``clean``, ``max_length``);
        rows are batched by length across adapters (one forward per batch, whatever the mix)
        and come back in input order.

        Raises:
            InputError: a name that is not served, or lists of different lengths.
        """
        if len(texts) != len(adapters):
            raise InputError(f"{len(texts)} texts but {len(adapters)} adapter names")
        with self._lock:
            unknown = sorted(set(adapters) - self.adapters.keys())
            if unknown:
                raise UnknownAdapter(
                    f"unknown adapter(s) {', '.join(map(repr, unknown))}; "
                    f"served: {', '.join(sorted(self.adapters)) or 'none'}"
                )
            rows: list[np.ndarray | None] = [None] * len(texts)
            mixed = [i for i, name in enumerate(adapters) if name in self._index]
            if mixed:
                token_ids = self._tokenize([texts[i] for i in mixed], [adapters[i] for i in mixed])
                index = torch.tensor([self._index[adapters[i]] for i in mixed], dtype=torch.long)
                probabilities = self._logits(token_ids, index, batch_size).softmax(dim=-1).numpy()  # -inf -> 0
                for i, row in zip(mixed, probabilities):
                    rows[i] = row[: len(self.adapters[adapters[i]].labels)]
            for name, export in self._exports.items():
                own = [i for i, row_name in enumerate(adapters) if row_name == name]
                if own:
                    for i, row in zip(own, export.predict_proba([texts[i] for i in own], batch_size)):
                        rows[i] = row
            return rows

    def classify(self, texts: list[str], adapters: list[str], batch_size: int = 64) -> list[str]:
        """The label name of each text under its own adapter, in input order."""
        rows = self.predict_proba(texts, adapters, batch_size)
        return [self.adapters[name].labels[int(row.argmax())] for row, name in zip(rows, adapters)]

    def _tokenize(self, texts: list[str], adapters: list[str]) -> list[list[int]]:
        """Token ids per row, each adapter's texts cleaned and truncated as it was trained."""
        token_ids: list[list[int]] = [[] for _ in texts]
        for name in set(adapters):
            config = self.adapters[name].config
            rows = [i for i, row_name in enumerate(adapters) if row_name == name]
            group = [clean_text(texts[i]) if config.clean else texts[i] for i in rows]
            for i, ids in zip(rows, tokenize(group, self.tokenizer, config.max_length)):
                token_ids[i] = ids or [self.tokenizer.unk_token_id]  # an empty text still gets a row
        return token_ids

    @torch.inference_mode()
    def _logits(self, token_ids: list[list[int]], index: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Float32 logits ``(N, widest head)`` on the CPU, ``-inf`` beyond each row's own head."""
        width = max(len(self.adapters[name].labels) for name in self._index)
        logits = torch.empty(len(token_ids), width)
        batches = length_grouped_batches([len(ids) for ids in token_ids], batch_size, seed=0, shuffle=False)
        for rows in batches:
            batch = pad_batch([token_ids[i] for i in rows], self.tokenizer.pad_token_id)
            out = self.model(index[rows], **{key: value.to(self.device) for key, value in batch.items()}).logits
            logits[rows] = torch.full((len(rows), width), float("-inf"))
            logits[rows, : out.shape[1]] = out.float().cpu()
        return logits


def load_adapters(
    directories: dict[str, str | os.PathLike] | list[str | os.PathLike], device: str = "auto"
) -> AdapterSet:
    """An ``AdapterSet`` serving every adapter folder in ``directories`` on their one base.

    ``directories``: ``{name: folder}``, or folders (named by their last path component).

    Raises:
        InputError: no folders, two with one name, or any folder ``read_served_adapter``
        refuses (one of another base than the first's, say).
    """
    if not isinstance(directories, dict):
        paths = [Path(directory) for directory in directories]
        names = [path.resolve().name for path in paths]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InputError(f"two adapter folders are named {', '.join(duplicates)}; name them apart (NAME=FOLDER)")
        directories = dict(zip(names, paths))
    if not directories:
        raise InputError("no adapter folders given")
    first = next(iter(directories.values()))
    base_model = trained_on(Path(first))
    loaded = [read_served_adapter(name, directory, base_model) for name, directory in directories.items()]
    adapter_set = AdapterSet(base_model, device)
    adapter_set.set_adapters(loaded)
    return adapter_set


def adapter_folders(root: str | os.PathLike) -> tuple[dict[str, Path], dict[str, str]]:
    """The sub-folders of ``root`` that hold an adapter: ``({name: folder}, {name: why refused})``.

    A sub-folder (or a link) that resolves outside ``root`` is refused: a served adapter always
    lies in the directory the server was given. Folders without adapter files are skipped.
    """
    root = Path(root).resolve()
    found, refused = {}, {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        holds_adapter = (entry / WEIGHTS_NAME).is_file() and (entry / CONFIG_NAME).is_file()
        if not holds_adapter and not is_onnx_export(entry):
            continue
        if not ADAPTER_NAME.fullmatch(entry.name):
            refused[entry.name] = (
                f"adapter folder name {entry.name!r} is not served: use letters, digits, '.', '_' and '-' only"
            )
            continue
        if not entry.resolve().is_relative_to(root):
            refused[entry.name] = f"adapter folder {entry} lies outside the adapters directory {root}"
            continue
        found[entry.name] = entry
    return found, refused


class AdapterDirectory:
    """A folder whose sub-folders are adapters, served by name on one base: the base that
    ``base_model`` names, else the one the first adapter (in name order) was trained on.
    ``reload`` reads the folder again: new sub-folders are served, removed ones dropped,
    changed ones read anew; a sub-folder that cannot be served is listed in ``refused``.

    Raises (on construction):
        InputError: no such folder, or neither an adapter in it nor ``base_model``.
    """

    def __init__(self, root: str | os.PathLike, base_model: str | None = None, device: str = "auto"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"adapters directory {self.root} does not exist")
        if base_model is None:
            found, _ = adapter_folders(self.root)
            if not found:
                raise SettingError(
                    f"no adapter in the sub-folders of {self.root}; "
                    "put one there or name the base model with {base_model}",
                    "base_model",
                )
            base_model = trained_on(next(iter(found.values())))
        self.adapter_set = AdapterSet(base_model, device)
        self.refused: dict[str, str] = {}
        self.reload()

    def reload(self) -> dict[str, list[str]]:
        """Serve what the folder holds now. Returns the names ``added``, ``removed`` and ``refused``."""
        before = set(self.adapter_set.adapters)
        found, refused = adapter_folders(self.root)
        loaded = []
        for name, directory in found.items():
            try:
                loaded.append(read_served_adapter(name, directory, self.adapter_set.base_model))
            except InputError as error:
                refused[name] = str(error)
        try:
            self.adapter_set.set_adapters(loaded)
        except InputError:  # one of them does not fit the base: find it, serve the rest
            fitting = []
            for adapter in loaded:
                try:
                    self.adapter_set.set_adapters([*fitting, adapter])
                    fitting.append(adapter)
                except InputError as error:
                    refused[adapter[0].name] = str(error)
            self.adapter_set.set_adapters(fitting)
        self.refused = refused
        served = set(self.adapter_set.adapters)
        return {"added": sorted(served - before), "removed": sorted(before - served), "refused": sorted(refused)}
