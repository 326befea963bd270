"""Metrics and what a run leaves for people to look at: JSON lines, plots, misclassified rows."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (ConfusionMatrixDisplay, accuracy_score,  # noqa: E402
                             confusion_matrix, precision_recall_fscore_support)

from .config import HIGHER_IS_BETTER  # noqa: E402


def classification_metrics(labels, predictions) -> dict:
    """Accuracy and macro precision / recall / F1 (scikit-learn)."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "precision_macro": float(precision), "recall_macro": float(recall),
            "f1_macro": float(f1)}


def is_improvement(metric: str, value: float, best: float | None) -> bool:
    """True when ``value`` beats ``best`` for ``metric`` (lower is better only for loss)."""
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list, list]]) -> None:
    figure, axes = plt.subplots(figsize=(6.4, 4))
    for name, (steps, values) in series.items():
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_history(records: list[dict], directory: Path) -> None:
    """``loss.png`` (train vs validation), ``val_accuracy.png``, ``val_precision_recall_f1.png``."""
    logs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in evals]
    _plot(directory / "loss.png", "Training and validation loss", "cross-entropy",
          {"train": ([r["step"] for r in logs], [r["loss"] for r in logs]),
           "validation": (steps, [r["loss"] for r in evals])})
    _plot(directory / "val_accuracy.png", "Validation accuracy", "accuracy",
          {"accuracy": (steps, [r["accuracy"] for r in evals])})
    _plot(directory / "val_precision_recall_f1.png", "Validation macro precision / recall / F1",
          "score", {name: (steps, [r[f"{name}_macro"] for r in evals])
                    for name in ("precision", "recall", "f1")})


def plot_test_errors(labels, predictions, label_names: list[str], directory: Path) -> None:
    """``confusion_matrix.png`` (rows normalised to 1) and ``per_class_error.png``."""
    matrix = confusion_matrix(labels, predictions, labels=range(len(label_names)), normalize="true")
    figure, axes = plt.subplots(figsize=(5.6, 4.8))
    ConfusionMatrixDisplay(matrix, display_labels=label_names).plot(
        ax=axes, cmap="Blues", values_format=".2f", colorbar=False)
    axes.set_title("Test confusion matrix (normalised by true class)")
    figure.tight_layout()
    figure.savefig(directory / "confusion_matrix.png", dpi=110)
    plt.close(figure)

    errors = 1 - np.diag(np.nan_to_num(matrix))
    figure, axes = plt.subplots(figsize=(5.6, 3.6))
    axes.bar(label_names, 100 * errors, color="tab:red")
    for x, error in enumerate(errors):
        axes.annotate(f"{100 * error:.1f}%", (x, 100 * error), ha="center", va="bottom")
    axes.set(title="Test error rate per class", ylabel="misclassified (%)")
    figure.tight_layout()
    figure.savefig(directory / "per_class_error.png", dpi=110)
    plt.close(figure)


def misclassified_table(texts, labels, probabilities: np.ndarray, label_names: list[str],
                        limit: int = 100) -> pd.DataFrame:
    """The ``limit`` most confidently wrong examples: text, true and predicted label, confidence."""
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predictions != np.asarray(labels))
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return pd.DataFrame({
        "index": wrong,
        "true": [label_names[labels[i]] for i in wrong],
        "predicted": [label_names[predictions[i]] for i in wrong],
        "confidence": confidence[wrong].round(4),
        "text": [texts[i] for i in wrong],
    })
