"""What a run leaves for people to look at: JSON lines, plots, the misclassified rows, and, when
asked for, TensorBoard event files.

Plots are drawn with matplotlib's object API (``matplotlib.figure.Figure``): no backend is
chosen, no global state is touched, so importing this in a notebook changes nothing there.

TensorBoard (``report_to="tensorboard"``): the records the loop writes to ``metrics.jsonl``
also become scalars, in event files in the run folder. Every number of a record is one scalar
named ``<kind>/<field>`` at the record's optimizer step: ``train/loss``, ``train/lr``,
``train/examples_per_s``, ``train/skipped_steps``, ``train/epoch``; ``eval/loss``,
``eval/accuracy``, ``eval/f1_macro``... (every evaluation metric); ``skip/loss``, ``skip/scale``
for a step the fp16 GradScaler skipped. ``tensorboard --logdir runs`` shows one run per run
folder (for ``search.py``, one per trial). ``torch.utils.tensorboard`` is imported only when
asked for.
"""

import contextlib
import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from ..config import SettingError

REPORT_TO = ("tensorboard",)  # TrainConfig.report_to: None or one of these
EVENTS_GLOB = "events.out.tfevents.*"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list, list]]) -> None:
    figure = Figure(figsize=(6.4, 4), layout="tight")
    axes = figure.subplots()
    for name, (steps, values) in series.items():
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110)


def plot_history(records: list[dict], directory: Path) -> None:
    """``loss.png`` (train vs validation), ``val_accuracy.png``, ``val_precision_recall_f1.png``."""
    logs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in evals]
    _plot(
        directory / "loss.png",
        "Training and validation loss",
        "cross-entropy",
        {
            "train": ([r["step"] for r in logs], [r["loss"] for r in logs]),
            "validation": (steps, [r["loss"] for r in evals]),
        },
    )
    _plot(
        directory / "val_accuracy.png",
        "Validation accuracy",
        "accuracy",
        {"accuracy": (steps, [r["accuracy"] for r in evals])},
    )
    _plot(
        directory / "val_precision_recall_f1.png",
        "Validation macro precision / recall / F1",
        "score",
        {name: (steps, [r[f"{name}_macro"] for r in evals]) for name in ("precision", "recall", "f1")},
    )


def plot_test_errors(labels, predictions, label_names: list[str], directory: Path) -> None:
    """``confusion_matrix.png`` (rows normalised to 1) and ``per_class_error.png``."""
    matrix = confusion_matrix(labels, predictions, labels=range(len(label_names)), normalize="true")
    figure = Figure(figsize=(5.6, 4.8), layout="tight")
    axes = figure.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=label_names).plot(
        ax=axes, cmap="Blues", values_format=".2f", colorbar=False
    )
    axes.set_title("Test confusion matrix (normalised by true class)")
    figure.savefig(directory / "confusion_matrix.png", dpi=110)

    errors = 1 - np.diag(np.nan_to_num(matrix))
    figure = Figure(figsize=(5.6, 3.6), layout="tight")
    axes = figure.subplots()
    axes.bar(label_names, 100 * errors, color="tab:red")
    for x, error in enumerate(errors):
        axes.annotate(f"{100 * error:.1f}%", (x, 100 * error), ha="center", va="bottom")
    axes.set(title="Test error rate per class", ylabel="misclassified (%)")
    figure.savefig(directory / "per_class_error.png", dpi=110)


def misclassified_table(
    texts, labels, probabilities: np.ndarray, label_names: list[str], limit: int = 100
) -> pd.DataFrame:
    """The ``limit`` most confidently wrong examples: text, true and predicted label, confidence."""
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predictions != np.asarray(labels))
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return pd.DataFrame(
        {
            "index": wrong,
            "true": [label_names[labels[i]] for i in wrong],
            "predicted": [label_names[predictions[i]] for i in wrong],
            "confidence": confidence[wrong].round(4),
            "text": [texts[i] for i in wrong],
        }
    )


# ----------------------------------------------------------------------------- TensorBoard
def check_report_to(report_to: str | None) -> None:
    """Raise ``SettingError`` for an unknown ``report_to``, or ``tensorboard`` not installed."""
    if report_to is None:
        return
    if report_to not in REPORT_TO:
        raise SettingError(f"{{report_to}} must be one of {list(REPORT_TO)}, got {report_to!r}", "report_to")
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise SettingError(
            "{report_to} tensorboard needs the tensorboard package: pip install tensorboard "
            '(or pip install -e ".[tensorboard]")',
            "report_to",
        ) from None


class TensorBoardWriter:
    """Scalars from metric records into event files in ``log_dir``, flushed after each record.

    It follows the run's ``records`` list (``Progress.records``, which only grows): ``log_new()``
    writes what was added since the last call; leaving the ``with`` block, however the run ends
    (finished, stopped, interrupted, pruned), writes the rest and closes the files."""

    def __init__(self, log_dir: str | Path, records: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.records, self.logged = records, len(records)  # a resumed run logged those before

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exception) -> None:
        self.log_new()
        self.close()

    def log_new(self) -> None:
        for record in self.records[self.logged :]:
            self.log(record)
        self.logged = len(self.records)

    def log(self, record: dict) -> None:
        """One record of the loop, e.g. ``{"kind": "train", "step": 10, "loss": 0.4, "lr": 3e-4}``."""
        for field, value in record.items():
            if field not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['kind']}/{field}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoWriter(contextlib.nullcontext):
    """What the loop logs to when nothing reports (no ``--report-to``, or not rank 0)."""

    def log_new(self) -> None:
        pass


def open_writer(report_to: str | None, run_dir: Path, records: list[dict], resume: bool, is_main: bool = True):
    """The writer for a run: a ``TensorBoardWriter`` on ``run_dir`` following ``records`` when
    ``report_to`` is ``"tensorboard"`` and this is the main process, else a ``NoWriter``. A run
    that does not resume first removes the event files an earlier run left there (``--overwrite``)."""
    if report_to != "tensorboard" or not is_main:
        return NoWriter()
    if not resume:
        for path in Path(run_dir).glob(EVENTS_GLOB):
            path.unlink()
    return TensorBoardWriter(run_dir, records)
