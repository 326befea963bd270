"""The training job: data -> LoRA model -> loop with evaluation, early stopping and
checkpoints -> best adapter -> one test evaluation -> report.

The loop is written by hand (no Trainer) so it can be read top to bottom, nanoGPT style:
autocast, loss / examples-in-window, GradScaler, unscale before clipping, step, zero_grad.

Two counters move through a run: ``window`` (how many windows of ``grad_accum`` micro-batches
were consumed: the position in the data) and ``step`` (how many optimizer updates were applied:
what the schedule, evaluation and ``--max-steps`` count). They differ only by the steps the fp16
GradScaler skipped because the gradients overflowed: a skipped step is not a step.
"""
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import distributed, report
from .adapter import CONFIG_NAME as ADAPTER_CONFIG_NAME
from .adapter import WEIGHTS_NAME, load_adapter, save_adapter
from .backbone import load_classifier_model, load_tokenizer, require_hub_or_cache
from .checkpoint import (CHECKPOINT_NAME, has_checkpoint, load_checkpoint, restore_rng_states, rng_states,
                         save_checkpoint)
from .config import TrainConfig
from .data import length_grouped_batches, load_splits, pad_batch, tokenize
from .distributed import World
from .errors import UsageError
from .model import (count_parameters, inject_lora, load_lora_state_dict, lora_state_dict, parameter_table,
                    quantize_base)
from .quantize import describe_quantized
from .provenance import provenance
from .runtime import RUNS_DIR, autocast_context, batched_logits, deferred_interrupt, pick_device
from .tensorboard import open_writer
from .variants import lora_plus_groups

CONFIG_NAME = "train_config.json"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
# What a finished or interrupted run leaves that a new run must not be confused by (--overwrite).
RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, METRICS_NAME, CHECKPOINT_NAME, WEIGHTS_NAME, ADAPTER_CONFIG_NAME)
# fp16: this many skipped steps in a row means the loss itself is not finite: stop the run.
MAX_CONSECUTIVE_SKIPS = 20
# Settings --resume may be given again without changing the run.
RESUME_FLAGS = ("output_dir", "resume", "overwrite")


class TrainingStopped(UsageError):
    """The loss or the gradients stopped being finite; the last checkpoint stays resumable."""


# ---------------------------------------------------------------- set-up

def pick_precision(precision: str | None, device: torch.device) -> str:
    """The autocast precision: the one asked for, else fp16 on CUDA and fp32 on CPU.

    fp16 also runs on CPU (torch >= 2.3): slowly, but through exactly the autocast + GradScaler
    code that CUDA runs, which is how the tests exercise it.
    """
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        print("note: --fp16 on CPU is slow and meant for CUDA; it runs the same autocast + GradScaler path")
    return precision


def resolve_output_dir(config: TrainConfig) -> Path:
    """The run folder, checked but not created. A non-empty one needs ``--resume`` or
    ``--overwrite``; ``--resume`` without ``--output-dir`` takes the newest run with a checkpoint."""
    if config.resume and config.output_dir is None:
        candidates = sorted((d for d in RUNS_DIR.glob("*") if has_checkpoint(d)),
                            key=lambda d: d.stat().st_mtime)
        if not candidates:
            raise UsageError("--resume: no run with a checkpoint under runs/; name one with --output-dir")
        return candidates[-1]
    directory = Path(config.output_dir or RUNS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if config.resume:
        if not has_checkpoint(directory) or not (directory / CONFIG_NAME).is_file():
            raise UsageError(f"--resume: {directory} has no checkpoint to resume from")
        return directory
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--output-dir {directory} is a file")
    if directory.is_dir() and any(directory.iterdir()) and not config.overwrite:
        raise UsageError(f"output directory {directory} is not empty; "
                         "pass --resume to continue it or --overwrite to write over it")
    return directory


def resumed_config(config: TrainConfig, directory: Path) -> TrainConfig:
    """The saved settings of the run in ``directory``. Flags given with ``--resume`` must not
    change them (they would make the continued run a different one)."""
    try:
        saved = json.loads((directory / CONFIG_NAME).read_text())
        resumed = TrainConfig(**{**saved, "resume": True, "output_dir": str(directory), "overwrite": False})
    except (json.JSONDecodeError, TypeError) as error:
        raise UsageError(f"{directory / CONFIG_NAME} is not a train.py config: {error}") from None
    defaults = TrainConfig()
    changed = [field.name for field in dataclasses.fields(TrainConfig)
               if field.name not in RESUME_FLAGS
               and getattr(config, field.name) != getattr(defaults, field.name)
               and getattr(config, field.name) != getattr(resumed, field.name)]
    if changed:
        flags = ", ".join("--fp16/--bf16/--no-amp" if name == "precision" else f"--{name.replace('_', '-')}"
                          for name in changed)
        raise UsageError(f"--resume continues {directory} with its saved settings; {flags} would change "
                         "them (start a new run instead)")
    return resumed


def start_output_dir(directory: Path, config: TrainConfig) -> None:
    """Create the run folder (after every setting was checked) and write ``train_config.json``.
    ``--overwrite`` first removes what an earlier run left, its checkpoint above all."""
    directory.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        for name in RUN_FILES:
            (directory / name).unlink(missing_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; biases and LayerNorm weights get no weight decay;
    with ``lora_plus_ratio`` every ``lora_B`` learns at ``lr * ratio`` (LoRA+)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            skip = parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
            (no_decay if skip else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.lora_plus_ratio is not None:
        groups = lora_plus_groups(model, groups, config.lr, config.lora_plus_ratio)
    return torch.optim.AdamW(groups, lr=config.lr)


def linear_warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                           total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate from 0 up to its peak over ``warmup_steps``, then linearly down to 0 at
    ``total_steps`` (transformers' ``get_linear_schedule_with_warmup``, the same numbers;
    importing that one imports peft, and with it bitsandbytes when installed)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- one step, one evaluation

def accumulate_gradients(model, micro_batches: list[dict], autocast, scaler,
                         window_examples: int | None = None, ranks: int = 1) -> float:
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
            loss = (F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    * batch.get("loss_weight", 1.0) / window_examples)
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


def evaluate(model, token_ids, labels, batch_size, pad_id, device, autocast,
             world: World = World()) -> tuple[dict, torch.Tensor]:
    """Loss, accuracy and macro P/R/F1 on a split; also the probabilities ``(N, num_labels)``.

    With several ranks each computes the logits of its contiguous share and all of them get
    every share back, in order: every rank computes the same metrics (and so takes the same
    early-stopping decision), and no row is counted twice.
    """
    was_training = model.training
    model.eval()
    mine = distributed.shard(list(range(len(token_ids))), world)
    logits = batched_logits(model, [token_ids[i] for i in mine], batch_size, pad_id, autocast)
    logits = torch.cat(distributed.gather(logits, world))
    model.train(was_training)
    targets = torch.tensor(labels)
    metrics = {"loss": F.cross_entropy(logits, targets).item(),
               **report.classification_metrics(labels, logits.argmax(dim=1).numpy())}
    return metrics, logits.softmax(dim=1)


def check_every_trainable_gets_a_gradient(model, batch: dict) -> None:
    """One forward and backward (random generators untouched) before training: a trainable
    parameter that gets no gradient (``--trainable-modules pooler`` on a model that never uses
    its pooler) is a one-line error here, not a DistributedDataParallel traceback later."""
    with torch.random.fork_rng(devices=[]):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise UsageError(f"{shown} would train but the model's output does not depend on it; "
                         "drop it from --trainable-modules")


# ---------------------------------------------------------------- the job

def load_job(config: TrainConfig, device: torch.device):
    """Data (tokenised once), tokenizer and the LoRA model; every failure here is a UsageError,
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
        wrapped = inject_lora(model, config.target_modules, config.r, config.alpha, config.dropout,
                              config.trainable_modules, config.layers, rslora=config.rslora,
                              dora=config.dora, init=config.init)
        if config.quantize_base != "none":
            quantize_base(model, config.quantize_base, config.double_quant)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return splits, tokenizer, train_ids, val_ids, model.to(device), wrapped


def train(config: TrainConfig, on_evaluation: Callable[[int, dict], None] | None = None) -> dict:
    """Run the whole job; returns the summary that is also written to ``summary.json``.

    ``on_evaluation(step, metrics)`` is called after each validation evaluation (and its
    checkpoint); an exception it raises (``optuna.TrialPruned``) ends the run and propagates.

    Under ``torchrun`` every process runs this with the same config: one model trained with
    data parallelism (see ``lora/distributed.py``); rank 0 prints and writes the files.
    """
    config.check()
    world = distributed.start(pick_device(config.device))
    try:
        with distributed.quiet_unless_main(world):
            return _train(config, world, on_evaluation)
    finally:
        distributed.stop(world)


def _open_run(config: TrainConfig) -> tuple[Path, TrainConfig, dict | None]:
    """The run folder, the settings (saved ones on ``--resume``) and the checkpoint to resume."""
    output_dir = resolve_output_dir(config)
    if not config.resume:
        return output_dir, config, None
    return output_dir, resumed_config(config, output_dir), load_checkpoint(output_dir)


def _train(config: TrainConfig, world: World, on_evaluation=None) -> dict:
    device = world.device
    output_dir, config, checkpoint = distributed.from_main(world, lambda: _open_run(config))
    if checkpoint and checkpoint["world_size"] != world.size:
        raise UsageError(f"{output_dir} was trained by {checkpoint['world_size']} process(es) and the position in "
                         f"the data depends on it: resume with torchrun --nproc_per_node {checkpoint['world_size']}")
    precision = checkpoint["precision"] if checkpoint else pick_precision(config.precision, device)
    if checkpoint and checkpoint["device"] != device.type:
        print(f"note: this run was started on {checkpoint['device']} and continues on {device.type}: "
              "the result will not be bit-identical to an uninterrupted run")

    splits, tokenizer, train_ids, val_ids, model, wrapped = load_job(config, device)
    train_labels, val_labels = splits.train["label"].tolist(), splits.val["label"].tolist()
    pad_id = tokenizer.pad_token_id
    check_every_trainable_gets_a_gradient(
        model, {k: v.to(device) for k, v in pad_batch(train_ids[:2], pad_id).items()})
    if world.is_main and not config.resume:
        start_output_dir(output_dir, config)
    distributed.barrier(world)
    board = open_writer(config.report_to, output_dir, config.resume, world.is_main)
    if world.distributed:
        torch.manual_seed(config.seed + world.rank)  # each rank its own dropout masks
    print(f"run: {output_dir}  device: {device}  precision: {precision}")
    print(f"data: {len(train_ids)} train, {len(val_ids)} validation, {len(splits.test)} test rows")
    print(f"LoRA on {len(wrapped)} modules ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in wrapped}))}); "
          f"trained in full: {', '.join(config.trainable_modules) or 'nothing'}")
    if config.quantize_base != "none":
        print(describe_quantized(model))
    trainable, total = count_parameters(model)
    print(parameter_table(model))
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    global_batch = config.batch_size * world.size
    print(f"effective batch: {config.batch_size} (--batch-size) x {config.grad_accum} (--grad-accum) x "
          f"{world.size} process(es) = {global_batch * config.grad_accum} examples per optimizer step")
    adapter_config = {"base_model": _portable_model_name(config.model), "labels": splits.labels,
                      "max_length": config.max_length, "clean": config.clean, "provenance": provenance(),
                      "quantize_base": config.quantize_base, "double_quant": config.double_quant}

    # Optimisation: AdamW, linear warm-up then linear decay, GradScaler for fp16.
    batches_per_epoch = math.ceil(len(train_ids) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = make_optimizer(model, config)
    scheduler = linear_warmup_schedule(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_context(precision, device)
    trained_model = distributed.wrap(model, world)  # what the loop runs forward and backward

    state = {"window": 0, "step": 0, "skipped_steps": 0, "skips_in_a_row": 0, "stopped_early": False,
             "best": None, "best_step": None, "bad_evals": 0, "records": [],
             "train_seconds": 0.0, "train_examples": 0}
    if checkpoint:
        load_lora_state_dict(model, {k: v.to(device) for k, v in checkpoint["adapter"].items()})
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["progress"]
        restore_rng_states(checkpoint["rng"][world.rank])  # last: building the model drew from them
        print(f"resuming at step {state['step']} of {total_steps}")

    def checkpoint_now():
        rng = distributed.gather(rng_states(), world)  # every rank's generators, in rank order
        if world.is_main:
            save_checkpoint(output_dir, {"adapter": {k: v.cpu() for k, v in lora_state_dict(model).items()},
                                         "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(),
                                         "scaler": scaler.state_dict(), "progress": state, "rng": rng,
                                         "precision": precision, "device": device.type, "world_size": world.size})
            report.write_jsonl(output_dir / METRICS_NAME, state["records"])

    def evaluate_and_keep_best() -> None:
        """Validation metrics; save the adapter when they improve; stop when patience runs out."""
        metrics, _ = evaluate(model, val_ids, val_labels, 2 * config.batch_size, pad_id, device, autocast, world)
        state["records"].append({"kind": "eval", "step": state["step"], **metrics})
        board.log(state["records"][-1])
        improved = report.is_improvement(config.metric, metrics[config.metric], state["best"])
        if improved:
            state.update(best=metrics[config.metric], best_step=state["step"], bad_evals=0)
            if world.is_main:
                save_adapter(output_dir, model, adapter_config)
        else:
            state["bad_evals"] += 1
        state["stopped_early"] = state["bad_evals"] >= config.patience
        tqdm.write(f"step {state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                   + (" (best)" if improved else f" ({state['bad_evals']}/{config.patience} without improvement)"))

    def rank_micro_batch(indices: list[int]) -> dict:
        """This rank's share of one global batch, padded; a zero-weight stand-in when it has none."""
        mine = distributed.shard(indices, world)
        batch = pad_batch([train_ids[i] for i in mine or indices[:1]], pad_id,
                          [train_labels[i] for i in mine or indices[:1]])
        return {**batch, "loss_weight": 1.0 if mine else 0.0}

    # The loop: one iteration = one window of `grad_accum` micro-batches = one optimizer step,
    # unless the GradScaler skips it.
    trained_model.train()
    lengths = [len(ids) for ids in train_ids]
    in_terminal = sys.stderr.isatty() and world.is_main  # a bar in a terminal; plain lines in a log
    progress = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step",
                    disable=not in_terminal)
    epoch_batches = {}
    with deferred_interrupt() as interrupt:
        while state["step"] < total_steps and not state["stopped_early"]:
            if distributed.any_rank(interrupt.requested, world):
                checkpoint_now()
                progress.close()
                print(f"\ninterrupted at step {state['step']}; checkpoint saved; continue with: "
                      f"python train.py --resume --output-dir {output_dir}")
                raise KeyboardInterrupt
            epoch, window_in_epoch = divmod(state["window"], steps_per_epoch)
            if epoch not in epoch_batches:  # the same order on resume and on every rank: seed + epoch only
                epoch_batches = {epoch: length_grouped_batches(lengths, global_batch, config.seed + epoch)}
            window = epoch_batches[epoch][window_in_epoch * config.grad_accum:(window_in_epoch + 1) * config.grad_accum]
            micro_batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in rank_micro_batch(indices).items()}
                             for indices in window]
            window_examples = sum(len(indices) for indices in window)

            started = time.perf_counter()
            loss = distributed.total(accumulate_gradients(trained_model, micro_batches, autocast, scaler,
                                                          window_examples, world.size), world)
            stepped = optimizer_step(optimizer, scaler, config.max_grad_norm)
            optimizer.zero_grad(set_to_none=True)
            state["window"] += 1
            state["train_seconds"] += time.perf_counter() - started
            state["train_examples"] += window_examples
            if not stepped:
                state["skipped_steps"] += 1
                state["skips_in_a_row"] += 1
                state["records"].append({"kind": "skip", "step": state["step"], "window": state["window"],
                                         "loss": loss, "scale": scaler.get_scale()})
                board.log(state["records"][-1])
                limit = MAX_CONSECUTIVE_SKIPS if scaler.is_enabled() else 1
                if state["skips_in_a_row"] >= limit:
                    checkpoint_now()
                    progress.close()
                    raise TrainingStopped(
                        f"the loss or gradients were not finite in {state['skips_in_a_row']} window(s) in a row "
                        f"at step {state['step']} (loss {loss}); stopped without applying them: lower --lr or "
                        f"--max-grad-norm, or try --bf16; the best adapter so far and a checkpoint are in {output_dir}")
                continue
            scheduler.step()  # only after an applied step: a skipped step does not move the schedule
            state["step"] += 1
            state["skips_in_a_row"] = 0

            throughput = state["train_examples"] / state["train_seconds"]  # all ranks' examples
            lr = scheduler.get_last_lr()[0]
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_per_s=f"{throughput:.1f}",
                                 skipped=state["skipped_steps"])
            if state["step"] % config.log_steps == 0:
                state["records"].append({"kind": "train", "step": state["step"], "epoch": epoch, "loss": loss,
                                         "lr": lr, "examples_per_s": throughput,
                                         "skipped_steps": state["skipped_steps"]})
                board.log(state["records"][-1])
                if not in_terminal:
                    print(f"step {state['step']}/{total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                          f"{throughput:.1f} ex/s, {state['skipped_steps']} skipped", flush=True)
            if state["step"] % config.eval_steps == 0 or state["step"] == total_steps:
                evaluate_and_keep_best()
                checkpoint_now()
                if on_evaluation is not None:
                    on_evaluation(state["step"], state["records"][-1])
    progress.close()
    board.close()
    if state["stopped_early"]:
        print(f"early stop at step {state['step']}: no {config.metric} improvement "
              f"in {config.patience} evaluations")
    return _finish(output_dir, config, splits, tokenizer, model, state, trainable, total,
                   device, precision, autocast, world)


def _portable_model_name(name: str) -> str:
    """Hub ids and aliases as they are; local folders as absolute paths (predict runs anywhere)."""
    return str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name


def _finish(output_dir, config, splits, tokenizer, model, state, trainable, total,
            device, precision, autocast, world) -> dict:
    """Restore the best adapter, evaluate it once on test, write summary, plots, misclassified."""
    adapter_state = distributed.from_main(world, lambda: load_adapter(output_dir)[0])
    load_lora_state_dict(model, {k: v.to(device) for k, v in adapter_state.items()})
    test_metrics, test_labels = None, []
    if config.evaluate_test:
        test_ids = tokenize(splits.test["text"], tokenizer, config.max_length)
        test_labels = splits.test["label"].tolist()
        test_metrics, probabilities = evaluate(model, test_ids, test_labels, 2 * config.batch_size,
                                               tokenizer.pad_token_id, device, autocast, world)
    best_eval = next(r for r in state["records"] if r["kind"] == "eval" and r["step"] == state["best_step"])
    summary = {
        "best_step": state["best_step"], "steps": state["step"], "skipped_steps": state["skipped_steps"],
        "stopped_early": state["stopped_early"],
        "metric": config.metric, "val": {k: v for k, v in best_eval.items() if k not in ("kind", "step")},
        "test": test_metrics, "trainable_parameters": trainable, "total_parameters": total,
        "train_seconds": round(state["train_seconds"], 2),
        "examples_per_second": round(state["train_examples"] / max(state["train_seconds"], 1e-9), 2),
        "train_examples_seen": state["train_examples"], "test_rows": len(test_labels),
        "device": str(device), "processes": world.size, "precision": precision,
        "config": dataclasses.asdict(config), "provenance": provenance(),
    }
    if not world.is_main:
        return summary
    (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    report.write_jsonl(output_dir / METRICS_NAME, state["records"])
    report.plot_history(state["records"], output_dir)
    if not config.evaluate_test:
        return summary
    probabilities = probabilities.numpy()
    report.plot_test_errors(test_labels, probabilities.argmax(axis=1), splits.labels, output_dir)
    report.misclassified_table(splits.test["text"].tolist(), test_labels, probabilities,
                               splits.labels).to_csv(output_dir / "misclassified.csv", index=False)
    skipped = f", {state['skipped_steps']} skipped steps" if state["skipped_steps"] else ""
    print(f"test: accuracy {test_metrics['accuracy']:.4f}, macro F1 {test_metrics['f1_macro']:.4f} "
          f"({len(test_labels)} rows; best step {state['best_step']}{skipped}); results in {output_dir}")
    return summary
