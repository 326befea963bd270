"""The command-line programs: ``lora-train``, ``lora-predict``, ``lora-search``, ``lora-inspect``,
``lora-export``, ``lora-serve`` (also ``python train.py`` etc. at the top of the repository, and
``python -m lora.cli.train`` etc.). Each reads flags and makes one call into ``lora``.

This package is the only place that knows flags and exit codes: the library raises
``lora.config.InputError`` about values, and ``run_command`` prints it as one line naming the
flag (``SettingError``: ``lr must be > 0`` becomes ``--lr must be > 0``), exit code 2.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lora.adapter import CONFIG_NAME, WEIGHTS_NAME, write_atomically
from lora.config import InputError, SettingError
from lora.train.run_folder import RUNS_DIR

# The one setting with several flags: the flag of each autocast precision.
PRECISION_FLAGS = {"fp16": "--fp16", "bf16": "--bf16", "fp32": "--no-amp"}
# Settings whose flag is not ``--`` + the name with dashes.
OTHER_FLAGS = {"precision": "/".join(PRECISION_FLAGS.values()), "base_model": "--base"}


class UsageError(Exception):
    """Bad input on the command line itself (a flag combination, a missing argument): one line, exit 2."""


def flag_for(field_name: str) -> str:
    """The flag of a setting: ``grad_accum`` -> ``--grad-accum``, ``precision`` -> ``--fp16/--bf16/--no-amp``."""
    return OTHER_FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def one_line(error: Exception) -> str:
    """What the command line says of a library error: a ``SettingError`` names the flags."""
    return error.named(flag_for) if isinstance(error, SettingError) else str(error)


def run_command(main: Callable[[], None]) -> None:
    """Run a command-line ``main``: a ``UsageError`` or the library's ``InputError`` ->
    ``error: ...`` on stderr and exit 2; Ctrl-C -> exit 130 (whatever was saved stays saved);
    a closed standard output (``| head``) -> exit quietly. Under torchrun only rank 0 says it."""
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        main()
    except (UsageError, InputError) as error:
        if speaks:
            print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if speaks:
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)


def latest_run(runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """The most recently written folder under ``runs_dir`` that holds an adapter."""
    runs = [d for d in Path(runs_dir).glob("*") if (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file()]
    if not runs:
        raise UsageError(
            f"no run with an adapter under {runs_dir}/; train one with train.py or name one with --adapter"
        )
    return max(runs, key=lambda d: d.stat().st_mtime)


def save_predictions(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``table`` as CSV without the index, atomically: never half a file. Returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: table.to_csv(temporary, index=False))
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
    return path
