"""The training job end to end on a tiny random RoBERTa and a learnable toy task."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

import lora.train.loop as training
from lora.cli import run_command
from lora.cli.train import main, parse_args
from lora.train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent


def config_for(model_dir, data_dir, output_dir, **overrides) -> TrainConfig:
    settings = dict(
        model=str(model_dir),
        data=str(data_dir),
        output_dir=str(output_dir),
        r=4,
        alpha=8.0,
        dropout=0.0,
        lr=5e-3,
        batch_size=16,
        grad_accum=2,
        epochs=2,
        eval_steps=5,
        log_steps=1,
        max_length=32,
        val_size=0.1,
        warmup_ratio=0.0,
    )
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
    expected = {
        "adapter.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "summary.json",
        "train_config.json",
        "checkpoint.pt",
        "loss.png",
        "val_accuracy.png",
        "val_precision_recall_f1.png",
        "confusion_matrix.png",
        "per_class_error.png",
        "misclassified.csv",
    }
    assert expected <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["query", "value"]
    assert config["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert config["base_model"] == str(Path(tiny_model_dir).resolve()) and config["max_length"] == 32
    assert set(json.loads((out / "summary.json").read_text())) >= {
        "best_step",
        "val",
        "test",
        "trainable_parameters",
        "total_parameters",
        "train_seconds",
        "examples_per_second",
    }
    assert summary["trainable_parameters"] == 2 * 2 * 4 * (32 + 32) + (32 * 32 + 32) + (32 * 4 + 4)
    assert all(k.startswith("classifier.") or "lora_" in k for k in load_file(str(out / "adapter.safetensors")))
    wrong = pd.read_csv(out / "misclassified.csv")
    assert list(wrong.columns) == ["index", "true", "predicted", "confidence", "text"]
    assert wrong["confidence"].is_monotonic_decreasing


def test_early_stopping_fires_after_patience_evaluations_without_improvement(tiny_model_dir, toy_data_dir, tmp_path):
    # A learning rate too small to change any prediction: the first evaluation stays best.
    summary = train(
        config_for(tiny_model_dir, toy_data_dir, tmp_path / "run", lr=1e-12, eval_steps=2, patience=2, epochs=10)
    )
    assert summary["stopped_early"] is True
    assert summary["best_step"] == 2
    assert summary["steps"] == 6  # evaluations at steps 2 (best), 4 and 6 (no improvement)


def run_main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: main(argv))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    return error


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--eval-steps", "0"], "--eval-steps must be at least 1"),
        (["--val-size", "1.5"], "--val-size must be between 0 and 1"),
        (["--r", "0"], "rank r must be an integer >= 1"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
        (["--target-modules", "q", "v"], "this model's Linear modules are named"),
    ],
)
def test_impossible_settings_are_one_line_errors(flags, message, tiny_model_dir, toy_data_dir, tmp_path, capsys):
    error = run_main(
        ["--model", str(tiny_model_dir), "--data", str(toy_data_dir), "--output-dir", str(tmp_path / "run"), *flags],
        capsys,
    )
    assert message in error


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_data, message",
    [
        (lambda d: d / "absent.csv", "does not exist"),
        (lambda d: _write(d / "cols.csv", "headline,label\nsome news,1\n"), "no text column"),
        (lambda d: _write(d / "labels.csv", "text,label\n" + "a b c,7\n" * 20), "outside the label set"),
        (lambda d: _write(d / "empty.csv", "text,label\n"), "is empty"),
        (lambda d: _write(d / "data.xml", "<xml/>"), "unknown input format"),
        (lambda d: (d / "nofiles").mkdir() or d / "nofiles", "has no train or test file"),
    ],
)
def test_bad_data_is_a_one_line_error(make_data, message, tiny_model_dir, tmp_path, capsys):
    error = run_main(
        ["--model", str(tiny_model_dir), "--data", str(make_data(tmp_path)), "--output-dir", str(tmp_path / "run")],
        capsys,
    )
    assert message in error


def test_unknown_model_is_a_one_line_error_naming_the_offline_options(toy_data_dir, tmp_path, capsys):
    for model in ("./no/such/folder", "no-such-model-anywhere"):
        error = run_main(
            ["--model", model, "--data", str(toy_data_dir), "--output-dir", str(tmp_path / model.replace("/", "_"))],
            capsys,
        )
        assert model in error


def test_non_empty_output_dir_is_refused_and_left_untouched(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    error = run_main(["--model", str(tiny_model_dir), "--data", str(toy_data_dir), "--output-dir", str(out)], capsys)
    assert "--resume" in error and "--overwrite" in error
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert "no checkpoint" in run_main(["--resume", "--output-dir", str(out)], capsys)


def test_defaults_are_the_seeds_best_configuration():
    config = parse_args([])
    assert (
        config.r,
        config.alpha,
        config.dropout,
        config.lr,
        config.batch_size,
        config.grad_accum,
        config.eval_steps,
        config.max_length,
    ) == (10, 64.0, 0.1, 3.99e-4, 32, 4, 400, 128)
    assert config.target_modules == ("query", "value") and config.model == "roberta-base"
    assert config.data == "ag_news" and config.precision is None


def test_command_line_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--batch-size", "0", "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --batch-size must be at least 1, got 0"


def test_nothing_is_written_before_the_settings_are_known_good(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", str(tiny_model_dir), "--data", str(toy_data_dir), "--output-dir", str(out)]
    assert "Linear modules are named" in run_main([*base, "--target-modules", "q", "v"], capsys)
    assert "does not exist" in run_main([*base[:2], "--data", str(tmp_path / "absent.csv"), *base[4:]], capsys)
    assert not out.exists()
    main([*base, "--max-steps", "1", "--batch-size", "16", "--max-length", "32"])  # corrected: runs
    assert (out / "adapter.safetensors").is_file()


def test_overwrite_clears_the_previous_runs_checkpoint(tiny_model_dir, toy_data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    flags = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(toy_data_dir),
        "--output-dir",
        str(out),
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--eval-steps",
        "2",
    ]
    main([*flags, "--max-steps", "2"])
    assert (out / "checkpoint.pt").is_file()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "accumulate_gradients", crash)  # the new run dies at its first step
    with pytest.raises(KeyboardInterrupt):
        main([*flags, "--max-steps", "4", "--r", "2", "--overwrite"])
    assert not (out / "checkpoint.pt").exists() and not (out / "adapter.safetensors").exists()
    assert json.loads((out / "train_config.json").read_text())["r"] == 2
    assert "no checkpoint" in run_main(["--resume", "--output-dir", str(out)], capsys)


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(toy_data_dir),
            "--output-dir",
            str(tmp_path / "run"),
            "--batch-size",
            "16",
            "--max-length",
            "32",
            "--max-steps",
            "6",
            "--log-steps",
            "2",
            "--eval-steps",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    steps = [line for line in captured.out.splitlines() if line.startswith("step ") and "/6:" in line]
    assert [line.split(":")[0] for line in steps] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("ex/s, 0 skipped" in line for line in steps)


def test_targets_are_printed_and_a_module_in_both_lists_is_refused(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    base = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(toy_data_dir),
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--max-steps",
        "1",
    ]
    main([*base, "--output-dir", str(tmp_path / "dense"), "--target-modules", "dense"])
    assert "LoRA on 6 modules (dense); trained in full: classifier" in capsys.readouterr().out
    error = run_main(
        [*base, "--output-dir", str(tmp_path / "both"), "--target-modules", "dense", "--trainable-modules", "dense"],
        capsys,
    )
    assert "dense is both a LoRA target and a module trained in full" in error


def test_offline_the_default_run_fails_at_once_naming_both_offline_flags(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--r", "10", "--alpha", "64"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: the Hugging Face hub is unreachable")
    assert "--model roberta-base and --data ag_news are not cached" in result.stderr
    assert "--model minilm --data bundled" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/<timestamp> folder, nothing else
