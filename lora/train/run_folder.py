"""A run folder's life: where it is, opening it (new, overwritten or resumed), the settings a
resumed run keeps, how far the run has come (``Progress``), and the checkpoint written into it
and read back.

    runs/<timestamp>/ or output_dir
        train_config.json      the settings (written once, when the run starts)
        checkpoint.pt          what the next step depends on, written atomically
        metrics.jsonl          every record so far, rewritten with each checkpoint
        adapter.safetensors    the best adapter so far, adapter_config.json (lora/adapter.py)
        summary.json, *.png, misclassified.csv    written at the end (lora/train/loop.py)

Two counters move through a run: ``window`` (how many windows of ``grad_accum`` micro-batches
were consumed: the position in the data) and ``step`` (how many optimizer updates were applied:
what the schedule, evaluation and ``max_steps`` count). They differ only by the steps the fp16
GradScaler skipped because the gradients overflowed: a skipped step is not a step.

The checkpoint holds what the next optimizer step depends on: the trainable tensors, the
optimizer, scheduler and GradScaler states, the state of every random generator, the progress
(the position in the data, the records so far). Loading it and going on gives the same result
as never having stopped (the tests compare the two bit for bit).
"""

import dataclasses
import json
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ..adapter import CONFIG_NAME as ADAPTER_CONFIG_NAME
from ..adapter import WEIGHTS_NAME, write_atomically
from ..config import InputError, SettingError
from ..model import load_lora_state_dict, lora_state_dict
from ..quantize import scheme_from_file
from . import distributed, report
from .config import HIGHER_IS_BETTER, TrainConfig
from .distributed import World

RUNS_DIR = Path("runs")
CONFIG_NAME = "train_config.json"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
# What a finished or interrupted run leaves that a new run must not be confused by (overwrite).
RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, METRICS_NAME, CHECKPOINT_NAME, WEIGHTS_NAME, ADAPTER_CONFIG_NAME)
# Settings a resumed run may be given again without changing the run.
RESUME_FIELDS = ("output_dir", "resume", "overwrite")


# ----------------------------------------------------------------------------- how far a run has come
def is_improvement(metric: str, value: float, best: float | None) -> bool:
    """True when ``value`` beats ``best`` for ``metric`` (lower is better only for loss)."""
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best


@dataclass
class Progress:
    window: int = 0
    step: int = 0
    skipped_steps: int = 0
    skips_in_a_row: int = 0
    stopped_early: bool = False
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    records: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_examples: int = 0

    def consumed_window(self, examples: int, seconds: float) -> None:
        """One window of micro-batches went forward and backward, applied or not."""
        self.window += 1
        self.train_examples += examples
        self.train_seconds += seconds

    def skipped(self, loss: float, scale: float) -> None:
        """The update of the last window was not applied (non-finite gradients)."""
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        self.records.append({"kind": "skip", "step": self.step, "window": self.window, "loss": loss, "scale": scale})

    def stepped(self) -> None:
        """The update of the last window was applied."""
        self.step += 1
        self.skips_in_a_row = 0

    def log_train(self, epoch: int, loss: float, lr: float) -> None:
        self.records.append(
            {
                "kind": "train",
                "step": self.step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "examples_per_s": self.throughput,
                "skipped_steps": self.skipped_steps,
            }
        )

    def evaluated(self, metrics: dict, metric: str, patience: int) -> bool:
        """Record an evaluation; True when ``metrics[metric]`` is the best so far. After
        ``patience`` evaluations in a row without improvement the run stops early."""
        self.records.append({"kind": "eval", "step": self.step, **metrics})
        improved = is_improvement(metric, metrics[metric], self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = metrics[metric], self.step, 0
        else:
            self.bad_evals += 1
        self.stopped_early = self.bad_evals >= patience
        return improved

    @property
    def throughput(self) -> float:
        """Training examples per second (all ranks' examples, forward + backward + step)."""
        return self.train_examples / max(self.train_seconds, 1e-9)

    def best_evaluation(self) -> dict:
        """The metrics of the best evaluation."""
        best = next(r for r in self.records if r["kind"] == "eval" and r["step"] == self.best_step)
        return {k: v for k, v in best.items() if k not in ("kind", "step")}

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the folder


@dataclass
class Run:
    """An opened run folder: where, with which settings, and the checkpoint to resume (or None)."""

    directory: Path
    config: TrainConfig
    checkpoint: dict | None


def open_run(config: TrainConfig, explicit: set[str] | None = None) -> Run:
    """Resolve the run folder and the settings (the saved ones when resuming); nothing is
    written. ``explicit``: the settings given on the command line (``lora.cli.train``), which a
    resumed run must not change; None (a call from Python): those that differ from the defaults.
    ``resume="auto"`` resumes when the folder holds a checkpoint and starts afresh there when it
    does not (what a restarted ``torchrun --max-restarts`` group needs: the same command either way).
    """
    if config.resume == "auto":
        found = has_checkpoint(Path(config.output_dir))
        config = dataclasses.replace(config, resume=found, overwrite=not found)
    directory = resolve_output_dir(config)
    if not config.resume:
        return Run(directory, config, None)
    return Run(directory, resumed_config(config, directory, explicit), load_checkpoint(directory))


def resolve_output_dir(config: TrainConfig) -> Path:
    """The run folder, checked but not created. A non-empty one needs ``resume`` or
    ``overwrite``; ``resume`` without ``output_dir`` takes the newest run with a checkpoint."""
    if config.resume and config.output_dir is None:
        candidates = sorted((d for d in RUNS_DIR.glob("*") if has_checkpoint(d)), key=lambda d: d.stat().st_mtime)
        if not candidates:
            raise SettingError(
                "{resume}: no run with a checkpoint under runs/; name one with {output_dir}", "resume", "output_dir"
            )
        return candidates[-1]
    directory = Path(config.output_dir or RUNS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if config.resume:
        if not has_checkpoint(directory) or not (directory / CONFIG_NAME).is_file():
            raise SettingError(f"{{resume}}: {directory} has no checkpoint to resume from", "resume")
        return directory
    if directory.exists() and not directory.is_dir():
        raise SettingError(f"{{output_dir}} {directory} is a file", "output_dir")
    if directory.is_dir() and any(directory.iterdir()) and not config.overwrite:
        raise SettingError(
            f"output directory {directory} is not empty; "
            "pass {resume} to continue it or {overwrite} to write over it",
            "resume",
            "overwrite",
        )
    return directory


def saved_config(directory: Path) -> TrainConfig:
    """The settings in ``directory/train_config.json`` (lists back to tuples; an old run's
    ``"quantize_base": "none"`` to None)."""
    try:
        saved = json.loads((directory / CONFIG_NAME).read_text())
        saved = {key: tuple(value) if isinstance(value, list) else value for key, value in saved.items()}
        return TrainConfig(**{**saved, "quantize_base": scheme_from_file(saved.get("quantize_base"))})
    except (json.JSONDecodeError, TypeError) as error:
        raise InputError(f"{directory / CONFIG_NAME} is not a train.py config: {error}") from None


def resumed_config(config: TrainConfig, directory: Path, explicit: set[str] | None = None) -> TrainConfig:
    """The saved settings of the run in ``directory``. A setting given when resuming must
    not change them (it would make the continued run a different one), even when given at its
    default value."""
    resumed = dataclasses.replace(saved_config(directory), resume=True, output_dir=str(directory), overwrite=False)
    if explicit is None:
        defaults = TrainConfig()
        explicit = {
            f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)
        }
    changed = sorted(name for name in explicit - set(RESUME_FIELDS) if getattr(config, name) != getattr(resumed, name))
    if changed:
        raise SettingError(
            f"{{resume}} continues {directory} with its saved settings; "
            f"{', '.join('{' + name + '}' for name in changed)} would change them "
            "(start a new run instead)",
            "resume",
            *changed,
        )
    return resumed


def create(directory: Path, config: TrainConfig) -> None:
    """Create the run folder (after every setting was checked) and write ``train_config.json``.
    ``overwrite`` first removes what an earlier run left, its checkpoint above all."""
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
        raise InputError(
            f"{run.directory} was trained by {run.checkpoint['world_size']} process(es) and the "
            f"position in the data depends on it: resume with torchrun --nproc_per_node "
            f"{run.checkpoint['world_size']}"
        )
    if run.checkpoint["device"] != world.device.type:
        print(
            f"note: this run was started on {run.checkpoint['device']} and continues on {world.device.type}: "
            "the result will not be bit-identical to an uninterrupted run"
        )


def save_training_state(directory: Path, model, optimisation, progress: Progress, world: World) -> None:
    """Write the checkpoint (every rank's random generators gathered on rank 0) and the records."""
    rng = distributed.gather(rng_states(), world)  # in rank order
    if not world.is_main:
        return
    save_checkpoint(
        directory,
        {
            "adapter": {k: v.cpu() for k, v in lora_state_dict(model).items()},
            "optimizer": optimisation.optimizer.state_dict(),
            "scheduler": optimisation.scheduler.state_dict(),
            "scaler": optimisation.scaler.state_dict(),
            "progress": progress.state_dict(),
            "rng": rng,
            "precision": optimisation.precision,
            "device": world.device.type,
            "world_size": world.size,
        },
    )
    report.write_jsonl(directory / METRICS_NAME, progress.records)


def restore_training_state(saved: dict, model, optimisation, world: World) -> Progress:
    """Put the adapter, AdamW, the schedule, the loss scale and the generators back where the
    checkpoint ``saved`` found them; returns the progress to continue from."""
    load_lora_state_dict(model, {k: v.to(world.device) for k, v in saved["adapter"].items()})
    optimisation.optimizer.load_state_dict(saved["optimizer"])
    optimisation.scheduler.load_state_dict(saved["scheduler"])
    optimisation.scaler.load_state_dict(saved["scaler"])
    restore_rng_states(saved["rng"][world.rank])  # last: building the model drew from them
    return Progress(**saved["progress"])


def write_summary(directory: Path, summary: dict, progress: Progress) -> None:
    """``summary.json`` and the final ``metrics.jsonl``."""
    (directory / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    report.write_jsonl(directory / METRICS_NAME, progress.records)


# ----------------------------------------------------------------------------- the checkpoint
def rng_states() -> dict:
    """The state of every generator a run may draw from: torch (CPU and each GPU: dropout),
    Python's ``random`` and NumPy's global generator."""
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [
            torch.from_numpy(numpy_keys.astype(np.int64)),
            int(numpy_position),
            int(numpy_has_gauss),
            float(numpy_gauss),
        ],
    }


def restore_rng_states(states: dict) -> None:
    """Put every generator back where ``rng_states`` found it. Call it last, after building the
    model: initialising a model draws from the generators."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    python_version, python_state, python_gauss = states["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = states["numpy"]
    np.random.set_state(("MT19937", numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss, numpy_gauss))


def save_checkpoint(directory: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    write_atomically(directory / CHECKPOINT_NAME, lambda path: torch.save(state, path))


def load_checkpoint(directory: Path) -> dict:
    """Read the checkpoint (tensors and plain data only: ``weights_only``). The generators are
    not touched here: see ``restore_rng_states``."""
    return torch.load(directory / CHECKPOINT_NAME, map_location="cpu", weights_only=True)


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_NAME).is_file()
