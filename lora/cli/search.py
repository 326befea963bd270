"""Hyper-parameter search with Optuna over the LoRA training job.

    python search.py --trials 20 -- --model minilm --data bundled --clean --max-steps 40

Other flags (after ``--`` if you like) are train.py's and fix everything the search does not vary. Each trial is
one ``train()`` run in ``<search-dir>/trial-<n>``; trials are ranked on the validation metric
(never on test). The study lives in ``<search-dir>/study.db``: run the same command again to
add trials to it. At the end the best settings and the train.py command that reproduces them
are printed and written to ``<search-dir>/best.json``.
"""
import argparse
import dataclasses
import json
from datetime import datetime
from pathlib import Path

import optuna

from lora.errors import UsageError, run_command
from lora.report import HIGHER_IS_BETTER
from lora.runtime import RUNS_DIR
from lora.training import TrainConfig, train
from lora.cli.train import parse_args as parse_train_args

RANKS = [4, 8, 10, 16]
ALPHAS = [8.0, 16.0, 32.0, 64.0]


def suggest(trial: optuna.Trial, base: TrainConfig, directory: Path) -> TrainConfig:
    """The trial's settings: learning rate (log scale), rank, alpha and LoRA dropout."""
    return dataclasses.replace(
        base, lr=trial.suggest_float("lr", 1e-5, 3e-3, log=True),
        r=trial.suggest_categorical("r", RANKS), alpha=trial.suggest_categorical("alpha", ALPHAS),
        dropout=trial.suggest_float("dropout", 0.0, 0.3),
        output_dir=str(directory / f"trial-{trial.number}"), resume=False, overwrite=False)


def command_line(config: TrainConfig) -> str:
    """The train.py command that runs ``config`` (flags that differ from the defaults)."""
    defaults, flags = TrainConfig(), []
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        if field.name in ("output_dir", "resume", "overwrite") or value == getattr(defaults, field.name):
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name == "precision":
            flags.append({"fp16": "--fp16", "bf16": "--bf16", "fp32": "--no-amp"}[value])
        elif isinstance(value, bool):
            flags.append(flag)
        elif isinstance(value, tuple):
            flags.append(f"{flag} {' '.join(map(str, value))}")
        else:
            flags.append(f"{flag} {value}")
    return " ".join(["python train.py", *flags])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials to add to the study (default: %(default)s)")
    parser.add_argument("--search-dir", default=None, help="study folder (default: runs/search-<timestamp>)")
    args, train_flags = parser.parse_known_args(argv)
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {args.trials}")
    base = parse_train_args(train_flags[1:] if train_flags[:1] == ["--"] else train_flags)
    base.check()
    directory = Path(args.search_dir or RUNS_DIR / datetime.now().strftime("search-%Y%m%d-%H%M%S"))
    directory.mkdir(parents=True, exist_ok=True)

    study = optuna.create_study(
        study_name="lora", storage=f"sqlite:///{directory / 'study.db'}", load_if_exists=True,
        direction="maximize" if HIGHER_IS_BETTER[base.metric] else "minimize",
        sampler=optuna.samplers.TPESampler(seed=base.seed))
    study.optimize(lambda trial: train(suggest(trial, base, directory))["val"][base.metric],
                   n_trials=args.trials)

    best = suggest(optuna.trial.FixedTrial(study.best_params, study.best_trial.number), base, directory)
    result = {"metric": base.metric, "value": study.best_value, "trial": study.best_trial.number,
              "params": study.best_params, "command": command_line(best)}
    (directory / "best.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"best validation {base.metric} {study.best_value:.4f} (trial {study.best_trial.number}): "
          f"{study.best_params}\n{result['command']}")


def run() -> None:
    """The ``lora-search`` console command and ``python search.py``."""
    run_command(main)
