"""train.py --report-to tensorboard: what metrics.jsonl holds, TensorBoard's own reader reads back
from the run folder; search.py gives one run per trial; without tensorboard only the flag fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora.cli import run_command
from lora.cli.search import main as search_main
from lora.cli.train import main as train_main
from lora.train.report import EVENTS_GLOB, TensorBoardWriter

REPO = Path(__file__).resolve().parent.parent
TRAIN_FLAGS = ["--max-length", "32", "--r", "4", "--batch-size", "16", "--grad-accum", "1", "--lr", "5e-3"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``run_dir``'s event files, as TensorBoard reads them: tag -> [(step, value)]."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.timeout(120)
def test_every_metric_record_reads_back_from_the_event_files(tiny_model_dir, toy_data_dir, tmp_path):
    run = tmp_path / "run"
    train_main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(toy_data_dir),
            "--output-dir",
            str(run),
            "--max-steps",
            "6",
            "--eval-steps",
            "3",
            "--log-steps",
            "2",
            "--report-to",
            "tensorboard",
            *TRAIN_FLAGS,
        ]
    )
    assert len(list(run.glob(EVENTS_GLOB))) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for record in records:
        for field, value in record.items():
            if field not in ("kind", "step"):
                expected.setdefault(f"{record['kind']}/{field}", []).append((record["step"], value))
    logged = scalars(run)
    assert (
        set(logged)
        == set(expected)
        >= {
            "train/loss",
            "train/lr",
            "train/examples_per_s",
            "train/skipped_steps",
            "train/epoch",
            "eval/loss",
            "eval/accuracy",
            "eval/precision_macro",
            "eval/recall_macro",
            "eval/f1_macro",
        }
    )
    assert [step for step, _ in logged["train/loss"]] == [2, 4, 6] and [s for s, _ in logged["eval/loss"]] == [3, 6]
    for tag, points in expected.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        # TensorBoard stores a scalar as float32: equal up to its rounding.
        assert [value for _, value in logged[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag

    # --overwrite starts the curves anew: the old event file goes with the old run.
    train_main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(toy_data_dir),
            "--output-dir",
            str(run),
            "--max-steps",
            "3",
            "--eval-steps",
            "3",
            "--report-to",
            "tensorboard",
            "--overwrite",
            *TRAIN_FLAGS,
        ]
    )
    assert len(list(run.glob(EVENTS_GLOB))) == 1 and [s for s, _ in scalars(run)["eval/loss"]] == [3]


def test_a_skipped_step_is_logged_with_its_loss_scale(tmp_path):
    records = []
    with TensorBoardWriter(tmp_path, records):
        records.append({"kind": "skip", "step": 7, "window": 9, "loss": float("inf"), "scale": 32768.0})
    assert scalars(tmp_path) == {
        "skip/window": [(7, 9.0)],
        "skip/loss": [(7, float("inf"))],
        "skip/scale": [(7, 32768.0)],
    }


@pytest.mark.timeout(120)
def test_search_logs_one_run_per_trial(tiny_model_dir, toy_data_dir, tmp_path):
    search_dir = tmp_path / "search"
    search_main(
        [
            "--trials",
            "2",
            "--search-dir",
            str(search_dir),
            "--pruner",
            "none",
            "--",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(toy_data_dir),
            "--max-steps",
            "2",
            "--eval-steps",
            "2",
            "--target-modules",
            "query",
            "--layers",
            "0",
            "--report-to",
            "tensorboard",
            *TRAIN_FLAGS,
        ]
    )
    for trial in ("trial-0", "trial-1"):
        assert [step for step, _ in scalars(search_dir / trial)["eval/accuracy"]] == [2], trial
    best = json.loads((search_dir / "best.json").read_text())
    assert "--report-to" not in best["command"]  # how a run is watched is not part of its settings


def test_without_tensorboard_only_the_flag_fails_in_one_line(tiny_model_dir, toy_data_dir, tmp_path):
    """A child process where ``import tensorboard`` fails: the package imports and trains'
    argument checks pass without the flag; with it, one line and exit 2 before anything loads."""
    child = f"""
import sys
sys.modules["tensorboard"] = None  # as if not installed: importing it raises ImportError
import lora, lora.train.loop, lora.classifier
from lora.cli.train import parse_args
parse_args(["--model", {str(tiny_model_dir)!r}]).check()
from lora.cli.train import run
sys.argv = ["train.py", "--model", {str(tiny_model_dir)!r}, "--data", {str(toy_data_dir)!r},
            "--output-dir", {str(tmp_path / "run")!r}, "--report-to", "tensorboard"]
run()
"""
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: --report-to tensorboard needs the tensorboard package: pip install tensorboard "
        '(or pip install -e ".[tensorboard]")\n'
    )
    assert not (tmp_path / "run").exists()


def test_an_unknown_report_to_is_refused(capsys):
    from lora.train import TrainConfig

    with pytest.raises(SystemExit) as caught:
        run_command(lambda: TrainConfig(report_to="wandb").check())
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: --report-to must be one of ['tensorboard'], got 'wandb'\n"
