"""Search LoRA settings with Optuna under a budget of trainable parameters.

    python search.py --trials 20 --max-params 1000000 --search-dir runs/search -- \\
        --model minilm --data bundled --clean --max-steps 40 --eval-steps 10

Searched (lora/search/space.py): target modules, layers, the head (full, lora, linear), rank
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
from datetime import datetime
from pathlib import Path

import optuna

from lora.classifier import require_hub_or_cache
from lora.cli import PRECISION_FLAGS, UsageError, flag_for, run_command
from lora.cli.train import explicit_fields
from lora.cli.train import parse_args as parse_train_args
from lora.data import load_splits
from lora.search import report
from lora.search.space import ParameterCounter, build_space
from lora.search.study import PRUNERS, RUN_ONLY, open_storage, open_study, optimize
from lora.train import TrainConfig
from lora.train.config import HIGHER_IS_BETTER
from lora.train.run_folder import RUNS_DIR


def command_line(config: TrainConfig) -> str:
    """The train.py command that runs ``config`` (flags that differ from the defaults)."""
    defaults, flags = TrainConfig(), []
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        if field.name in RUN_ONLY or value == getattr(defaults, field.name):
            continue
        flag = flag_for(field.name)
        if field.name == "precision":
            flags.append(PRECISION_FLAGS[value])
        elif isinstance(value, bool):
            flags.append(flag)
        elif isinstance(value, tuple):
            flags.append(f"{flag} {' '.join(map(str, value))}")
        else:
            flags.append(f"{flag} {value}")
    return " ".join(["python train.py", *flags])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trials",
        type=int,
        default=20,
        help="trained trials the study should reach, all workers together (default: %(default)s)",
    )
    parser.add_argument(
        "--max-params",
        type=int,
        default=None,
        help="budget of trainable parameters, LoRA + trained modules (default: none)",
    )
    parser.add_argument(
        "--pruner",
        choices=list(PRUNERS),
        default="median",
        help="stop trials that are behind at an evaluation (default: %(default)s)",
    )
    parser.add_argument(
        "--search-dir", default=None, help="folder of the trials and results (default: runs/search-<timestamp>)"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB URL, e.g. postgresql+psycopg2://user:pw@host/db (default: sqlite:///<search-dir>/study.db)",
    )
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
    fixed = explicit_fields(train_argv) - set(RUN_ONLY)  # settings of a run, not of the search
    space = build_space(base, fixed, ParameterCounter(base.model, labels), args.max_params)
    definition = {
        **{k: v for k, v in dataclasses.asdict(base).items() if k not in RUN_ONLY},
        "fixed_flags": sorted(fixed),
        "max_params": args.max_params,
    }
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial; no tracebacks
    study = open_study(
        storage, args.study_name, definition, "maximize" if HIGHER_IS_BETTER[base.metric] else "minimize"
    )
    # Seeded by the trials already there: a fresh study is reproducible, a resumed one draws anew.
    study.sampler = optuna.samplers.TPESampler(
        seed=base.seed + len(study.trials), n_startup_trials=max(4, min(10, args.trials // 3))
    )
    study.pruner = PRUNERS[args.pruner](base.eval_steps)
    interrupted = optimize(study, space, base, directory, args.trials, describe=command_line)
    print(report.write_results(study, directory, base.metric, args.max_params))
    if interrupted:
        print("run the same command again to continue the search")
        raise KeyboardInterrupt


def run() -> None:
    """The ``lora-search`` console command and ``python search.py``."""
    run_command(main)


if __name__ == "__main__":
    run()
