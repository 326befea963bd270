"""search.py: an Optuna study over train() on the tiny model."""
import json

from lora.cli.search import command_line, main
from lora.training import TrainConfig


def test_search_runs_trials_and_reports_a_reproducible_best(tiny_model_dir, toy_data_dir, tmp_path):
    search_dir = tmp_path / "search"
    flags = ["--model", str(tiny_model_dir), "--data", str(toy_data_dir), "--max-steps", "4",
             "--eval-steps", "2", "--batch-size", "16", "--max-length", "32"]
    main(["--trials", "1", "--search-dir", str(search_dir), "--", *flags])
    main(["--trials", "1", "--search-dir", str(search_dir), *flags])  # the same study grows
    best = json.loads((search_dir / "best.json").read_text())
    trials = [json.loads((search_dir / f"trial-{n}" / "summary.json").read_text()) for n in (0, 1)]
    assert best["value"] == max(t["val"]["accuracy"] for t in trials)
    chosen = trials[best["trial"]]["config"]
    assert {k: chosen[k] for k in ("lr", "r", "alpha", "dropout")} == best["params"]
    assert f"--lr {best['params']['lr']}" in best["command"] and "--max-steps 4" in best["command"]


def test_command_line_names_only_what_differs_from_the_defaults():
    config = TrainConfig(r=4, alpha=16.0, target_modules=("query", "key"), clean=True, precision="bf16",
                         output_dir="x")
    assert command_line(config) == ("python train.py --r 4 --alpha 16.0 --target-modules query key "
                                    "--bf16 --clean")
