"""A run folder's life: where it is, opening it (new, overwritten or resumed), the settings a
resumed run keeps, and the checkpoint written into it and read back.

    runs/<timestamp>/ or --output-dir
        train_config.json      the settings (written once, when the run starts)
        checkpoint.pt          what the next step depends on (lora/checkpoint.py), atomically
        metrics.jsonl          every record so far, rewritten with each checkpoint
        adapter.safetensors    the best adapter so far, adapter_config.json (lora/adapter.py)
        summary.json, *.png, misclassified.csv    written at the end (lora/training.py)
"""
import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from . import checkpoint, distributed, report
from .adapter import CONFIG_NAME as ADAPTER_CONFIG_NAME
from .adapter import WEIGHTS_NAME
from .config import TrainConfig, flag_for
from .distributed import World
from .errors import UsageError
from .model import load_lora_state_dict, lora_state_dict
from .progress import Progress
from .quantize import scheme_from_file

RUNS_DIR = Path("runs")
CONFIG_NAME = "train_config.json"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
# What a finished or interrupted run leaves that a new run must not be confused by (--overwrite).
RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, METRICS_NAME, checkpoint.CHECKPOINT_NAME, WEIGHTS_NAME,
             ADAPTER_CONFIG_NAME)
# Settings --resume may be given again without changing the run.
RESUME_FLAGS = ("output_dir", "resume", "overwrite")


@dataclass
class Run:
    """An opened run folder: where, with which settings, and the checkpoint to resume (or None)."""
    directory: Path
    config: TrainConfig
    checkpoint: dict | None


def open_run(config: TrainConfig, explicit: set[str] | None = None) -> Run:
    """Resolve the run folder and the settings (the saved ones on ``--resume``); nothing is
    written. ``explicit``: the settings given on the command line (``lora.cli.train``), which
    ``--resume`` must not change; None (a call from Python): those that differ from the defaults.
    ``--resume auto`` resumes when the folder holds a checkpoint and starts afresh there when it
    does not (what a restarted ``torchrun --max-restarts`` group needs: the same command either way).
    """
    if config.resume == "auto":
        found = checkpoint.has_checkpoint(Path(config.output_dir))
        config = dataclasses.replace(config, resume=found, overwrite=not found)
    directory = resolve_output_dir(config)
    if not config.resume:
        return Run(directory, config, None)
    return Run(directory, resumed_config(config, directory, explicit), checkpoint.load_checkpoint(directory))


def resolve_output_dir(config: TrainConfig) -> Path:
    """The run folder, checked but not created. A non-empty one needs ``--resume`` or
    ``--overwrite``; ``--resume`` without ``--output-dir`` takes the newest run with a checkpoint."""
    if config.resume and config.output_dir is None:
        candidates = sorted((d for d in RUNS_DIR.glob("*") if checkpoint.has_checkpoint(d)),
                            key=lambda d: d.stat().st_mtime)
        if not candidates:
            raise UsageError("--resume: no run with a checkpoint under runs/; name one with --output-dir")
        return candidates[-1]
    directory = Path(config.output_dir or RUNS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if config.resume:
        if not checkpoint.has_checkpoint(directory) or not (directory / CONFIG_NAME).is_file():
            raise UsageError(f"--resume: {directory} has no checkpoint to resume from")
        return directory
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--output-dir {directory} is a file")
    if directory.is_dir() and any(directory.iterdir()) and not config.overwrite:
        raise UsageError(f"output directory {directory} is not empty; "
                         "pass --resume to continue it or --overwrite to write over it")
    return directory


def saved_config(directory: Path) -> TrainConfig:
    """The settings in ``directory/train_config.json`` (lists back to tuples; an old run's
    ``"quantize_base": "none"`` to None)."""
    try:
        saved = json.loads((directory / CONFIG_NAME).read_text())
        saved = {key: tuple(value) if isinstance(value, list) else value for key, value in saved.items()}
        return TrainConfig(**{**saved, "quantize_base": scheme_from_file(saved.get("quantize_base"))})
    except (json.JSONDecodeError, TypeError) as error:
        raise UsageError(f"{directory / CONFIG_NAME} is not a train.py config: {error}") from None


def resumed_config(config: TrainConfig, directory: Path, explicit: set[str] | None = None) -> TrainConfig:
    """The saved settings of the run in ``directory``. A setting given with ``--resume`` must
    not change them (it would make the continued run a different one), even when given at its
    default value."""
    resumed = dataclasses.replace(saved_config(directory), resume=True, output_dir=str(directory), overwrite=False)
    if explicit is None:
        defaults = TrainConfig()
        explicit = {f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}
    changed = sorted(name for name in explicit - set(RESUME_FLAGS)
                     if getattr(config, name) != getattr(resumed, name))
    if changed:
        raise UsageError(f"--resume continues {directory} with its saved settings; "
                         f"{', '.join(map(flag_for, changed))} would change them (start a new run instead)")
    return resumed


def create(directory: Path, config: TrainConfig) -> None:
    """Create the run folder (after every setting was checked) and write ``train_config.json``.
    ``--overwrite`` first removes what an earlier run left, its checkpoint above all."""
    directory.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        for name in RUN_FILES:
            (directory / name).unlink(missing_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def check_resumable(run: Run, world: World) -> None:
    """A checkpoint continues with the number of processes that wrote it (the position in the
    data depends on it); on another device it continues, but not bit for bit."""
    if run.checkpoint is None:
        return
    if run.checkpoint["world_size"] != world.size:
        raise UsageError(f"{run.directory} was trained by {run.checkpoint['world_size']} process(es) and the "
                         f"position in the data depends on it: resume with torchrun --nproc_per_node "
                         f"{run.checkpoint['world_size']}")
    if run.checkpoint["device"] != world.device.type:
        print(f"note: this run was started on {run.checkpoint['device']} and continues on {world.device.type}: "
              "the result will not be bit-identical to an uninterrupted run")


def save_training_state(directory: Path, model, optimisation, progress: Progress, world: World) -> None:
    """Write the checkpoint (every rank's random generators gathered on rank 0) and the records."""
    rng = distributed.gather(checkpoint.rng_states(), world)  # in rank order
    if not world.is_main:
        return
    checkpoint.save_checkpoint(directory, {
        "adapter": {k: v.cpu() for k, v in lora_state_dict(model).items()},
        "optimizer": optimisation.optimizer.state_dict(), "scheduler": optimisation.scheduler.state_dict(),
        "scaler": optimisation.scaler.state_dict(), "progress": progress.state_dict(), "rng": rng,
        "precision": optimisation.precision, "device": world.device.type, "world_size": world.size})
    report.write_jsonl(directory / METRICS_NAME, progress.records)


def restore_training_state(saved: dict, model, optimisation, world: World) -> Progress:
    """Put the adapter, AdamW, the schedule, the loss scale and the generators back where the
    checkpoint ``saved`` found them; returns the progress to continue from."""
    load_lora_state_dict(model, {k: v.to(world.device) for k, v in saved["adapter"].items()})
    optimisation.optimizer.load_state_dict(saved["optimizer"])
    optimisation.scheduler.load_state_dict(saved["scheduler"])
    optimisation.scaler.load_state_dict(saved["scaler"])
    checkpoint.restore_rng_states(saved["rng"][world.rank])  # last: building the model drew from them
    return Progress(**saved["progress"])


def write_summary(directory: Path, summary: dict, progress: Progress) -> None:
    """``summary.json`` and the final ``metrics.jsonl``."""
    (directory / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    report.write_jsonl(directory / METRICS_NAME, progress.records)

