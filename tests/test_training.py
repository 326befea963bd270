"""The training job end to end on a tiny random RoBERTa and a learnable toy task."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import lora.training as training
from conftest import tiny_model, toy_news, tiny_tokenizer
from lora import inject_lora
from lora.data import pad_batch, tokenize
from lora.errors import run_command
from lora.training import TrainConfig, accumulate_gradients, train
from lora.cli.train import main, parse_args

REPO = Path(__file__).resolve().parent.parent


def config_for(model_dir, data_dir, output_dir, **overrides) -> TrainConfig:
    settings = dict(model=str(model_dir), data=str(data_dir), output_dir=str(output_dir),
                    r=4, alpha=8.0, dropout=0.0, lr=5e-3, batch_size=16, grad_accum=2,
                    epochs=2, eval_steps=5, log_steps=1, max_length=32, val_size=0.1,
                    warmup_ratio=0.0)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_loss_decreases_and_the_run_folder_holds_everything(tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(config_for(tiny_model_dir, toy_data_dir, out, epochs=4, patience=100))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert sum(train_losses[-5:]) / 5 < 0.7 * sum(train_losses[:5]) / 5
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert summary["test"]["accuracy"] > 0.6  # 4 classes: chance is 0.25
    expected = {"adapter.safetensors", "adapter_config.json", "metrics.jsonl", "summary.json",
                "train_config.json", "checkpoint.pt", "loss.png", "val_accuracy.png",
                "val_precision_recall_f1.png", "confusion_matrix.png", "per_class_error.png",
                "misclassified.csv"}
    assert expected <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["query", "value"]
    assert config["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert config["base_model"] == str(Path(tiny_model_dir).resolve()) and config["max_length"] == 32
    assert set(json.loads((out / "summary.json").read_text())) >= {
        "best_step", "val", "test", "trainable_parameters", "total_parameters",
        "train_seconds", "examples_per_second"}
    assert summary["trainable_parameters"] == 2 * 2 * 4 * (32 + 32) + (32 * 32 + 32) + (32 * 4 + 4)
    assert all(k.startswith("classifier.") or "lora_" in k
               for k in load_file(str(out / "adapter.safetensors")))
    wrong = pd.read_csv(out / "misclassified.csv")
    assert list(wrong.columns) == ["index", "true", "predicted", "confidence", "text"]
    assert wrong["confidence"].is_monotonic_decreasing


def test_gradient_accumulation_4x8_equals_one_batch_of_32():
    tokenizer = tiny_tokenizer()
    data = toy_news(32, seed=3)
    ids, labels = tokenize(data["text"], tokenizer, 32), data["label"].tolist()
    gradients = []
    for split in (1, 4):
        model = tiny_model(seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        inject_lora(model, r=4, alpha=8.0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.train()
        size = 32 // split
        batches = [pad_batch(ids[i:i + size], tokenizer.pad_token_id, labels[i:i + size])
                   for i in range(0, 32, size)]
        accumulate_gradients(model, batches, torch.autocast("cpu", enabled=False),
                             torch.amp.GradScaler("cpu", enabled=False))
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == 2 * 2 * 2 + 4
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-5, rtol=0)


def test_early_stopping_fires_after_patience_evaluations_without_improvement(
        tiny_model_dir, toy_data_dir, tmp_path):
    # A learning rate too small to change any prediction: the first evaluation stays best.
    summary = train(config_for(tiny_model_dir, toy_data_dir, tmp_path / "run", lr=1e-12,
                               eval_steps=2, patience=2, epochs=10))
    assert summary["stopped_early"] is True
    assert summary["best_step"] == 2
    assert summary["steps"] == 6  # evaluations at steps 2 (best), 4 and 6 (no improvement)


def test_resume_after_interruption_reproduces_the_uninterrupted_adapter(
        tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    settings = dict(dropout=0.1, max_steps=8, eval_steps=2, patience=100)
    train(config_for(tiny_model_dir, toy_data_dir, tmp_path / "straight", **settings))

    calls = {"n": 0}
    real_step = training.accumulate_gradients

    def crash_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(training, "accumulate_gradients", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(config_for(tiny_model_dir, toy_data_dir, tmp_path / "resumed", **settings))
    monkeypatch.setattr(training, "accumulate_gradients", real_step)
    torch.manual_seed(1234)  # whatever state the process is in: the checkpoint restores it
    summary = train(TrainConfig(output_dir=str(tmp_path / "resumed"), resume=True))

    straight = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert summary["steps"] == 8
    assert summary == {**json.loads((tmp_path / "straight" / "summary.json").read_text()),
                       "config": summary["config"], "train_seconds": summary["train_seconds"],
                       "examples_per_second": summary["examples_per_second"]}


def run_main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    return error


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-steps", "0"], "--eval-steps must be at least 1"),
    (["--val-size", "1.5"], "--val-size must be between 0 and 1"),
    (["--r", "0"], "rank r must be an integer >= 1"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--fp16", "--device", "cpu"], "--fp16 needs a CUDA device"),
    (["--target-modules", "q", "v"], "this model's Linear modules are named"),
])
def test_impossible_settings_are_one_line_errors(flags, message, tiny_model_dir, toy_data_dir,
                                                 tmp_path, capsys):
    error = run_main(["--model", str(tiny_model_dir), "--data", str(toy_data_dir),
                      "--output-dir", str(tmp_path / "run"), *flags], capsys)
    assert message in error


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_data, message", [
    (lambda d: d / "absent.csv", "does not exist"),
    (lambda d: _write(d / "cols.csv", "headline,label\nsome news,1\n"), "no text column"),
    (lambda d: _write(d / "labels.csv", "text,label\n" + "a b c,7\n" * 20), "outside the label set"),
    (lambda d: _write(d / "empty.csv", "text,label\n"), "is empty"),
    (lambda d: _write(d / "data.xml", "<xml/>"), "unknown input format"),
    (lambda d: (d / "nofiles").mkdir() or d / "nofiles", "has no train or test file"),
])
def test_bad_data_is_a_one_line_error(make_data, message, tiny_model_dir, tmp_path, capsys):
    error = run_main(["--model", str(tiny_model_dir), "--data", str(make_data(tmp_path)),
                      "--output-dir", str(tmp_path / "run")], capsys)
    assert message in error


def test_unknown_model_is_a_one_line_error_naming_the_offline_options(toy_data_dir, tmp_path, capsys):
    for model in ("./no/such/folder", "no-such-model-anywhere"):
        error = run_main(["--model", model, "--data", str(toy_data_dir),
                          "--output-dir", str(tmp_path / model.replace("/", "_"))], capsys)
        assert model in error


def test_non_empty_output_dir_is_refused_and_left_untouched(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    error = run_main(["--model", str(tiny_model_dir), "--data", str(toy_data_dir),
                      "--output-dir", str(out)], capsys)
    assert "--resume" in error and "--overwrite" in error
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert "no checkpoint" in run_main(["--resume", "--output-dir", str(out)], capsys)


def test_defaults_are_the_seeds_best_configuration():
    config = parse_args([])
    assert (config.r, config.alpha, config.dropout, config.lr, config.batch_size, config.grad_accum,
            config.eval_steps, config.max_length) == (10, 64.0, 0.1, 3.99e-4, 32, 4, 400, 128)
    assert config.target_modules == ("query", "value") and config.model == "roberta-base"
    assert config.data == "ag_news" and config.precision is None


def test_command_line_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--batch-size", "0",
                             "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --batch-size must be at least 1, got 0"
