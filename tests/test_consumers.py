"""Every consumer of an adapter folder, tested on what train.py really writes (``trained_runs``:
a float base with LoRA and with DoRA, an nf4 base): predict.py alone and with several adapters,
lora-export, inspect_lora.py and a resumed run. lora-serve's are in test_serve.py.

Tests on hand-made imitations of those folders passed while every real one was refused: train.py
writes ``"quantize_base": null`` for a float base, the imitations wrote nothing, and two readers
took only a missing key or ``"none"`` for a float base. Older layouts are tested on hand-made
files at the end, the one thing the producer of today cannot make.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import LABELS, MODEL_TOLERANCE, TRAINED_RUNS, tiny_model, tiny_tokenizer
from lora.adapter import CONFIG_NAME, AdapterConfig, load_adapter
from lora.classifier import load_classifier
from lora.cli import run_command
from lora.cli.export import main as export_main
from lora.cli.inspect_lora import main as inspect_main
from lora.cli.predict import main as predict_main
from lora.serve.adapters import load_adapters
from lora.train import TrainConfig
from lora.train.loop import train

FLOAT_RUNS = [name for name, settings in TRAINED_RUNS.items() if "quantize_base" not in settings]


def test_the_config_train_py_writes_reads_back_with_nothing_left_to_guess(trained_runs):
    for name, run in trained_runs.items():
        written = json.loads((run / CONFIG_NAME).read_text())
        config = load_adapter(run)[1]
        assert config.to_json() == written, name  # every field written, none left to a default
        assert AdapterConfig.from_json(config.to_json()) == config, name
    assert json.loads((trained_runs["lora"] / CONFIG_NAME).read_text())["quantize_base"] is None
    assert load_adapter(trained_runs["nf4"])[1].quantize_base == "nf4"
    dora = load_adapter(trained_runs["dora"])[1]
    assert (dora.lora.dora, dora.clean, dora.max_length) == (True, True, 12)
    assert dora.lora.trainable_modules == ("classifier", "output.LayerNorm")  # as given, not rebuilt


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", TRAINED_RUNS)
def test_predict_py_reproduces_the_test_loss_and_accuracy_the_run_measured(
    name, trained_runs, noisy_data_dir, tmp_path, capsys
):
    summary = json.loads((trained_runs[name] / "summary.json").read_text())["test"]
    out = tmp_path / "predictions.csv"
    predict_main(
        [
            "--adapter",
            str(trained_runs[name]),
            "--input",
            str(noisy_data_dir / "test.csv"),
            "--output",
            str(out),
            "--probs",
        ]
    )
    assert f"accuracy {summary['accuracy']:.4f}, macro F1 {summary['f1_macro']:.4f} on 120" in capsys.readouterr().out
    probabilities = torch.tensor(pd.read_csv(out)[LABELS].to_numpy())
    truth = torch.tensor(pd.read_csv(noisy_data_dir / "test.csv")["label"].to_numpy())
    loss = torch.nn.functional.nll_loss(probabilities.log(), truth)
    # predict.py merges the adapter (into the dequantized base for nf4); training evaluated it unmerged.
    torch.testing.assert_close(loss, torch.tensor(summary["loss"], dtype=loss.dtype), **MODEL_TOLERANCE)


@pytest.mark.timeout(90)
def test_predict_py_with_two_train_py_adapters_answers_each_row_as_each_does_alone(trained_runs, tmp_path, capsys):
    texts = [
        "Team wins the cup after a late goal",
        "stocks profit shares market",
        "",
        "new chip for online research",
        "war election minister troops",
        "the market said today",
    ]
    names = ["a", "b", "b", "a", "a", "b"]
    pd.DataFrame({"text": texts, "adapter": names}).to_csv(tmp_path / "mixed.csv", index=False)
    predict_main(
        [
            "--adapter",
            f"a={trained_runs['lora']}",
            f"b={trained_runs['dora']}",
            "--input",
            str(tmp_path / "mixed.csv"),
            "--output",
            str(tmp_path / "out.csv"),
            "--probs",
        ]
    )
    table = pd.read_csv(tmp_path / "out.csv")
    alone = {"a": load_classifier(trained_runs["lora"], "cpu"), "b": load_classifier(trained_runs["dora"], "cpu")}
    for (_, row), text, name in zip(table.iterrows(), texts, names):
        want = alone[name].predict_proba([text])[0]
        # A mixed batch adds s (x A^T) B^T to the base's output; alone, s B A was merged into W first.
        np.testing.assert_allclose(row[LABELS].astype(float), want, **MODEL_TOLERANCE)
        assert row["LabelName"] == LABELS[want.argmax()]
    assert "wrote 6 predictions" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_an_adapter_trained_on_an_nf4_base_is_served_alone_and_refused_among_several(trained_runs, tmp_path, capsys):
    adapters = load_adapters({"a": trained_runs["lora"], "b": trained_runs["dora"]}, device="cpu")
    assert sorted(adapters.adapters) == ["a", "b"]
    pd.DataFrame({"text": ["goal", "chip"], "adapter": ["a", "q"]}).to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(SystemExit) as caught:
        run_command(
            lambda: predict_main(
                [
                    "--adapter",
                    f"a={trained_runs['lora']}",
                    f"q={trained_runs['nf4']}",
                    "--input",
                    str(tmp_path / "mixed.csv"),
                    "--output",
                    str(tmp_path / "o.csv"),
                ]
            )
        )
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1, err
    assert "was trained on a nf4 base; several adapters are served on a float base only" in err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", TRAINED_RUNS)
def test_lora_export_notes_a_quantized_base_and_only_that(name, trained_runs, tmp_path, capsys):
    export_main([str(trained_runs[name]), str(tmp_path / "peft")])
    out = capsys.readouterr().out
    assert "wrote a peft LoRA adapter" in out
    if name in FLOAT_RUNS:
        assert "note:" not in out and "None" not in out, out
    else:
        assert "note: the adapter was trained on a nf4 base" in out
    # The exported folder reads back as the adapter it came from.
    texts = ["Team wins the cup after a late goal", "stocks profit shares market"]
    exported, original = (
        load_classifier(folder, "cpu").predict_proba(texts) for folder in (tmp_path / "peft", trained_runs[name])
    )
    np.testing.assert_allclose(exported, original, **MODEL_TOLERANCE)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", TRAINED_RUNS)
def test_inspect_lora_reads_every_run(name, trained_runs, tmp_path, capsys):
    inspect_main(["--adapter", str(trained_runs[name]), "--json", "--plot", str(tmp_path / "updates.png")])
    report = json.loads(capsys.readouterr().out)
    assert [layer["name"].split(".", 3)[-1] for layer in report["layers"]] == [
        "0.attention.self.query",
        "0.attention.self.value",
        "1.attention.self.query",
        "1.attention.self.value",
    ]
    assert all(layer["update_norm"] > 0 for layer in report["layers"])  # trained: B moved away from zero
    assert all((layer["magnitude_change"] is not None) == (name == "dora") for layer in report["layers"])
    assert report["merge_gap"] < 1e-4 and (tmp_path / "updates.png").is_file()


@pytest.mark.timeout(60)
def test_resuming_a_finished_run_on_an_nf4_base_tests_the_same_adapter_again(trained_runs, tmp_path, capsys):
    run = shutil.copytree(trained_runs["nf4"], tmp_path / "run")
    before = json.loads((run / "summary.json").read_text())
    resumed = train(TrainConfig(output_dir=str(run), resume=True))  # every other setting from the run
    assert "resuming at step 6 of 6" in capsys.readouterr().out
    assert resumed["config"]["quantize_base"] == "nf4"
    assert resumed["test"] == before["test"] and resumed["best_step"] == before["best_step"]


# ----------------------------------------------------------------------------- older layouts
def old_layout(run, tmp_path, **changes):
    """A copy of a train.py run whose adapter config is rewritten the way an older version wrote
    it (hand-made: today's producer cannot write it); ``None`` drops a key."""
    folder = shutil.copytree(run, tmp_path / "old")
    config = json.loads((folder / CONFIG_NAME).read_text())
    for key, value in changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


@pytest.mark.timeout(60)
def test_older_layouts_read_as_what_they_meant(trained_runs, tmp_path):
    """Before 0.3 a float base was ``"none"``; earlier files had no dropout, variant flags,
    fingerprint, provenance or quantization keys at all."""
    old = old_layout(
        trained_runs["lora"],
        tmp_path,
        quantize_base="none",
        double_quant=None,
        dropout=None,
        rslora=None,
        dora=None,
        base_fingerprint=None,
        provenance=None,
        clean=None,
    )
    config = load_adapter(old)[1]
    assert config.quantize_base is None and config.lora.dropout == 0.0 and config.provenance == {}
    adapters = load_adapters({"old": old, "new": trained_runs["lora"]}, device="cpu")
    texts = ["Team wins the cup", "stocks profit shares"]
    rows = adapters.predict_proba(texts, ["old", "new"])
    want = load_classifier(trained_runs["lora"], "cpu").predict_proba(texts)
    for row, expected in zip(rows, want):
        np.testing.assert_allclose(row, expected, **MODEL_TOLERANCE)


@pytest.mark.timeout(60)
def test_an_adapter_folder_written_by_lora_0_3_0_still_loads_and_predicts(tmp_path):
    """``tests/fixtures/adapter-0.3.0``: an adapter folder (and its predictions) as lora 0.3.0
    wrote them, before the redesign, for the tiny RoBERTa of ``tiny_model(0)``."""
    fixture = Path(__file__).parent / "fixtures" / "adapter-0.3.0"
    base = tmp_path / "tiny"
    tiny_model(0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    expected = json.loads((fixture / "expected.json").read_text())
    classifier = load_classifier(fixture, "cpu", base_model=str(base))  # its fingerprint matches
    probabilities = classifier.predict_proba(expected["texts"])
    np.testing.assert_allclose(probabilities, expected["probabilities"], **MODEL_TOLERANCE)
