"""The training job: data -> LoRA model -> loop with evaluation, early stopping and
checkpoints -> best adapter -> one test evaluation -> report.

The loop is written by hand (no Trainer) so it can be read top to bottom, nanoGPT style:
autocast, loss / examples-in-window, GradScaler, unscale before clipping, step, zero_grad.
``_train`` is the whole job in order; each step it takes is a named function below or beside it:
the run folder, its progress and checkpoints (``run_folder.py``), evaluation (``evaluation.py``),
precision, checkpointing and compiling (``execution.py``), several processes and stopping on a
signal (``distributed.py``), plots and TensorBoard (``report.py``).
"""

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..adapter import load_adapter, provenance, save_adapter
from ..classifier import load_classifier_model, load_tokenizer, pick_device, require_hub_or_cache
from ..config import InputError, SettingError
from ..data import Splits, length_grouped_batches, load_splits, pad_batch, tokenize
from ..model import (
    count_parameters,
    head_parameters,
    inject_lora,
    load_lora_state_dict,
    parameter_table,
    quantize_base,
)
from ..quantize import describe_quantized
from ..variants import lora_plus_groups
from . import distributed, report, run_folder
from .config import TrainConfig
from .distributed import World, graceful_stop
from .evaluation import evaluate
from .execution import autocast_context, pick_precision, training_module
from .report import open_writer
from .run_folder import Progress, Run, restore_training_state, save_training_state

# fp16: this many skipped steps in a row means the loss itself is not finite: stop the run.
MAX_CONSECUTIVE_SKIPS = 20


class TrainingStopped(SettingError):
    """The loss or the gradients stopped being finite; the last checkpoint stays resumable."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run at a step boundary; ``directory`` holds its checkpoint."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.directory = directory


# ---------------------------------------------------------------- what a run trains, and with what


@dataclass
class Job:
    """What a run trains on: the splits, their token ids (tokenised once) and labels, the
    tokenizer, and the LoRA model on its device (``wrapped``: the names of its LoRA layers)."""

    splits: Splits
    tokenizer: object
    train_ids: list[list[int]]
    val_ids: list[list[int]]
    model: torch.nn.Module
    wrapped: list[str]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def train_labels(self) -> list[int]:
        return self.splits.train["label"].tolist()

    @property
    def val_labels(self) -> list[int]:
        return self.splits.val["label"].tolist()

    def micro_batch(self, indices: list[int], labels: list[int], world: World) -> dict:
        """This rank's share of one global batch of training rows, padded, on the model's device;
        a zero-weight stand-in when it has none (a short last batch split over the ranks)."""
        mine = distributed.shard(indices, world)
        rows = mine or indices[:1]
        batch = pad_batch([self.train_ids[i] for i in rows], self.pad_id, [labels[i] for i in rows])
        device = next(self.model.parameters()).device
        return {**{k: v.to(device) for k, v in batch.items()}, "loss_weight": 1.0 if mine else 0.0}


@dataclass
class Optimisation:
    """AdamW, its schedule, the fp16 loss scaler, autocast, and the shape of the run in steps."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: object
    precision: str
    global_batch: int  # examples per micro-batch on all ranks together
    steps_per_epoch: int
    total_steps: int


def load_job(config: TrainConfig, device: torch.device) -> Job:
    """Data (tokenised once), tokenizer and the LoRA model; every failure here is an InputError,
    raised before the run folder exists."""
    require_hub_or_cache(config.model, config.data)
    splits = load_splits(config.data, config.val_size, config.seed, config.clean)
    tokenizer = load_tokenizer(config.model)
    train_ids = tokenize(splits.train["text"], tokenizer, config.max_length)
    val_ids = tokenize(splits.val["text"], tokenizer, config.max_length)

    # Model: pretrained encoder + fresh head, LoRA on the target modules, the rest frozen.
    torch.manual_seed(config.seed)
    model = load_classifier_model(config.model, splits.labels)
    try:
        wrapped = inject_lora(model, config.lora_config())
        if config.quantize_base is not None:
            quantize_base(model, config.quantize_base, config.double_quant)
    except SettingError:
        raise  # names its settings: the command line names their flags
    except ValueError as error:
        raise SettingError(str(error)) from None
    return Job(splits, tokenizer, train_ids, val_ids, model.to(device), wrapped)


def adamw(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; biases and LayerNorm weights get no weight decay;
    with ``lora_plus_ratio`` every ``lora_B`` learns at ``lr * ratio`` (LoRA+)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            skip = parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
            (no_decay if skip else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.lora_plus_ratio is not None:
        groups = lora_plus_groups(model, groups, config.lr, config.lora_plus_ratio)
    return torch.optim.AdamW(groups, lr=config.lr)


def linear_warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate from 0 up to its peak over ``warmup_steps``, then linearly down to 0 at
    ``total_steps`` (transformers' ``get_linear_schedule_with_warmup``, the same numbers;
    importing that one imports peft, and with it bitsandbytes when installed)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimisation(model, config: TrainConfig, precision: str, world: World, train_rows: int) -> Optimisation:
    """AdamW, linear warm-up then linear decay over the run's steps, GradScaler for fp16."""
    global_batch = config.batch_size * world.size
    steps_per_epoch = math.ceil(math.ceil(train_rows / global_batch) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = adamw(model, config)
    scheduler = linear_warmup_schedule(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    return Optimisation(
        optimizer,
        scheduler,
        torch.amp.GradScaler(world.device.type, enabled=precision == "fp16"),
        autocast_context(precision, world.device),
        precision,
        global_batch,
        steps_per_epoch,
        total_steps,
    )


# ---------------------------------------------------------------- one step, one evaluation


def accumulate_gradients(
    model, micro_batches: list[dict], autocast, scaler, window_examples: int | None = None, ranks: int = 1
) -> float:
    """Forward and backward over the micro-batches of one optimizer step.

    Each micro-batch's summed cross-entropy is divided by the number of examples in the whole
    window (on all ranks: ``window_examples``; default: these micro-batches), so the accumulated
    gradient is the gradient of the window's mean loss, whatever the split (4 x 8 == 1 x 32 ==
    2 ranks x 2 x 8) and however short a last window is. DDP averages the ``ranks`` gradients,
    hence the factor ``ranks``. Returns this rank's share of the window's mean loss.

    A micro-batch with ``loss_weight`` 0 is a stand-in for a rank whose share of a short last
    batch is empty: it takes part in DDP's all-reduce and adds nothing.
    """
    window_examples = window_examples or sum(len(batch["labels"]) for batch in micro_batches)
    total = 0.0
    for index, batch in enumerate(micro_batches):
        with distributed.no_sync(model, last_micro_batch=index == len(micro_batches) - 1):
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # The loss in float32 whatever autocast did to the logits.
            loss = (
                F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                * batch.get("loss_weight", 1.0)
                / window_examples
            )
            scaler.scale(loss * ranks).backward()
        total += loss.item()
    return total


def optimizer_step(optimizer, scaler, max_grad_norm: float) -> bool:
    """Unscale, clip, step, update the loss scale. Returns False when the step was skipped.

    With fp16 the gradients were computed on ``loss * scale``: ``unscale_`` divides them back
    before clipping (clipping scaled gradients would clip nothing or everything), and the
    scaler skips the step when they hold inf or NaN, halves the scale, and doubles it again
    after ``growth_interval`` good steps. Without a scaler (fp32, bf16) a non-finite gradient
    norm skips the step too: nothing non-finite ever reaches the weights.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    if not scaler.is_enabled():
        if not torch.isfinite(norm):
            return False
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skipped by the scaler when the gradients overflowed
    scaler.update()
    return scaler.get_scale() >= scale  # the scale only ever shrinks after a skipped step


def evaluate_and_keep_best(run: Run, job: Job, optimisation: Optimisation, progress: Progress, world: World) -> None:
    """Validation metrics; save the adapter when they improve; stop when patience runs out."""
    config = run.config
    metrics, _ = evaluate(
        job.model, job.val_ids, job.val_labels, 2 * config.batch_size, job.pad_id, optimisation.autocast, world
    )
    improved = progress.evaluated(metrics, config.metric, config.patience)
    if improved and world.is_main:
        save_adapter(run.directory, job.model, **adapter_fields(config, job.splits.labels))
    tqdm.write(
        f"step {progress.step}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + (" (best)" if improved else f" ({progress.bad_evals}/{config.patience} without improvement)")
    )


def check_every_trainable_gets_a_gradient(model, batch: dict) -> None:
    """One forward and backward (random generators untouched) before training: a trainable
    parameter that gets no gradient (``trainable_modules=("pooler",)`` on a model that never uses
    its pooler) is a one-line error here, not a DistributedDataParallel traceback later."""
    with torch.random.fork_rng(devices=[]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise SettingError(
            f"{shown} would train but the model's output does not depend on it; drop it from {{trainable_modules}}",
            "trainable_modules",
        )


# ---------------------------------------------------------------- the job


def train(
    config: TrainConfig, on_evaluation: Callable[[int, dict], None] | None = None, explicit: set[str] | None = None
) -> dict:
    """Run the whole job; returns the summary that is also written to ``summary.json``.

    ``on_evaluation(step, metrics)`` is called after each validation evaluation (and its
    checkpoint); an exception it raises (``optuna.TrialPruned``) ends the run and propagates.
    ``explicit``: the settings the user gave (the command line's; see ``run_folder.open_run``).

    Under ``torchrun`` every process runs this with the same config: one model trained with
    data parallelism (see ``lora/distributed.py``); rank 0 prints and writes the files.
    """
    config.check()
    world = distributed.start(pick_device(config.device))
    try:
        with distributed.quiet_unless_main(world):
            return _train(config, world, on_evaluation, explicit)
    except (KeyboardInterrupt, InputError) as stopped:  # a stop every rank takes at the same step
        # Drop _train's frames, and with them the DDP model that holds the process group, before
        # the group is destroyed: a DDP model outliving destroy_process_group() in a traceback
        # freed later left one rank hanging in gloo's teardown while the other went on.
        stopped.__traceback__ = None
        raise
    finally:
        distributed.stop(world)


def _train(config: TrainConfig, world: World, on_evaluation=None, explicit=None) -> dict:
    # Set-up: the run folder, the data and model, the optimiser; nothing is written before all is known good.
    run = distributed.from_main(world, lambda: run_folder.open_run(config, explicit))
    config = run.config
    run_folder.check_resumable(run, world)
    precision = run.checkpoint["precision"] if run.checkpoint else pick_precision(config.precision, world.device)
    job = load_job(config, world.device)
    check_every_trainable_gets_a_gradient(
        job.model, {k: v.to(world.device) for k, v in pad_batch(job.train_ids[:2], job.pad_id).items()}
    )
    if world.is_main and not config.resume:
        run_folder.create(run.directory, config)
    distributed.barrier(world)
    if world.distributed:
        torch.manual_seed(config.seed + world.rank)  # each rank its own dropout masks
    optimisation = make_optimisation(job.model, config, precision, world, len(job.train_ids))
    describe_run(run, job, optimisation, world)
    progress = Progress()
    if run.checkpoint:
        progress = restore_training_state(run.checkpoint, job.model, optimisation, world)
        print(f"resuming at step {progress.step} of {optimisation.total_steps}")
    trained_model = training_module(job.model, config.gradient_checkpointing, config.compile, world)

    # The loop: one iteration = one window of `grad_accum` micro-batches = one optimizer step,
    # unless the GradScaler skips it.
    trained_model.train()
    lengths, labels = [len(ids) for ids in job.train_ids], job.train_labels
    in_terminal = sys.stderr.isatty() and world.is_main  # a bar in a terminal; plain lines in a log
    bar = tqdm(
        total=optimisation.total_steps, initial=progress.step, desc="training", unit="step", disable=not in_terminal
    )
    epoch_batches = {}
    board = open_writer(config.report_to, run.directory, progress.records, run.checkpoint is not None, world.is_main)
    with graceful_stop() as stop, board:
        while progress.step < optimisation.total_steps and not progress.stopped_early:
            board.log_new()  # TensorBoard: the records of the last step (all that are left, on any exit)
            if distributed.any_rank(stop.requested, world):  # every rank stops at the same step
                save_training_state(run.directory, job.model, optimisation, progress, world)
                bar.close()
                print(f"\nstopped at step {progress.step}; checkpoint saved in {run.directory}")
                raise RunInterrupted(run.directory)
            epoch, window_in_epoch = divmod(progress.window, optimisation.steps_per_epoch)
            if epoch not in epoch_batches:  # the same order on resume and on every rank: seed + epoch only
                epoch_batches = {epoch: length_grouped_batches(lengths, optimisation.global_batch, config.seed + epoch)}
            window = epoch_batches[epoch][
                window_in_epoch * config.grad_accum : (window_in_epoch + 1) * config.grad_accum
            ]
            micro_batches = [job.micro_batch(indices, labels, world) for indices in window]
            window_examples = sum(len(indices) for indices in window)

            started = time.perf_counter()
            loss = distributed.total(
                accumulate_gradients(
                    trained_model,
                    micro_batches,
                    optimisation.autocast,
                    optimisation.scaler,
                    window_examples,
                    world.size,
                ),
                world,
            )
            stepped = optimizer_step(optimisation.optimizer, optimisation.scaler, config.max_grad_norm)
            optimisation.optimizer.zero_grad(set_to_none=True)
            progress.consumed_window(window_examples, time.perf_counter() - started)
            if not stepped:
                progress.skipped(loss, optimisation.scaler.get_scale())
                if progress.skips_in_a_row >= (MAX_CONSECUTIVE_SKIPS if optimisation.scaler.is_enabled() else 1):
                    save_training_state(run.directory, job.model, optimisation, progress, world)
                    bar.close()
                    raise not_finite(progress, loss, run.directory)
                continue
            optimisation.scheduler.step()  # only after an applied step: a skipped step does not move the schedule
            progress.stepped()
            log_step(progress, optimisation, config, bar, epoch, loss)
            if progress.step % config.eval_steps == 0 or progress.step == optimisation.total_steps:
                evaluate_and_keep_best(run, job, optimisation, progress, world)
                save_training_state(run.directory, job.model, optimisation, progress, world)
                if on_evaluation is not None:
                    on_evaluation(progress.step, progress.records[-1])
    bar.close()
    if progress.stopped_early:
        print(f"early stop at step {progress.step}: no {config.metric} improvement in {config.patience} evaluations")
    return finish(run, job, optimisation, progress, world)


def not_finite(progress: Progress, loss: float, directory: Path) -> TrainingStopped:
    """Why the run stops when the gradients stay non-finite, and what to change."""
    return TrainingStopped(
        f"the loss or gradients were not finite in {progress.skips_in_a_row} window(s) in a row "
        f"at step {progress.step} (loss {loss}); stopped without applying them: lower {{lr}} or "
        f"{{max_grad_norm}}, or train in bf16 ({{precision}}); the best adapter so far and a "
        f"checkpoint are in {directory}",
        "lr",
        "max_grad_norm",
        "precision",
    )


def log_step(progress: Progress, optimisation: Optimisation, config: TrainConfig, bar, epoch: int, loss: float) -> None:
    """The progress bar after every step; a record (and a plain line outside a terminal) every
    ``--log-steps`` steps."""
    lr = optimisation.scheduler.get_last_lr()[0]
    bar.update()
    bar.set_postfix(
        loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_per_s=f"{progress.throughput:.1f}", skipped=progress.skipped_steps
    )
    if progress.step % config.log_steps == 0:
        progress.log_train(epoch, loss, lr)
        if bar.disable:
            print(
                f"step {progress.step}/{optimisation.total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                f"{progress.throughput:.1f} ex/s, {progress.skipped_steps} skipped",
                flush=True,
            )


def describe_run(run: Run, job: Job, optimisation: Optimisation, world: World) -> None:
    """What runs where: folder, device, data, LoRA layers, the parameter table, the batch."""
    config = run.config
    print(f"run: {run.directory}  device: {world.device}  precision: {optimisation.precision}")
    print(f"data: {len(job.train_ids)} train, {len(job.val_ids)} validation, {len(job.splits.test)} test rows")
    print(
        f"LoRA on {len(job.wrapped)} modules ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in job.wrapped}))}); "
        f"trained in full: {', '.join(job.model.lora.trainable_modules) or 'nothing'}; head: {config.head}"
    )
    if config.quantize_base is not None:
        print(describe_quantized(job.model))
    trainable, total = count_parameters(job.model)
    print(parameter_table(job.model))
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    print(
        f"effective batch: {config.batch_size} (batch size) x {config.grad_accum} (gradient accumulation) x "
        f"{world.size} process(es) = {optimisation.global_batch * config.grad_accum} examples per optimizer step"
    )


def adapter_fields(config: TrainConfig, labels: list[str]) -> dict:
    """What ``adapter_config.json`` records beside the LoRA settings (``AdapterConfig``'s other
    fields): how to rebuild the base model and its inputs (``predict.py`` reads them)."""
    return {
        "base_model": _portable_model_name(config.model),
        "labels": labels,
        "max_length": config.max_length,
        "clean": config.clean,
        "provenance": provenance(),
        "quantize_base": config.quantize_base,
        "double_quant": config.double_quant,
    }


def _portable_model_name(name: str) -> str:
    """Hub ids and aliases as they are; local folders as absolute paths (predict runs anywhere)."""
    return str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name


def finish(run: Run, job: Job, optimisation: Optimisation, progress: Progress, world: World) -> dict:
    """Restore the best adapter, evaluate it once on test, write summary, plots, misclassified."""
    config, device = run.config, world.device
    adapter_state = distributed.from_main(world, lambda: load_adapter(run.directory)[0])
    load_lora_state_dict(job.model, {k: v.to(device) for k, v in adapter_state.items()})
    test_metrics, test_labels = None, []
    if config.evaluate_test:
        test_ids = tokenize(job.splits.test["text"], job.tokenizer, config.max_length)
        test_labels = job.splits.test["label"].tolist()
        test_metrics, probabilities = evaluate(
            job.model, test_ids, test_labels, 2 * config.batch_size, job.pad_id, optimisation.autocast, world
        )
    trainable, total = count_parameters(job.model)
    summary = {
        "best_step": progress.best_step,
        "steps": progress.step,
        "skipped_steps": progress.skipped_steps,
        "stopped_early": progress.stopped_early,
        "metric": config.metric,
        "val": progress.best_evaluation(),
        "test": test_metrics,
        "trainable_parameters": trainable,
        "head_parameters": head_parameters(job.model),
        "total_parameters": total,
        "train_seconds": round(progress.train_seconds, 2),
        "examples_per_second": round(progress.throughput, 2),
        "train_examples_seen": progress.train_examples,
        "test_rows": len(test_labels),
        "device": str(device),
        "processes": world.size,
        "precision": optimisation.precision,
        "config": dataclasses.asdict(config),
        "provenance": provenance(),
    }
    if not world.is_main:
        return summary
    run_folder.write_summary(run.directory, summary, progress)
    report.plot_history(progress.records, run.directory)
    if not config.evaluate_test:
        return summary
    probabilities = probabilities.numpy()
    report.plot_test_errors(test_labels, probabilities.argmax(axis=1), job.splits.labels, run.directory)
    report.misclassified_table(job.splits.test["text"].tolist(), test_labels, probabilities, job.splits.labels).to_csv(
        run.directory / "misclassified.csv", index=False
    )
    skipped = f", {progress.skipped_steps} skipped steps" if progress.skipped_steps else ""
    print(
        f"test: accuracy {test_metrics['accuracy']:.4f}, macro F1 {test_metrics['f1_macro']:.4f} "
        f"({len(test_labels)} rows; best step {progress.best_step}{skipped}); results in {run.directory}"
    )
    return summary
