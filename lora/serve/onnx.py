"""Ship a trained classifier to CPUs: the adapter merged into its base, the whole model as ONNX,
run by ONNX Runtime (optionally with int8 weights), checked against PyTorch before it is written.

    lora-export runs/minilm exported/minilm --format onnx [--int8 --check-data test.csv]
    classifier = load_onnx_classifier("exported/minilm")       # what predict.py and lora-serve do
    classifier.classify("Stocks rally as oil prices fall")      # -> "Business"

An export folder holds ``model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64
``(batch, sequence)``, both axes dynamic; output ``logits``), the tokenizer's files,
``onnx_config.json`` (the adapter's ``AdapterConfig``: label names, ``max_length``, cleaning, the
base model and its fingerprint, provenance; and whether the weights are int8) and ``parity.json``.

The gate. Every export measures itself against the PyTorch model it came from and writes what it
found to ``parity.json``: the largest absolute logit difference on sample texts, label
agreement, file sizes and, given labelled texts, accuracy and macro F1 of both. A float32 export
whose logits differ by more than float rounding allows (``logit_tolerance``) is refused; an int8
export whose accuracy falls by more than ``max_accuracy_drop`` points is refused (int8 can lose
far more than that on some models). A refused export writes nothing: the folder is built aside and
moved into place only when it passed.

Needs ``onnx``, ``onnxscript`` (the exporter) and ``onnxruntime`` (the ``onnx`` extra); the
library imports them only here, and only when asked for.
"""

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adapter import AdapterConfig, provenance, version_warning
from ..classifier import CHECK_TEXTS, Classifier, classification_metrics, load_classifier_model, load_tokenizer
from ..config import InputError, SettingError
from ..model import inject_lora, lora_layers, merge_lora

MODEL_NAME = "model.onnx"
CONFIG_NAME = "onnx_config.json"
PARITY_NAME = "parity.json"
FORMAT = 1  # onnx_config.json's layout; a folder of another format is refused
INPUT_NAMES = ("input_ids", "attention_mask")
DEFAULT_MAX_ACCURACY_DROP = 0.5  # points of accuracy an int8 export may lose on the check data


class ExportRefused(SettingError):
    """The export did not pass its gate; ``parity`` says what was measured."""

    def __init__(self, message: str, parity: "Parity"):
        super().__init__(message, "max_accuracy_drop", "force")
        self.parity = parity


@dataclass
class Parity:
    """What ``parity.json`` records: the ONNX model against the PyTorch model it came from."""

    int8: bool
    sample_texts: int
    max_abs_logit_difference: float
    logit_tolerance: float
    label_agreement: float
    file_sizes: dict = field(default_factory=dict)  # file name -> bytes
    check_data: str | None = None
    check_rows: int = 0
    pytorch: dict | None = None  # accuracy, f1_macro of the PyTorch model on the check data
    onnx: dict | None = None  # the same for the ONNX model
    accuracy_change_points: float | None = None  # ONNX minus PyTorch, in percentage points
    float_ffn_output: bool = False  # int8 with the feed-forward output projections in float32

    def lines(self) -> list[str]:
        """The few lines ``lora-export`` prints."""
        kind = ("int8, FFN output float32" if self.float_ffn_output else "int8") if self.int8 else "float32"
        allowed = "" if self.int8 else f" (float32 rounding allows {self.logit_tolerance:.2e})"
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in self.file_sizes.items())
        lines = [
            f"parity ({kind}, {self.sample_texts} texts): largest |logit difference| "
            f"{self.max_abs_logit_difference:.2e}{allowed}, labels agree on {100 * self.label_agreement:.1f}%",
            f"files: {sizes}",
        ]
        if self.check_data is not None:
            lines.append(
                f"accuracy on {self.check_rows} rows of {self.check_data}: "
                f"PyTorch {100 * self.pytorch['accuracy']:.2f}% (macro F1 {100 * self.pytorch['f1_macro']:.2f}), "
                f"ONNX {100 * self.onnx['accuracy']:.2f}% (macro F1 {100 * self.onnx['f1_macro']:.2f}): "
                f"{self.accuracy_change_points:+.2f} points"
            )
        return lines


def logit_tolerance(model_config, sequence_length: int, largest_logit: float) -> float:
    """How far float32 logits of one model may differ between two runtimes that sum in another
    order: ``4 * sqrt(n) * eps * max(1, |largest logit|)`` with ``n`` the longest reduction of the
    forward pass (the feed-forward's inner width, the hidden width, or attention over the
    sequence): the suite's rule for two computations of one value (``tests/README.md``)."""
    inner = getattr(model_config, "intermediate_size", None) or getattr(model_config, "hidden_dim", 0)  # DistilBERT's
    n = max(inner, model_config.hidden_size, sequence_length)
    return 4 * math.sqrt(n) * float(torch.finfo(torch.float32).eps) * max(1.0, largest_logit)


# ----------------------------------------------------------------------------- exporting
def export_onnx(
    classifier: Classifier,
    directory: str | os.PathLike,
    int8: bool = False,
    check: tuple[str, list[str], list[int]] | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    force: bool = False,
    float_ffn_output: bool = False,
) -> Parity:
    """Write ``classifier`` (its adapter merged into the base) as an ONNX export folder.

    Args:
        classifier: from ``load_classifier``; merged here if it is not yet (a quantized base is
            dequantized first: ``merge_lora``).
        directory: the folder to create; it must not exist (it appears only when the export passed).
        int8: ONNX Runtime's dynamic quantization of the weights (``quantize_dynamic``: int8 per
            output channel for every MatMul and the embedding tables; activations quantized on
            the fly).
        check: ``(name, texts, labels)``: labelled texts on which both models are scored.
        max_accuracy_drop: int8 only: the most accuracy (points) the export may lose on ``check``.
        force: write the export even when it fails its gate.
        float_ffn_output: int8 only: keep the feed-forward output projections (``intermediate ->
            hidden``) in float32. Their input, the activation's output, has the outliers that one
            uint8 scale per tensor rounds away (Bondarenko et al., 2021); on the MiniLM demo, int8
            labels agree with float32 on 99.13% of the 7,600 test rows, 99.54% with this, at about
            a fifth less speed (BENCHMARKS.md, bench/deploy.py).

    Returns:
        the ``Parity`` that ``parity.json`` holds.

    Raises:
        ExportRefused: the gate refused it (nothing written).
        InputError: ``directory`` exists.
        SettingError: ``float_ffn_output`` without ``int8``.
    """
    directory = Path(directory)
    if float_ffn_output and not int8:
        raise SettingError("{float_ffn_output} keeps part of an {int8} model in float32: it needs {int8}",
                           "float_ffn_output", "int8")  # fmt: skip
    if directory.exists():
        raise InputError(f"{directory} exists; export into a new folder")
    model = classifier.model.eval()
    if any(not layer.merged for _, layer in lora_layers(model)):
        merge_lora(model)
    sample = CHECK_TEXTS + (check[1][:60] if check else [])
    with tempfile.TemporaryDirectory(dir=directory.parent if directory.parent.exists() else None) as workspace:
        building = Path(workspace) / directory.name
        building.mkdir()
        _export_graph(model, classifier.tokenizer, building / MODEL_NAME)
        if int8:
            _quantize(building / MODEL_NAME, model.config.hidden_size, float_ffn_output)
        onnx_classifier = OnnxClassifier(_session(building / MODEL_NAME), classifier.tokenizer, classifier.config, int8)
        parity = _measure(classifier, onnx_classifier, sample, check, int8)
        parity.float_ffn_output = float_ffn_output
        parity.file_sizes = {MODEL_NAME: (building / MODEL_NAME).stat().st_size}
        problem = _gate(parity, max_accuracy_drop)
        if problem and not force:
            raise ExportRefused(problem, parity)
        classifier.tokenizer.save_pretrained(building)
        (building / CONFIG_NAME).write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "int8": int8,
                    "float_ffn_output": float_ffn_output,
                    "adapter": classifier.config.to_json(),
                    "exported_by": provenance(),
                },
                indent=2,
            )
            + "\n"
        )
        (building / PARITY_NAME).write_text(json.dumps(asdict(parity), indent=2) + "\n")
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(building), str(directory))
    return parity


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's known, harmless notices, and nothing else: that torchvision is not
    installed, a deprecated pytree name, and that two inputs share one dynamic axis name."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        try:
            yield
        finally:
            registration.setLevel(level)


def _export_graph(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """``torch.onnx.export`` (the ``torch.export`` exporter) of ``logits(input_ids,
    attention_mask)`` with dynamic batch and sequence axes; an example with a padded row."""
    example = tokenizer(["a text", "a longer text, so that the first row is padded"], padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {name: example[name].to(device) for name in INPUT_NAMES}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as error:
        raise InputError(f"exporting to ONNX needs {error.name}: pip install -e '.[onnx]'") from None
    with _quiet_exporter(), torch.inference_mode():
        torch.onnx.export(
            model,
            (),
            str(path),
            kwargs=inputs,
            dynamo=True,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES},
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            external_data=False,
            verbose=False,
        )


def _quantize(path: Path, hidden_size: int, float_ffn_output: bool) -> None:
    """Replace ``path`` by its dynamic int8 quantization (weights int8 per output channel, QInt8),
    with the feed-forward output projections left in float32 if ``float_ffn_output``.
    ``quant_pre_process`` runs first without its symbolic shape inference, which does not
    complete on these graphs; it writes scratch files into the working directory, hence the chdir."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        here = os.getcwd()
        os.chdir(scratch)
        try:
            quant_pre_process(str(path.resolve()), str(prepared), skip_symbolic_shape=True)
        finally:
            os.chdir(here)
        excluded = ffn_output_matmuls(onnx.load(str(prepared)), hidden_size) if float_ffn_output else []
        quantize_dynamic(
            str(prepared), str(quantized), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded
        )
        shutil.move(str(quantized), str(path))


def ffn_output_matmuls(graph_model, hidden_size: int) -> list[str]:
    """The names of the MatMul nodes of the feed-forward output projections: a constant weight of
    shape ``(k, hidden_size)`` with ``k > hidden_size`` (``intermediate -> hidden``; the exporter
    stores a Linear's weight transposed, ``(in, out)``). Attention projections are ``(hidden,
    hidden)`` or ``(hidden, 3 hidden)``, the head's output layer ``(hidden, labels)``."""
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph_model.graph.initializer}
    return [
        node.name
        for node in graph_model.graph.node
        if node.op_type == "MatMul"
        and len(shape := shapes.get(node.input[1], ())) == 2
        and shape[1] == hidden_size
        and shape[0] > hidden_size
    ]


def _measure(classifier: Classifier, onnx_classifier: "OnnxClassifier", sample: list[str], check, int8: bool) -> Parity:
    """Both models on ``sample`` (logits) and on the labelled ``check`` texts (accuracy, F1)."""
    ids = classifier.token_ids(sample)
    reference = classifier.logits(ids)
    exported = onnx_classifier.logits(ids)
    longest = max(len(row) for row in ids)
    parity = Parity(
        int8=int8,
        sample_texts=len(sample),
        max_abs_logit_difference=float((exported - reference).abs().max()),
        logit_tolerance=logit_tolerance(classifier.model.config, longest, float(reference.abs().max())),
        label_agreement=float((exported.argmax(1) == reference.argmax(1)).float().mean()),
    )
    if check:
        name, texts, labels = check
        scores = {
            kind: classification_metrics(labels, model.predict_proba(texts).argmax(axis=1))
            for kind, model in (("pytorch", classifier), ("onnx", onnx_classifier))
        }
        parity.check_data, parity.check_rows = name, len(texts)
        parity.pytorch, parity.onnx = scores["pytorch"], scores["onnx"]
        parity.accuracy_change_points = 100 * (scores["onnx"]["accuracy"] - scores["pytorch"]["accuracy"])
    return parity


def _gate(parity: Parity, max_accuracy_drop: float) -> str | None:
    """Why the export must not be written, or None."""
    if not parity.int8 and parity.max_abs_logit_difference > parity.logit_tolerance:
        return (
            f"the ONNX model's logits differ from PyTorch's by {parity.max_abs_logit_difference:.2e}, more than "
            f"float32 rounding allows ({parity.logit_tolerance:.2e}); not written"
        )
    if parity.int8 and parity.accuracy_change_points is not None and -parity.accuracy_change_points > max_accuracy_drop:
        return (
            f"the int8 model's accuracy on {parity.check_data} changes by {parity.accuracy_change_points:+.2f} points "
            f"({100 * parity.pytorch['accuracy']:.2f}% -> {100 * parity.onnx['accuracy']:.2f}%): a loss of more than "
            f"{{max_accuracy_drop}} {max_accuracy_drop:g}; not written ({{force}} writes it anyway)"
        )
    return None


# ----------------------------------------------------------------------------- using an export
class OnnxClassifier(Classifier):
    """A ``Classifier`` whose logits come from ONNX Runtime: ``model`` is the
    ``onnxruntime.InferenceSession`` of ``model.onnx``; tokenising, cleaning, truncating and
    batching are the ``Classifier``'s own, so an export predicts what its adapter predicts."""

    def __init__(self, session, tokenizer, config: AdapterConfig, int8: bool):
        super().__init__(session, tokenizer, config)
        self.int8 = int8

    def batch_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: batch[name].numpy().astype(np.int64) for name in INPUT_NAMES}
        return torch.from_numpy(self.model.run(["logits"], feeds)[0]).float()


def is_onnx_export(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds an ONNX export (``model.onnx`` and ``onnx_config.json``)."""
    directory = Path(directory)
    return (directory / MODEL_NAME).is_file() and (directory / CONFIG_NAME).is_file()


def _session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU (all graph optimisations, the default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx_classifier(
    directory: str | os.PathLike, base_model: str | None = None, force: bool = False, threads: int | None = None
) -> OnnxClassifier:
    """An export folder as an ``OnnxClassifier``.

    ``base_model``: the base it is meant to stand for (a served base, ``predict.py --base``): an
    export of another base is refused like an adapter of another base, by name and, when the base
    can be loaded, by the fingerprint of its adapted weights (unless ``force``).

    Raises:
        InputError: not an export folder, a format this version cannot read, another base, or
        onnxruntime missing.
    """
    directory = Path(directory)
    if not is_onnx_export(directory):
        raise InputError(f"{directory} is not an ONNX export (no {MODEL_NAME} and {CONFIG_NAME})")
    try:
        saved = json.loads((directory / CONFIG_NAME).read_text())
        config = AdapterConfig.from_json(saved["adapter"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{directory / CONFIG_NAME} is not an export's config: {error}") from None
    if saved.get("format") != FORMAT:
        raise InputError(
            f"{directory} is an ONNX export of format {saved.get('format')!r}; this version reads format {FORMAT}"
        )
    if warning := version_warning(config):
        warnings.warn(f"{directory}: {warning}", stacklevel=2)
    if base_model is not None and base_model != config.base_model:
        _check_base(directory, config, base_model, force)
    try:
        session = _session(directory / MODEL_NAME, threads)
    except ImportError:
        raise InputError("an ONNX export needs onnxruntime: pip install -e '.[onnx]'") from None
    return OnnxClassifier(session, load_tokenizer(str(directory)), config, bool(saved.get("int8")))


def _check_base(directory: Path, config: AdapterConfig, base_model: str, force: bool) -> None:
    """Refuse ``base_model`` unless its adapted weights hash to the export's fingerprint (taken
    by ``inject_lora``, as when the adapter was trained)."""
    if config.base_fingerprint is None or force:
        return
    model = load_classifier_model(base_model, list(config.labels))
    inject_lora(model, config.lora)
    if model.lora.base_fingerprint != config.base_fingerprint:
        raise SettingError(
            f"export {directory} was made from base {config.base_model!r} (fingerprint {config.base_fingerprint}), "
            f"not from base {base_model!r} (fingerprint {model.lora.base_fingerprint}); {{force}} loads it anyway",
            "force",
        )
