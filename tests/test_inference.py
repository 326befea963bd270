"""Inference end to end on a tiny random RoBERTa with a random (non-zero) adapter made here:
load_classifier and its Classifier, and predict.py in-process and as a real command."""

import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from tokenizers import processors

import lora.classifier as inference
from helpers import LABELS, MODEL_TOLERANCE, producer_config, toy_news
from lora import inject_lora, lora_layers, save_adapter
from lora.classifier import load_classifier, load_classifier_model
from lora.cli import latest_run, run_command
from lora.cli.predict import main
from lora.data import clean_text

REPO = Path(__file__).resolve().parent.parent
TEXTS = [
    "Team wins the cup after a late goal",
    "",
    "Stocks rally as bank profit beats forecasts",
    "<b>Scientists</b> unveil a new chip &lt;online&gt; (Reuters)",
    " ".join(["war election minister troops"] * 200),
]  # 800 words: truncated, not dropped


def make_adapter(model_dir, directory, seed=0, clean=True, max_length=16) -> Path:
    """A LoRA adapter for the tiny model whose B matrices and head are random, so that merging and
    cleaning visibly matter (hand-made tensors; the config is train.py's, ``producer_config``)."""
    torch.manual_seed(seed)
    model = load_classifier_model(str(model_dir), LABELS)
    inject_lora(model, ("query", "value"), r=4, alpha=8.0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.5)
        for parameter in model.classifier.parameters():
            parameter.normal_(std=0.5)
    return save_adapter(directory, model, **producer_config(model_dir, max_length=max_length, clean=clean))


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    return make_adapter(tiny_model_dir, tmp_path / "run")


def write_kaggle_pickle(path: Path, texts: list[str]) -> Path:
    """Like the competition's test_unlabelled.pkl: a pickled Hugging Face Dataset with ``text``."""
    path.write_bytes(pickle.dumps(Dataset.from_dict({"text": texts})))
    return path


def fail(argv, capsys) -> str:
    """Run predict.main as the command would; expect exit 2 and return the one stderr line."""
    with pytest.raises(SystemExit) as caught:
        run_command(lambda: main(argv))
    err = capsys.readouterr().err
    assert caught.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_kaggle_pickle_gives_one_row_per_text_in_input_order(adapter_dir, tmp_path):
    source = write_kaggle_pickle(tmp_path / "test_unlabelled.pkl", TEXTS)
    main(["--adapter", str(adapter_dir), "--input", str(source), "--output", str(tmp_path / "out.csv")])
    table = pd.read_csv(tmp_path / "out.csv")
    assert list(table.columns) == ["ID", "Label"]
    assert table["ID"].tolist() == list(range(len(TEXTS)))
    classifier = load_classifier(adapter_dir)
    assert table["Label"].tolist() == [LABELS.index(classifier.classify(text)) for text in TEXTS]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_merged_and_unmerged_predictions_agree(adapter_dir, tmp_path):
    merged, unmerged = load_classifier(adapter_dir), load_classifier(adapter_dir, merge=False)
    assert all(layer.merged for _, layer in lora_layers(merged.model))
    assert not any(layer.merged for _, layer in lora_layers(unmerged.model))
    np.testing.assert_allclose(
        merged.predict_proba(TEXTS),  # W + s B A folded, or not
        unmerged.predict_proba(TEXTS),
        **MODEL_TOLERANCE,
    )
    source = write_kaggle_pickle(tmp_path / "texts.pkl", TEXTS)
    for name, flags in (("merged.csv", []), ("unmerged.csv", ["--no-merge"])):
        main(["--adapter", str(adapter_dir), "--input", str(source), "--output", str(tmp_path / name), *flags])
    assert (tmp_path / "merged.csv").read_text() == (tmp_path / "unmerged.csv").read_text()


def test_a_merge_that_changes_predictions_falls_back_to_unmerged(adapter_dir, monkeypatch):
    real_merge = inference.merge_lora

    def broken_merge(model):
        """Merge, then disturb the merged weights."""
        real_merge(model)
        for _, layer in lora_layers(model):
            layer.base.weight.data.add_(torch.randn_like(layer.base.weight))

    reference = load_classifier(adapter_dir, merge=False)
    monkeypatch.setattr(inference, "merge_lora", broken_merge)
    with pytest.warns(UserWarning, match="unmerged"):
        classifier = load_classifier(adapter_dir)
    assert not any(layer.merged for _, layer in lora_layers(classifier.model))
    np.testing.assert_array_equal(classifier.predict_proba(TEXTS), reference.predict_proba(TEXTS))


def test_classify_cleans_truncates_and_keeps_empty_texts(adapter_dir):
    classifier = load_classifier(adapter_dir)
    names = classifier.classify(TEXTS)
    assert isinstance(names, list) and len(names) == len(TEXTS) and set(names) <= set(LABELS)
    assert classifier.classify(TEXTS[0]) == names[0]
    assert classifier.classify([]) == []
    # clean=True in the adapter config: the raw text is seen as its cleaned form ...
    raw = TEXTS[3]
    np.testing.assert_array_equal(classifier.predict_proba([raw]), classifier.predict_proba([clean_text(raw)]))
    classifier.config = dataclasses.replace(classifier.config, clean=False)  # ... which does make a difference here
    assert not np.allclose(classifier.predict_proba([raw]), classifier.predict_proba([clean_text(raw)]))
    # max_length=16 in the adapter config: 800 words read as their first 14 (+ <s>, </s>).
    long = TEXTS[4]
    np.testing.assert_allclose(
        classifier.predict_proba([long]), classifier.predict_proba([" ".join(long.split()[:14])]), atol=1e-6
    )
    # A tokenizer that adds no special tokens gives an empty text no tokens: still one row.
    classifier.tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    probabilities = classifier.predict_proba(["", "goal"])
    assert probabilities.shape == (2, 4) and np.isfinite(probabilities).all()


def test_probs_adds_label_names_and_probabilities_that_sum_to_one(adapter_dir, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    main(["--adapter", str(adapter_dir), "--input", str(source), "--output", str(tmp_path / "p.csv"), "--probs"])
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(table.columns) == ["ID", "Label", "LabelName", *LABELS]
    assert len(table) == len(TEXTS)
    np.testing.assert_allclose(table[LABELS].sum(axis=1), 1.0, atol=1e-5)
    assert (table[LABELS].to_numpy().argmax(axis=1) == table["Label"]).all()
    assert table["LabelName"].tolist() == [LABELS[i] for i in table["Label"]]


def test_text_prints_label_name_and_confidence(adapter_dir, capsys):
    main(["--adapter", str(adapter_dir), "--text", TEXTS[0], ""])
    lines = capsys.readouterr().out.splitlines()
    probabilities = load_classifier(adapter_dir).predict_proba([TEXTS[0], ""])
    assert len(lines) == 2
    for line, row in zip(lines, probabilities):
        index, name, confidence = line.split("\t")
        assert int(index) == row.argmax() and name == LABELS[int(index)]
        assert float(confidence) == pytest.approx(row.max(), abs=1e-4)


def test_labelled_csv_prints_accuracy_and_macro_f1(adapter_dir, tmp_path, capsys):
    news = toy_news(24)
    source = tmp_path / "test.csv"  # the original headerless AG News layout, classes 1..4
    pd.DataFrame({"class": news["label"] + 1, "title": news["text"], "description": ""}).to_csv(
        source, header=False, index=False
    )
    main(["--adapter", str(adapter_dir), "--input", str(source), "--output", str(tmp_path / "out.csv")])
    out = capsys.readouterr().out
    predictions = pd.read_csv(tmp_path / "out.csv")["Label"]
    assert f"accuracy {(predictions == news['label']).mean():.4f}, macro F1 " in out
    assert len(predictions) == len(news)


def test_standard_input_when_no_input_and_no_default_file(adapter_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Team wins the cup\n\nStocks rally\n"))
    main(["--adapter", str(adapter_dir)])
    assert pd.read_csv(tmp_path / "inference_output.csv")["ID"].tolist() == [0, 1, 2]


def test_command_defaults_to_newest_run_and_the_kaggle_file(tiny_model_dir, tmp_path):
    old = make_adapter(tiny_model_dir, tmp_path / "runs" / "old", seed=1)
    new = make_adapter(tiny_model_dir, tmp_path / "runs" / "new", seed=2)
    (tmp_path / "runs" / "unfinished").mkdir()  # newest, but no adapter yet
    for age, run in enumerate(["old", "new", "unfinished"]):
        os.utime(tmp_path / "runs" / run, (1e9 + age, 1e9 + age))
    write_kaggle_pickle(tmp_path / "test_unlabelled.pkl", TEXTS)
    done = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), "--probs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert latest_run(tmp_path / "runs") == new
    table = pd.read_csv(tmp_path / "inference_output.csv", keep_default_na=False)
    for run, same in ((new, True), (old, False)):
        assert np.allclose(table[LABELS], load_classifier(run).predict_proba(TEXTS), atol=1e-5) == same


def test_command_error_is_one_line_and_exit_2(adapter_dir, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "predict.py"),
            "--adapter",
            str(adapter_dir),
            "--input",
            str(tmp_path / "missing.csv"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: input {tmp_path / 'missing.csv'} does not exist"]


def edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_adapters_are_one_line_errors(adapter_dir, tmp_path, capsys, monkeypatch):
    texts = ["--text", "goal"]
    assert "does not exist" in fail(["--adapter", str(tmp_path / "nowhere"), *texts], capsys)
    (tmp_path / "empty").mkdir()
    assert "has no adapter.safetensors" in fail(["--adapter", str(tmp_path / "empty"), *texts], capsys)
    monkeypatch.chdir(tmp_path / "empty")
    assert "no run with an adapter under runs/" in fail(texts, capsys)

    edit_config(adapter_dir, target_modules=["dense_nowhere"])
    assert "does not fit base model" in fail(["--adapter", str(adapter_dir), *texts], capsys)
    edit_config(adapter_dir, target_modules=["query", "value"], r=8)
    assert "mis-shaped" in fail(["--adapter", str(adapter_dir), *texts], capsys)
    edit_config(adapter_dir, r=4)
    (adapter_dir / "adapter.safetensors").write_bytes(b"not tensors")
    assert "header" in fail(["--adapter", str(adapter_dir), *texts], capsys)
    (adapter_dir / "adapter_config.json").write_text("{")
    assert "not valid JSON" in fail(["--adapter", str(adapter_dir), *texts], capsys)


def test_bad_inputs_are_one_line_errors(adapter_dir, tmp_path, capsys):
    adapter = ["--adapter", str(adapter_dir), "--output", str(tmp_path / "out.csv")]
    files = {
        "notes.docx": "hello",
        "headlines.csv": "headline\nTeam wins\n",
        "empty.txt": "",
        "empty.csv": "",
        "empty.pkl": "",
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    assert "does not exist" in fail([*adapter, "--input", str(tmp_path / "missing.csv")], capsys)
    assert "unknown input format .docx" in fail([*adapter, "--input", str(tmp_path / "notes.docx")], capsys)
    assert "no text column" in fail([*adapter, "--input", str(tmp_path / "headlines.csv")], capsys)
    assert "holds no texts" in fail([*adapter, "--input", str(tmp_path / "empty.txt")], capsys)
    assert "cannot read" in fail([*adapter, "--input", str(tmp_path / "empty.csv")], capsys)
    assert "cannot read" in fail([*adapter, "--input", str(tmp_path / "empty.pkl")], capsys)
    assert "--batch-size must be at least 1" in fail([*adapter, "--batch-size", "0", "--text", "x"], capsys)
    assert not (tmp_path / "out.csv").exists()
    (tmp_path / "texts.txt").write_text("goal\n")
    assert "is a folder" in fail([*adapter, "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path)], capsys)
