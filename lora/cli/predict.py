"""Classify news texts with a LoRA adapter trained by train.py.

    python predict.py              # the newest run; ./test_unlabelled.pkl -> inference_output.csv
    python predict.py --adapter runs/20250101-120000 --input lora/bundled/ag_news/test.csv  # + accuracy, F1
    python predict.py --text "Stocks rally as oil prices fall" "Team wins the cup"
    python predict.py --input headlines.txt --probs --output headlines.csv
    python predict.py --adapter news=runs/a spam=runs/b --input mixed.csv   # its 'adapter' column names one per row

The adapter folder may be a run folder of train.py, a peft LoRA folder, or an ONNX export of
lora-export --format onnx (run by ONNX Runtime, with the same tokenizer, cleaning and outputs).

The CSV is the Kaggle layout: ID (row number) and Label (class index), one row per input row,
in input order; --probs adds the label name and one probability column per label. With several
adapters (all on one base: lora/serve/adapters.py) every row runs through the adapter its
--adapter-column names, all in mixed batches; the CSV then also has Adapter and LabelName.

Reads top to bottom: find the adapter, read the texts, load the model with the adapter merged
into it, predict, score when the input has labels, write the CSV.
"""

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from lora.classifier import classification_metrics, load_classifier
from lora.cli import UsageError, latest_run, run_command, save_predictions
from lora.data import encode_labels, read_table
from lora.serve.adapters import load_adapters

DEFAULT_INPUT = Path("test_unlabelled.pkl")  # the Kaggle competition's unlabelled test set
CHECK_ROWS = 16  # the merge is checked on this many input texts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter",
        nargs="+",
        help="run folder with adapter.safetensors and adapter_config.json, "
        "a peft LoRA folder of a sequence classifier, or an ONNX export (default: the "
        "newest run folder under runs/); several folders, each FOLDER "
        "or NAME=FOLDER, classify each row with the adapter its "
        "--adapter-column names",
    )
    parser.add_argument(
        "--adapter-column",
        default="adapter",
        help="with several adapters: the input column naming each row's adapter (default: %(default)s)",
    )
    parser.add_argument("--base", help="base model to load instead of the one the adapter names (hub id or folder)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="load the adapter even onto base weights other than those it was trained on",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--input",
        help="texts to classify: CSV (a 'text' column, or 'title' + 'description', "
        "or the headerless AG News layout), JSONL, Parquet, a pickled pandas "
        "DataFrame or Hugging Face Dataset (.pkl), plain text (.txt, one text a "
        "line), or '-' for standard input. Unpickling runs code: pickles are only "
        "read from the path named here or the default. (default: "
        f"./{DEFAULT_INPUT} if it exists, else standard input)",
    )
    source.add_argument(
        "--text",
        nargs="+",
        help="classify these texts and print 'label<TAB>name<TAB>confidence' lines instead of writing a CSV",
    )
    parser.add_argument("--output", default="inference_output.csv", help="the CSV to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="keep the LoRA branch apart from the base weights (slower; for checking)",
    )
    parser.add_argument(
        "--probs", action="store_true", help="add the label name and one probability column per label to the CSV"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a folder; name the CSV file to write")
    return args


def read_inputs(args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    """The texts (a ``text`` column, and ``label`` when the file has one) and where they came from."""
    if args.text is not None:
        return pd.DataFrame({"text": args.text}), "--text"
    path = args.input or (str(DEFAULT_INPUT) if DEFAULT_INPUT.is_file() else "-")
    if path == "-":
        if sys.stdin.isatty():
            print("reading texts from standard input, one a line; end with Ctrl-D", file=sys.stderr)
        frame, source = pd.DataFrame({"text": sys.stdin.read().splitlines()}), "standard input"
    else:
        frame, source = read_table(path, keep=(args.adapter_column,)), path
    if frame.empty:
        raise UsageError(f"{source} holds no texts")
    return frame, source


def load_any_classifier(folder: Path, args: argparse.Namespace, check_texts: list[str]):
    """The classifier in ``folder``, whatever kind of folder its files say it is: an ONNX export
    (``lora-export --format onnx``: ONNX Runtime), else an adapter of ours or peft's (PyTorch,
    merged and checked on ``check_texts``); anything else is a one-line error."""
    from lora.serve.onnx import is_onnx_export, load_onnx_classifier

    if is_onnx_export(folder):
        return load_onnx_classifier(folder, base_model=args.base, force=args.force)
    return load_classifier(folder, args.device, not args.no_merge, check_texts, args.base, args.force)


def main(argv=None) -> None:
    args = parse_args(argv)

    # Adapter and texts; the model, with the adapter merged (checked on the first texts).
    several = args.adapter is not None and len(args.adapter) > 1
    adapter_dir = None if several else Path(args.adapter[0]) if args.adapter else latest_run()
    frame, source = read_inputs(args)
    if several:  # each row with the adapter it names: predict_several below
        predict_several(args, frame, source)
        return
    texts = frame["text"].tolist()
    classifier = load_any_classifier(adapter_dir, args, texts[:CHECK_ROWS])
    labels = classifier.labels
    truth = encode_labels(frame, labels, source)["label"] if "label" in frame.columns else None
    print(
        f"adapter {adapter_dir} (base {args.base or classifier.config.base_model}), input {source}: {len(texts)} rows",
        file=sys.stderr,
    )

    # Predict: sorted by length for dynamic padding, returned in input order.
    probabilities = classifier.predict_proba(texts, args.batch_size, progress=args.text is None)
    predictions = probabilities.argmax(axis=1)

    if args.text is not None:
        for index, row in zip(predictions, probabilities):
            print(f"{index}\t{labels[index]}\t{row[index]:.4f}")
        return
    if truth is not None:
        metrics = classification_metrics(truth, predictions)
        print(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f} on {len(truth)} labelled rows")

    # The Kaggle layout, written atomically.
    table = pd.DataFrame({"ID": range(len(texts)), "Label": predictions})
    if args.probs:
        table["LabelName"] = [labels[index] for index in predictions]
        table[labels] = probabilities
    save_predictions(table, args.output)
    print(f"wrote {len(table)} predictions to {args.output}")


# ----------------------------------------------------------------------------- several adapters
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
        raise UsageError(
            "with several adapters, name each row's adapter in an --input column "
            f"({args.adapter_column!r}); --text has none"
        )
    if column in ("text", "label"):
        raise UsageError(f"--adapter-column cannot be the {column!r} column")
    if column not in frame.columns:
        raise UsageError(
            f"{source} has no {args.adapter_column!r} column naming each row's adapter (columns: {list(frame.columns)})"
        )
    folders = adapter_folders(args.adapter)
    names = frame[column].tolist()
    unknown = sorted(set(names) - folders.keys())
    if unknown:
        raise UsageError(
            f"{source} names adapter(s) {', '.join(map(repr, unknown[:5]))} in column "
            f"{args.adapter_column!r}; given: {', '.join(folders)}"
        )
    adapters = load_adapters(folders, args.device)
    print(
        f"adapters {', '.join(folders)} (base {adapters.base_model}), input {source}: {len(frame)} rows",
        file=sys.stderr,
    )

    # Predict: mixed batches, sorted by length, returned in input order.
    rows = adapters.predict_proba(frame["text"].tolist(), names, args.batch_size)
    predictions = [int(row.argmax()) for row in rows]
    label_names = [adapters.adapters[name].labels[index] for name, index in zip(names, predictions)]
    if "label" in frame.columns:
        print_scores(frame.assign(prediction=predictions), column, adapters, source)

    table = pd.DataFrame({"ID": range(len(frame)), "Adapter": names, "Label": predictions, "LabelName": label_names})
    if args.probs:
        every_label = list(dict.fromkeys(label for adapter in adapters.adapters.values() for label in adapter.labels))
        table[every_label] = pd.DataFrame(
            [dict(zip(adapters.adapters[name].labels, row)) for name, row in zip(names, rows)], columns=every_label
        )
    save_predictions(table, args.output)
    print(f"wrote {len(table)} predictions to {args.output}")


def print_scores(frame: pd.DataFrame, column: str, adapters, source: str) -> None:
    """Accuracy and macro F1 per adapter (rows grouped by ``column``), each on its own labels."""
    for name, group in frame.groupby(column, sort=True):
        truth = encode_labels(group, adapters.adapters[name].labels, f"{source} ({name} rows)")["label"]
        metrics = classification_metrics(truth, group["prediction"])
        print(
            f"{name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['f1_macro']:.4f} "
            f"on {len(truth)} labelled rows"
        )


def run() -> None:
    """The ``lora-predict`` console command and ``python predict.py``."""
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, like errors
    run_command(main)


if __name__ == "__main__":
    run()
