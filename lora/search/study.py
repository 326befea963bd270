"""The Optuna study behind ``search.py``: its storage, the study itself, and the loop that trains
one trial after another (each an ordinary ``train()`` run in ``<search-dir>/trial-<n>``).

What is searched, and the exact trainable count of each configuration, is ``space.py``; the
tables and plots at the end are ``report.py``; ``lora/cli/search.py`` parses flags.
"""

import dataclasses
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy.exc

from ..config import SettingError
from ..train import TrainConfig, train
from . import report
from .space import OverBudget, SearchSpace, suggest

# Pruners compare trials at the same evaluation step. median: behind the median of the
# completed trials (once 4 have completed); halving: outside the best third of the trials that
# reached the first evaluation, then the third after three times as many steps, and so on.
PRUNERS = {
    "median": lambda eval_steps: optuna.pruners.MedianPruner(n_startup_trials=4),
    "halving": lambda eval_steps: optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_steps, reduction_factor=3),
    "none": lambda eval_steps: optuna.pruners.NopPruner(),
}
# Settings of a run that are not part of what a study searches, so may differ between workers.
RUN_ONLY = ("output_dir", "resume", "overwrite", "device", "evaluate_test", "report_to")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL...). Heartbeats let any worker mark a
    trial whose process died (killed, machine lost) as failed instead of running forever."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=180
                )
        except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as error:
            # Workers started together on a fresh database race to create its tables: the
            # losers see "already exists" or a duplicate key, and find the tables made next time.
            racing = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
            if not racing or attempt == 3:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise SettingError(f"{{storage}} {url}: not a database Optuna can use ({reason})", "storage") from None
            time.sleep(1 + attempt)


def open_study(storage, name: str, definition: dict, direction: str) -> optuna.Study:
    """Create the study or load it; one made for another search (model, data, fixed flags,
    budget...) is refused rather than mixed with this one."""
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    definition = json.loads(json.dumps(definition))  # tuples as lists, as stored
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", definition)
    elif stored != definition:
        differences = sorted(k for k in stored.keys() | definition.keys() if stored.get(k) != definition.get(k))
        raise SettingError(
            f"the storage holds a study {name!r} of a different search (it differs in "
            f"{', '.join(differences)}); use another {{study_name}}, {{storage}} or {{search_dir}}",
            "study_name",
            "storage",
            "search_dir",
        )
    return study


def optimize(
    study: optuna.Study,
    space: SearchSpace,
    base: TrainConfig,
    directory: Path,
    trials: int,
    describe: Callable[[TrainConfig], str] = str,
) -> bool:
    """Train trials until the study holds ``trials`` trained ones (every worker's count);
    a configuration over the budget is pruned untrained. ``describe(config)``: how a trial is
    recorded for people to rerun it (``lora.cli.search``: its train.py command). Returns True
    when Ctrl-C ended it (Optuna has then marked the running trial failed)."""
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        try:
            config, trainable = suggest(trial, space)
        except OverBudget as over:
            trial.set_user_attr("trainable_parameters", over.count)
            trial.set_user_attr("over_budget", True)
            raise optuna.TrialPruned(str(over)) from None
        trial.set_user_attr("trainable_parameters", trainable)
        trial.set_user_attr("command", describe(config))
        config = dataclasses.replace(
            config,
            output_dir=str(directory / f"trial-{trial.number}"),
            evaluate_test=False,
            resume=False,
            overwrite=False,
        )
        print(f"\n=== trial {trial.number}: {trainable:,} trainable parameters; {trial.params}")

        def report_evaluation(step: int, metrics: dict) -> None:
            trial.report(metrics[base.metric], step)
            trial.set_user_attr("steps", step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"behind the others at step {step}")

        summary = train(config, on_evaluation=report_evaluation)
        trial.set_user_attr("steps", summary["steps"])
        return summary["val"][base.metric]

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(report.trial_line(trial, base.metric))
        if report.count_trained(study) >= trials:
            study.stop()

    if report.count_trained(study) >= trials:
        return False
    try:
        study.optimize(objective, callbacks=[after_trial])
    except KeyboardInterrupt:
        return True
    return False
