"""Data sources, cleaning, splits and batches."""

import pickle

import datasets
import pandas as pd
import pytest
import torch

from helpers import refused
from lora.data import (
    AG_NEWS_LABELS,
    clean_text,
    drop_extreme_lengths,
    encode_labels,
    length_grouped_batches,
    load_splits,
    pad_batch,
    read_table,
)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Oil hits #36;50 a barrel, it#39;s said", "Oil hits $50 a barrel, it's said"),
        ("&lt;b&gt;Bold&lt;/b&gt; move", "Bold move"),
        ("He said quot;no quot; today", 'He said "no " today'),
        ("Stocks up (Reuters) Reuters - Shares rose", "Stocks up Shares rose"),
        ("Paris AFP - Talks resumed", "Paris Talks resumed"),
        ("Read more at http://example.com/x?y=1 or www.site.org now", "Read more at or now"),
        ("A second\\team  of   rocketeers", "A second team of rocketeers"),
        ("Plain headline stays", "Plain headline stays"),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_drop_extreme_lengths_drops_only_the_tails():
    frame = pd.DataFrame({"text": ["word " * n for n in range(1, 1001)], "label": 0})
    kept = drop_extreme_lengths(frame)
    lengths = kept["text"].str.split().str.len()
    assert len(kept) == 990 and lengths.min() == 6 and lengths.max() == 995


def test_every_input_format_reads_to_the_same_frame(tmp_path):
    frame = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": [1, 2, 3]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_pickle(tmp_path / "frame.pkl")
    with open(tmp_path / "dataset.pkl", "wb") as file:
        pickle.dump(datasets.Dataset.from_pandas(frame), file)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    for name in ("t.csv", "t.jsonl", "t.parquet", "frame.pkl", "dataset.pkl", "saved"):
        pd.testing.assert_frame_equal(read_table(tmp_path / name), frame, check_dtype=False)
    (tmp_path / "t.txt").write_text("a b\nc d\n\ne f\n")
    assert read_table(tmp_path / "t.txt")["text"].tolist() == ["a b", "c d", "", "e f"]


def test_headerless_ag_news_and_title_description_layouts(tmp_path):
    (tmp_path / "ag.csv").write_text('3,"Oil up","Prices rose, again"\n1,War,Troops moved\n')
    (tmp_path / "td.csv").write_text("Class Index,Title,Description\n3,Oil up,Prices rose\n")
    headerless = read_table(tmp_path / "ag.csv")
    assert headerless.to_dict("list") == {"text": ["Oil up Prices rose, again", "War Troops moved"], "label": [3, 1]}
    assert read_table(tmp_path / "td.csv").to_dict("list") == {"text": ["Oil up Prices rose"], "label": [3]}


def test_labels_one_based_zero_based_and_names():
    names = AG_NEWS_LABELS
    one_based = encode_labels(pd.DataFrame({"text": "x", "label": [1, 2, 3, 4]}), names, "s")
    zero_based = encode_labels(pd.DataFrame({"text": "x", "label": [0, 1, 2, 3]}), names, "s")
    by_name = encode_labels(pd.DataFrame({"text": "x", "label": names}), names, "s")
    assert one_based["label"].tolist() == zero_based["label"].tolist() == by_name["label"].tolist() == [0, 1, 2, 3]
    with refused("outside the label set"):
        encode_labels(pd.DataFrame({"text": "x", "label": [0, 5]}), names, "s")
    with refused("neither names"):
        encode_labels(pd.DataFrame({"text": "x", "label": ["Weather"]}), names, "s")


def test_bundled_splits_are_stratified_and_disjoint():
    splits = load_splits("bundled", val_size=0.05, seed=42)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4750, 250, 7600)
    assert splits.test["label"].value_counts().to_dict() == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    val_share = splits.val["label"].value_counts(normalize=True)
    train_share = splits.train["label"].value_counts(normalize=True)
    assert (val_share - train_share).abs().max() < 0.01
    assert not set(splits.val["text"]) & set(splits.train["text"])
    again = load_splits("bundled", val_size=0.05, seed=42)
    assert again.val["text"].tolist() == splits.val["text"].tolist()


def test_length_grouped_batches_cover_every_example_once_and_group_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = length_grouped_batches(lengths, batch_size=32, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert batches == length_grouped_batches(lengths, batch_size=32, seed=3)
    assert batches != length_grouped_batches(lengths, batch_size=32, seed=4)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_order = [list(range(i, min(i + 32, 1000))) for i in range(0, 1000, 32)]
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_order)
    assert padded < 0.7 * padded_random
    sorted_batches = length_grouped_batches(lengths, batch_size=32, seed=0, shuffle=False)
    flat = [lengths[i] for batch in sorted_batches for i in batch]
    assert flat == sorted(lengths)


def test_pad_batch_pads_to_the_longest_in_the_batch():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=1, labels=[2, 0])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 1, 1]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([2, 0]))
