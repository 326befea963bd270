"""TensorBoard for a run (``train.py --report-to tensorboard``): the records the loop writes to
``metrics.jsonl`` also become scalars, in event files in the run folder.

Every number of a record is one scalar named ``<kind>/<field>`` at the record's optimizer step:
``train/loss``, ``train/lr``, ``train/examples_per_s``, ``train/skipped_steps``, ``train/epoch``;
``eval/loss``, ``eval/accuracy``, ``eval/f1_macro``... (every evaluation metric); ``skip/loss``,
``skip/scale`` for a step the fp16 GradScaler skipped. ``tensorboard --logdir runs`` shows one
run per run folder (for ``search.py``, one per trial).

TensorBoard is optional: ``torch.utils.tensorboard`` is imported only when asked for.
"""
import contextlib
import importlib
from pathlib import Path

from .errors import UsageError

REPORT_TO = ("tensorboard",)  # TrainConfig.report_to: None or one of these
EVENTS_GLOB = "events.out.tfevents.*"


def check_report_to(report_to: str | None) -> None:
    """Raise ``UsageError`` for an unknown ``report_to``, or ``tensorboard`` not installed."""
    if report_to is None:
        return
    if report_to not in REPORT_TO:
        raise UsageError(f"--report-to must be one of {list(REPORT_TO)}, got {report_to!r}")
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install -e \".[tensorboard]\")") from None


class TensorBoardWriter:
    """Scalars from metric records into event files in ``log_dir``, flushed after each record.

    It follows the run's ``records`` list (``Progress.records``, which only grows): ``log_new()``
    writes what was added since the last call; leaving the ``with`` block, however the run ends
    (finished, stopped, interrupted, pruned), writes the rest and closes the files."""

    def __init__(self, log_dir: str | Path, records: list[dict]):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.records, self.logged = records, len(records)  # a resumed run logged those before

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exception) -> None:
        self.log_new()
        self.close()

    def log_new(self) -> None:
        for record in self.records[self.logged:]:
            self.log(record)
        self.logged = len(self.records)

    def log(self, record: dict) -> None:
        """One record of the loop, e.g. ``{"kind": "train", "step": 10, "loss": 0.4, "lr": 3e-4}``."""
        for field, value in record.items():
            if field not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['kind']}/{field}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoWriter(contextlib.nullcontext):
    """What the loop logs to when nothing reports (no ``--report-to``, or not rank 0)."""

    def log_new(self) -> None:
        pass


def open_writer(report_to: str | None, run_dir: Path, records: list[dict], resume: bool, is_main: bool = True):
    """The writer for a run: a ``TensorBoardWriter`` on ``run_dir`` following ``records`` when
    ``report_to`` is ``"tensorboard"`` and this is the main process, else a ``NoWriter``. A run
    that does not resume first removes the event files an earlier run left there (``--overwrite``)."""
    if report_to != "tensorboard" or not is_main:
        return NoWriter()
    if not resume:
        for path in Path(run_dir).glob(EVENTS_GLOB):
            path.unlink()
    return TensorBoardWriter(run_dir, records)
