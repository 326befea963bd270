"""``predict.py`` with several adapters: every row is classified by the adapter its input column
names, all adapters on one copy of their base, rows of different adapters in mixed batches
(``lora.multi_inference``). The CSV: ID, Adapter, Label (the class index in that adapter's
labels), LabelName; --probs adds one column per label of any adapter, empty where the row's
adapter has no such label."""
import argparse
import sys

import pandas as pd

from lora.data import encode_labels
from lora.errors import UsageError
from lora.inference import save_predictions
from lora.multi_inference import load_adapters
from lora.report import classification_metrics


def adapter_folders(specs: list[str]) -> dict[str, str]:
    """``--adapter`` values, each ``FOLDER`` or ``NAME=FOLDER``, as ``{name: folder}``."""
    folders = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or folder.rstrip("/").rsplit("/", 1)[-1]
        if name in folders:
            raise UsageError(f"two adapters are named {name!r}; name them apart: --adapter NAME=FOLDER ...")
        folders[name] = folder
    return folders


def predict_several(args: argparse.Namespace, frame: pd.DataFrame, source: str) -> None:
    """Classify ``frame``'s rows, each with its own adapter, and write or print the results."""
    column = args.adapter_column.lower()
    if args.text is not None:
        raise UsageError("with several adapters, name each row's adapter in an --input column "
                         f"({args.adapter_column!r}); --text has none")
    if column in ("text", "label"):
        raise UsageError(f"--adapter-column cannot be the {column!r} column")
    if column not in frame.columns:
        raise UsageError(f"{source} has no {args.adapter_column!r} column naming each row's adapter "
                         f"(columns: {list(frame.columns)})")
    folders = adapter_folders(args.adapter)
    names = frame[column].tolist()
    unknown = sorted(set(names) - folders.keys())
    if unknown:
        raise UsageError(f"{source} names adapter(s) {', '.join(map(repr, unknown[:5]))} in column "
                         f"{args.adapter_column!r}; given: {', '.join(folders)}")
    adapters = load_adapters(folders, args.device)
    print(f"adapters {', '.join(folders)} (base {adapters.base_model}), input {source}: {len(frame)} rows",
          file=sys.stderr)

    # Predict: mixed batches, sorted by length, returned in input order.
    rows = adapters.predict_proba(frame["text"].tolist(), names, args.batch_size)
    predictions = [int(row.argmax()) for row in rows]
    label_names = [adapters.adapters[name].labels[index] for name, index in zip(names, predictions)]
    if "label" in frame.columns:
        print_scores(frame.assign(prediction=predictions), column, adapters, source)

    table = pd.DataFrame({"ID": range(len(frame)), "Adapter": names, "Label": predictions,
                          "LabelName": label_names})
    if args.probs:
        every_label = list(dict.fromkeys(label for adapter in adapters.adapters.values() for label in adapter.labels))
        table[every_label] = pd.DataFrame([dict(zip(adapters.adapters[name].labels, row))
                                           for name, row in zip(names, rows)], columns=every_label)
    save_predictions(table, args.output)
    print(f"wrote {len(table)} predictions to {args.output}")


def print_scores(frame: pd.DataFrame, column: str, adapters, source: str) -> None:
    """Accuracy and macro F1 per adapter (rows grouped by ``column``), each on its own labels."""
    for name, group in frame.groupby(column, sort=True):
        truth = encode_labels(group, adapters.adapters[name].labels, f"{source} ({name} rows)")["label"]
        metrics = classification_metrics(truth, group["prediction"])
        print(f"{name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f} "
              f"on {len(truth)} labelled rows")
