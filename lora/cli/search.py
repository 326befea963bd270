"""Search LoRA settings with Optuna under a budget of trainable parameters.

    python search.py --trials 20 --max-params 1000000 --search-dir runs/search -- \\
        --model minilm --data bundled --clean --max-steps 40 --eval-steps 10

Searched (lora/search_space.py): target modules, layers, whether the pooler trains, rank
(bounded by what the budget leaves), alpha / r, dropout, lr, weight decay, batch size and
accumulation. A train.py flag given on the command line fixes its setting; the other train.py
flags (after ``--`` if you like) apply to every trial.

Each trial is one train() run in ``<search-dir>/trial-<n>``, ranked on the validation metric
(test is never looked at). A configuration over ``--max-params`` is recorded as pruned with
its count and never trained; a trial clearly behind the others at an evaluation is pruned
(``--pruner``). ``--trials`` is the number of trained trials the study should reach: run the
same command again (after Ctrl-C, or on more machines against one ``--storage`` database) and
it goes on with the same study. At the end: ``trials.csv``, ``best.json`` (with the train.py
command), ``history.png``, ``importances.png``, ``accuracy_vs_parameters.png`` and a summary.
"""
import argparse
import dataclasses
import json
import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path

import optuna
import sqlalchemy.exc

from lora import search_report
from lora.backbone import require_hub_or_cache
from lora.cli.train import parse_args as parse_train_args
from lora.data import load_splits
from lora.errors import UsageError, run_command
from lora.config import HIGHER_IS_BETTER, TrainConfig
from lora.runtime import RUNS_DIR
from lora.search_space import OverBudget, ParameterCounter, build_space, suggest
from lora.training import train

# Pruners compare trials at the same evaluation step. median: behind the median of the
# completed trials (once 4 have completed); halving: outside the best third of the trials that
# reached the first evaluation, then the third after three times as many steps, and so on.
PRUNERS = {
    "median": lambda eval_steps: optuna.pruners.MedianPruner(n_startup_trials=4),
    "halving": lambda eval_steps: optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_steps,
                                                                         reduction_factor=3),
    "none": lambda eval_steps: optuna.pruners.NopPruner(),
}
# Settings of a run that are not part of what a study searches, so may differ between workers.
RUN_ONLY = ("output_dir", "resume", "overwrite", "device", "evaluate_test", "report_to")


def explicit_fields(train_argv: list[str]) -> set[str]:
    """The TrainConfig fields whose train.py flag is on the command line (unique prefixes too,
    as argparse allows): these settings are fixed, not searched."""
    flags = {"--" + f.name.replace("_", "-"): f.name for f in dataclasses.fields(TrainConfig)
             if f.name not in ("precision", "evaluate_test", "report_to")}
    flags.update({"--fp16": "precision", "--bf16": "precision", "--no-amp": "precision"})
    given = set()
    for token in train_argv:
        name = token.split("=", 1)[0]
        if name.startswith("--"):
            matches = [flags[name]] if name in flags else [f for flag, f in flags.items() if flag.startswith(name)]
            given.update(matches[:1] if len(matches) == 1 else ())
    return given


def command_line(config: TrainConfig) -> str:
    """The train.py command that runs ``config`` (flags that differ from the defaults)."""
    defaults, flags = TrainConfig(), []
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        if field.name in RUN_ONLY or value == getattr(defaults, field.name):
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


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL...). Heartbeats let any worker mark a
    trial whose process died (killed, machine lost) as failed instead of running forever."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=60, grace_period=180)
        except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as error:
            # Workers started together on a fresh database race to create its tables: the
            # losers see "already exists" or a duplicate key, and find the tables made next time.
            racing = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
            if not racing or attempt == 3:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise UsageError(f"--storage {url}: not a database Optuna can use ({reason})") from None
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
        raise UsageError(f"the storage holds a study {name!r} of a different search (it differs in "
                         f"{', '.join(differences)}); use another --study-name, --storage or --search-dir")
    return study


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20,
                        help="trained trials the study should reach, all workers together (default: %(default)s)")
    parser.add_argument("--max-params", type=int, default=None,
                        help="budget of trainable parameters, LoRA + trained modules (default: none)")
    parser.add_argument("--pruner", choices=list(PRUNERS), default="median",
                        help="stop trials that are behind at an evaluation (default: %(default)s)")
    parser.add_argument("--search-dir", default=None, help="folder of the trials and results "
                        "(default: runs/search-<timestamp>)")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL, e.g. postgresql+psycopg2://user:pw@host/db "
                        "(default: sqlite:///<search-dir>/study.db)")
    parser.add_argument("--study-name", default="lora", help="(default: %(default)s)")
    args, train_argv = parser.parse_known_args(argv)
    if args.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {args.trials}")
    if args.max_params is not None and args.max_params < 1:
        raise UsageError(f"--max-params must be at least 1, got {args.max_params}")
    train_argv = train_argv[1:] if train_argv[:1] == ["--"] else train_argv
    base = parse_train_args(train_argv)
    base.check()
    require_hub_or_cache(base.model, base.data)
    directory = Path(args.search_dir or RUNS_DIR / datetime.now().strftime("search-%Y%m%d-%H%M%S"))
    directory.mkdir(parents=True, exist_ok=True)
    storage = open_storage(args.storage or f"sqlite:///{(directory / 'study.db').resolve()}")

    # The space: the budget and the fixed flags decide what is left to search.
    labels = load_splits(base.data, base.val_size, base.seed, base.clean).labels
    fixed = explicit_fields(train_argv)
    space = build_space(base, fixed, ParameterCounter(base.model, labels), args.max_params)
    definition = {**{k: v for k, v in dataclasses.asdict(base).items() if k not in RUN_ONLY},
                  "fixed_flags": sorted(fixed), "max_params": args.max_params}
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial; no tracebacks
    study = open_study(storage, args.study_name, definition,
                       "maximize" if HIGHER_IS_BETTER[base.metric] else "minimize")
    # Seeded by the trials already there: a fresh study is reproducible, a resumed one draws anew.
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials),
                                               n_startup_trials=max(4, min(10, args.trials // 3)))
    study.pruner = PRUNERS[args.pruner](base.eval_steps)
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
        trial.set_user_attr("command", command_line(config))
        config = dataclasses.replace(config, output_dir=str(directory / f"trial-{trial.number}"),
                                     evaluate_test=False, resume=False, overwrite=False)
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
        print(search_report.trial_line(trial, base.metric))
        if search_report.count_trained(study) >= args.trials:
            study.stop()

    interrupted = False
    if search_report.count_trained(study) < args.trials:
        try:
            study.optimize(objective, callbacks=[after_trial])
        except KeyboardInterrupt:  # Optuna has marked the running trial failed
            interrupted = True
    print(search_report.write_results(study, directory, base.metric, args.max_params))
    if interrupted:
        print("run the same command again to continue the search")
        raise KeyboardInterrupt


def run() -> None:
    """The ``lora-search`` console command and ``python search.py``."""
    run_command(main)
