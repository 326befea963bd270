"""The training job: data -> LoRA model -> loop with evaluation, early stopping and
checkpoints -> best adapter -> one test evaluation -> report.

The loop is written by hand (no Trainer) so it can be read top to bottom, nanoGPT style:
autocast, loss / examples-in-window, GradScaler, unscale before clipping, step, zero_grad.
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import report
from .adapter import load_adapter, save_adapter
from .backbone import load_classifier_model, load_tokenizer
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .data import length_grouped_batches, load_splits, pad_batch, tokenize
from .errors import UsageError
from .layer import check_lora_hyperparameters
from .model import count_parameters, inject_lora, load_lora_state_dict, lora_state_dict, parameter_table
from .runtime import RUNS_DIR, autocast_context, batched_logits, pick_device

CONFIG_NAME = "train_config.json"


@dataclass
class TrainConfig:
    """Every setting of a run; ``train.py`` fills it from the command line.

    The defaults are the seeds' best Optuna configuration for roberta-base on AG News.
    """
    r: int = 10
    alpha: float = 64.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    trainable_modules: tuple[str, ...] = ("classifier",)
    lr: float = 3.99e-4
    batch_size: int = 32
    grad_accum: int = 4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    epochs: int = 3
    max_steps: int | None = None
    max_length: int = 128
    eval_steps: int = 400
    log_steps: int = 10
    patience: int = 3
    metric: str = "accuracy"
    precision: str | None = None  # "fp16", "bf16", "fp32"; None: fp16 on CUDA, fp32 on CPU
    device: str = "auto"
    seed: int = 42
    model: str = "roberta-base"
    data: str = "ag_news"
    val_size: float = 0.05
    clean: bool = False
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """Raise ``UsageError`` for impossible settings, before anything is loaded or written."""
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--eval-steps": self.eval_steps, "--log-steps": self.log_steps,
                    "--epochs": self.epochs, "--patience": self.patience,
                    "--max-length": self.max_length}
        if self.max_steps is not None:
            positive["--max-steps"] = self.max_steps
        for flag, value in positive.items():
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.val_size < 1:
            raise UsageError(f"--val-size must be between 0 and 1, got {self.val_size}")
        if self.metric not in report.HIGHER_IS_BETTER:
            raise UsageError(f"--metric must be one of {list(report.HIGHER_IS_BETTER)}")
        try:
            check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        except ValueError as error:
            raise UsageError(str(error)) from None


# ---------------------------------------------------------------- set-up

def pick_precision(precision: str | None, device: torch.device) -> str:
    """fp16 autocast needs CUDA (and a GradScaler); bf16 autocast works on CPU too."""
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--fp16 needs a CUDA device; on CPU use --bf16 or --no-amp")
    return precision


def prepare_output_dir(config: TrainConfig) -> Path:
    """The run folder. A non-empty one needs ``--resume`` or ``--overwrite``; ``--resume``
    without ``--output-dir`` takes the newest run under ``runs/`` that has a checkpoint."""
    if config.resume and config.output_dir is None:
        candidates = sorted((d for d in RUNS_DIR.glob("*") if has_checkpoint(d)),
                            key=lambda d: d.stat().st_mtime)
        if not candidates:
            raise UsageError("--resume: no run with a checkpoint under runs/; name one with --output-dir")
        return candidates[-1]
    directory = Path(config.output_dir or RUNS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if config.resume:
        if not has_checkpoint(directory):
            raise UsageError(f"--resume: {directory} has no checkpoint to resume from")
        return directory
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--output-dir {directory} is a file")
    if directory.is_dir() and any(directory.iterdir()) and not config.overwrite:
        raise UsageError(f"output directory {directory} is not empty; "
                         "pass --resume to continue it or --overwrite to write over it")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; biases and LayerNorm weights get no weight decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            skip = parameter.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
            (no_decay if skip else decay).append(parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


# ---------------------------------------------------------------- one step, one evaluation

def accumulate_gradients(model, micro_batches: list[dict], autocast, scaler) -> float:
    """Forward and backward over the micro-batches of one optimizer step.

    Each micro-batch's summed cross-entropy is divided by the number of examples in the whole
    window, so the accumulated gradient is the gradient of the window's mean loss, whatever
    the split (4 x 8 == 1 x 32) and however short a last window is. Returns that mean loss.
    """
    window_examples = sum(len(batch["labels"]) for batch in micro_batches)
    total = 0.0
    for batch in micro_batches:
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # The loss in float32 whatever autocast did to the logits.
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum") / window_examples
        scaler.scale(loss).backward()
        total += loss.item()
    return total


def evaluate(model, token_ids, labels, batch_size, pad_id, device, autocast) -> tuple[dict, torch.Tensor]:
    """Loss, accuracy and macro P/R/F1 on a split; also the probabilities ``(N, num_labels)``."""
    was_training = model.training
    model.eval()
    logits = batched_logits(model, token_ids, batch_size, pad_id, autocast)
    model.train(was_training)
    targets = torch.tensor(labels)
    metrics = {"loss": F.cross_entropy(logits, targets).item(),
               **report.classification_metrics(labels, logits.argmax(dim=1).numpy())}
    return metrics, logits.softmax(dim=1)


# ---------------------------------------------------------------- the job

def train(config: TrainConfig) -> dict:
    """Run the whole job; returns the summary that is also written to ``summary.json``."""
    config.check()
    output_dir = prepare_output_dir(config)
    if config.resume:
        saved = json.loads((output_dir / CONFIG_NAME).read_text())
        config = TrainConfig(**{**saved, "resume": True, "output_dir": str(output_dir)})
    else:
        (output_dir / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    print(f"run: {output_dir}  device: {device}  precision: {precision}")

    # Data, tokenised once for the whole run.
    splits = load_splits(config.data, config.val_size, config.seed, config.clean)
    tokenizer = load_tokenizer(config.model)
    train_ids = tokenize(splits.train["text"], tokenizer, config.max_length)
    val_ids = tokenize(splits.val["text"], tokenizer, config.max_length)
    train_labels, val_labels = splits.train["label"].tolist(), splits.val["label"].tolist()
    print(f"data: {len(train_ids)} train, {len(val_ids)} validation, {len(splits.test)} test rows")

    # Model: pretrained encoder + fresh head, LoRA on the target modules, the rest frozen.
    torch.manual_seed(config.seed)
    model = load_classifier_model(config.model, splits.labels)
    try:
        inject_lora(model, config.target_modules, config.r, config.alpha, config.dropout,
                    config.trainable_modules, config.layers)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model.to(device)
    trainable, total = count_parameters(model)
    print(parameter_table(model))
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    adapter_config = {"base_model": _portable_model_name(config.model), "labels": splits.labels,
                      "max_length": config.max_length, "clean": config.clean}

    # Optimisation: AdamW, linear warm-up then linear decay, GradScaler for fp16.
    batches_per_epoch = math.ceil(len(train_ids) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = make_optimizer(model, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = autocast_context(precision, device)
    pad_id = tokenizer.pad_token_id

    state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "records": [],
             "train_seconds": 0.0, "train_examples": 0}
    if config.resume:
        checkpoint = load_checkpoint(output_dir)
        load_lora_state_dict(model, {k: v.to(device) for k, v in checkpoint["adapter"].items()})
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["progress"]
        print(f"resuming at step {state['step']} of {total_steps}")

    def checkpoint_now():
        save_checkpoint(output_dir, {"adapter": {k: v.cpu() for k, v in lora_state_dict(model).items()},
                                     "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(),
                                     "scaler": scaler.state_dict(), "progress": state})
        report.write_jsonl(output_dir / "metrics.jsonl", state["records"])

    def evaluate_and_keep_best() -> bool:
        """Validation metrics; save the adapter when they improve. True when patience runs out."""
        metrics, _ = evaluate(model, val_ids, val_labels, 2 * config.batch_size, pad_id, device, autocast)
        state["records"].append({"kind": "eval", "step": state["step"], **metrics})
        improved = report.is_improvement(config.metric, metrics[config.metric], state["best"])
        if improved:
            state.update(best=metrics[config.metric], best_step=state["step"], bad_evals=0)
            save_adapter(output_dir, model, adapter_config)
        else:
            state["bad_evals"] += 1
        tqdm.write(f"step {state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                   + (" (best)" if improved else f" ({state['bad_evals']}/{config.patience} without improvement)"))
        return state["bad_evals"] >= config.patience

    # The loop: one iteration = one optimizer step over `grad_accum` micro-batches.
    model.train()
    lengths = [len(ids) for ids in train_ids]
    progress = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step")
    epoch_batches = {}
    stopped_early = False
    try:
        while state["step"] < total_steps and not stopped_early:
            epoch, window_in_epoch = divmod(state["step"], steps_per_epoch)
            if epoch not in epoch_batches:  # the same order on resume: it depends on seed + epoch only
                epoch_batches = {epoch: length_grouped_batches(lengths, config.batch_size, config.seed + epoch)}
            window = epoch_batches[epoch][window_in_epoch * config.grad_accum:(window_in_epoch + 1) * config.grad_accum]
            micro_batches = [pad_batch([train_ids[i] for i in indices], pad_id, [train_labels[i] for i in indices])
                             for indices in window]
            micro_batches = [{k: v.to(device) for k, v in batch.items()} for batch in micro_batches]

            started = time.perf_counter()
            loss = accumulate_gradients(model, micro_batches, autocast, scaler)
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["train_seconds"] += time.perf_counter() - started
            state["train_examples"] += sum(len(indices) for indices in window)

            throughput = state["train_examples"] / state["train_seconds"]
            lr = scheduler.get_last_lr()[0]
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_per_s=f"{throughput:.1f}")
            if state["step"] % config.log_steps == 0:
                state["records"].append({"kind": "train", "step": state["step"], "epoch": epoch,
                                         "loss": loss, "lr": lr, "examples_per_s": throughput})
            if state["step"] % config.eval_steps == 0 or state["step"] == total_steps:
                stopped_early = evaluate_and_keep_best()
                checkpoint_now()
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted at step {state['step']}; continue from the last checkpoint with: "
              f"python train.py --resume --output-dir {output_dir}")
        raise
    progress.close()
    if stopped_early:
        print(f"early stop at step {state['step']}: no {config.metric} improvement "
              f"in {config.patience} evaluations")
    return _finish(output_dir, config, splits, tokenizer, model, state, trainable, total,
                   device, autocast, stopped_early)


def _portable_model_name(name: str) -> str:
    """Hub ids and aliases as they are; local folders as absolute paths (predict runs anywhere)."""
    return str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name


def _finish(output_dir, config, splits, tokenizer, model, state, trainable, total,
            device, autocast, stopped_early) -> dict:
    """Restore the best adapter, evaluate it once on test, write summary, plots, misclassified."""
    adapter_state, _ = load_adapter(output_dir)
    load_lora_state_dict(model, {k: v.to(device) for k, v in adapter_state.items()})
    test_ids = tokenize(splits.test["text"], tokenizer, config.max_length)
    test_labels = splits.test["label"].tolist()
    test_metrics, probabilities = evaluate(model, test_ids, test_labels, 2 * config.batch_size,
                                           tokenizer.pad_token_id, device, autocast)
    best_eval = next(r for r in state["records"] if r["kind"] == "eval" and r["step"] == state["best_step"])
    summary = {
        "best_step": state["best_step"], "steps": state["step"], "stopped_early": stopped_early,
        "metric": config.metric, "val": {k: v for k, v in best_eval.items() if k not in ("kind", "step")},
        "test": test_metrics, "trainable_parameters": trainable, "total_parameters": total,
        "train_seconds": round(state["train_seconds"], 2),
        "examples_per_second": round(state["train_examples"] / max(state["train_seconds"], 1e-9), 2),
        "train_examples_seen": state["train_examples"], "test_rows": len(test_labels),
        "device": str(device), "config": dataclasses.asdict(config),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.write_jsonl(output_dir / "metrics.jsonl", state["records"])
    report.plot_history(state["records"], output_dir)
    probabilities = probabilities.numpy()
    report.plot_test_errors(test_labels, probabilities.argmax(axis=1), splits.labels, output_dir)
    report.misclassified_table(splits.test["text"].tolist(), test_labels, probabilities,
                               splits.labels).to_csv(output_dir / "misclassified.csv", index=False)
    print(f"test: accuracy {test_metrics['accuracy']:.4f}, macro F1 {test_metrics['f1_macro']:.4f} "
          f"({len(test_labels)} rows; best step {state['best_step']}); results in {output_dir}")
    return summary
