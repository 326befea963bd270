"""Test accuracy on AG News: this project's LoRA, peft's LoRA, full fine-tuning and TF-IDF.

    python -m bench.accuracy [--quick] [--epochs N] [--seed N] [--device auto|cpu|cuda]
                             [--output PATH]

Offline: the bundled AG News rows (5,000 official training rows less a 5% validation split,
cleaned, extreme lengths dropped; the full 7,600-row official test split) and MiniLM.

(a) ours: ``lora.inject_lora``, r=8, alpha=16, dropout 0.1 on query and value; classifier
    and pooler trainable; lr 1e-3.
(b) peft: the same configuration with ``peft.LoraConfig``, starting from the same weights
    (our ``lora_A`` / ``lora_B`` copied in, the same head) and seeded alike, so that both see
    the same batches and dropout masks. Target: test accuracy within 0.3 points of ours.
(c) full fine-tuning: every parameter trains, lr 5e-5.
(d) TF-IDF (unigrams + bigrams, sublinear tf) + logistic regression (C=30).
(a)-(c) share one loop: AdamW (no weight decay), linear warm-up over 6% of the steps then
linear decay, gradients clipped to norm 1, batch 32, length-grouped batches with dynamic padding,
float32, ``--epochs`` epochs (2).
"""

import argparse
import copy
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from bench import common
from lora import count_parameters, inject_lora, lora_layers
from lora.classifier import batched_logits, classification_metrics, load_classifier_model, load_tokenizer
from lora.data import length_grouped_batches, load_splits, pad_batch, tokenize
from lora.train.execution import autocast_context
from lora.train.loop import TrainConfig, accumulate_gradients, adamw

MODEL = "minilm"
LORA = dict(r=8, alpha=16.0, dropout=0.1)
TARGET_MODULES = ("query", "value")
HEAD_MODULES = ("classifier", "pooler")
LEARNING_RATES = {"ours": 1e-3, "peft": 1e-3, "full": 5e-5}
BATCH_SIZE, EVAL_BATCH_SIZE, MAX_LENGTH = 32, 64, 128
WARMUP_RATIO, MAX_GRAD_NORM = 0.06, 1.0
TFIDF_C = 30.0
QUICK_ROWS = 300
TARGET_PARITY_POINTS = 0.3
METHOD_NAMES = {
    "ours": "(a) this project's LoRA",
    "peft": "(b) peft LoRA",
    "full": "(c) full fine-tuning",
    "tfidf": "(d) TF-IDF + logistic regression",
}


@dataclass
class Data:
    """Cleaned texts, token ids and labels of the training rows and the test rows."""

    train_texts: list[str]
    train_ids: list[list[int]]
    train_labels: list[int]
    test_texts: list[str]
    test_ids: list[list[int]]
    test_labels: list[int]
    labels: list[str]
    pad_id: int


def parse_args(argv=None) -> argparse.Namespace:
    """Command line; ``--quick`` means 300 training rows, 300 test rows, 1 epoch, no file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ROWS} train and test rows, 1 epoch; prints only, unless --output",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file (default {common.BENCHMARKS_MD.name}; none with --quick)",
    )
    args = parser.parse_args(argv)
    args.command = shlex.join(sys.argv[1:] if argv is None else argv)
    args.device = common.resolve_device(args.device)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 2
    if args.output is None and not args.quick:
        args.output = common.BENCHMARKS_MD
    return args


# ----------------------------------------------------------------------------- data and models
def load_data(quick: bool, seed: int) -> Data:
    """The cleaned bundled splits, tokenised for MiniLM; a seeded sample of each with ``quick``."""
    splits = load_splits("bundled", seed=seed, clean=True)
    train, test = splits.train, splits.test
    if quick:
        train, test = (frame.sample(QUICK_ROWS, random_state=seed) for frame in (train, test))
    tokenizer = load_tokenizer(MODEL)
    return Data(
        train["text"].tolist(),
        tokenize(train["text"], tokenizer, MAX_LENGTH),
        train["label"].tolist(),
        test["text"].tolist(),
        tokenize(test["text"], tokenizer, MAX_LENGTH),
        test["label"].tolist(),
        splits.labels,
        tokenizer.pad_token_id,
    )


def with_peft_lora(model: nn.Module) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model`` with the same LoRA settings as ours."""
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(TARGET_MODULES),
        modules_to_save=list(HEAD_MODULES),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecation notices from inside peft
        return get_peft_model(model, config)


@torch.no_grad()
def copy_lora_weights(ours: nn.Module, theirs: nn.Module) -> None:
    """Put our ``lora_A`` and ``lora_B`` into the peft model (same layouts: (r, in), (out, r))."""
    for name, layer in lora_layers(ours):
        target = theirs.base_model.model.get_submodule(name)
        target.lora_A["default"].weight.copy_(layer.lora_A)
        target.lora_B["default"].weight.copy_(layer.lora_B)


@torch.no_grad()
def check_same_start(models: dict[str, nn.Module], data: Data) -> None:
    """Raise unless every model gives the same eval-mode logits on the first test texts."""
    batch = pad_batch(data.test_ids[:BATCH_SIZE], data.pad_id)
    logits = {name: model.eval()(**batch).logits for name, model in models.items()}
    reference = logits.pop("ours")
    for name, other in logits.items():
        if not torch.allclose(reference, other, atol=1e-5):
            raise RuntimeError(
                f"{name} does not start from our weights (max logit difference {(reference - other).abs().max():.2e})"
            )


def build_models(labels: list[str], seed: int) -> dict[str, nn.Module]:
    """ours, peft and full fine-tuning, all copies of one pretrained MiniLM with one seeded head."""
    torch.manual_seed(seed)
    base = load_classifier_model(MODEL, labels)
    ours = copy.deepcopy(base)
    inject_lora(
        ours, TARGET_MODULES, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], trainable_modules=HEAD_MODULES
    )
    theirs = with_peft_lora(copy.deepcopy(base))
    copy_lora_weights(ours, theirs)
    return {"ours": ours, "peft": theirs, "full": base}


# ----------------------------------------------------------------------------- training
def epoch_batches(data: Data, epochs: int, seed: int) -> list[list[int]]:
    """Every training batch in order: length-grouped, reshuffled per epoch as train.py does."""
    lengths = [len(ids) for ids in data.train_ids]
    return [batch for epoch in range(epochs) for batch in length_grouped_batches(lengths, BATCH_SIZE, seed + epoch)]


def fine_tune(name: str, model: nn.Module, data: Data, epochs: int, seed: int, device: torch.device) -> float:
    """Train ``model`` in place; returns the wall-clock seconds of the loop.

    AdamW (``adamw``), linear warm-up then decay, one batch per step
    (``accumulate_gradients`` over a window of one), gradients clipped to norm 1, float32.
    Seeded just before the loop, so that models with the same weights draw the same dropout.
    """
    model.to(device).train()
    batches = epoch_batches(data, epochs, seed)
    optimizer = adamw(model, TrainConfig(lr=LEARNING_RATES[name]))
    scheduler = get_linear_schedule_with_warmup(optimizer, round(WARMUP_RATIO * len(batches)), len(batches))
    autocast = autocast_context("fp32", device)
    no_scaling = torch.amp.GradScaler(device.type, enabled=False)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    torch.manual_seed(seed)
    started = time.perf_counter()
    for indices in tqdm(batches, desc=f"training {name}", unit="step"):
        batch = pad_batch([data.train_ids[i] for i in indices], data.pad_id, [data.train_labels[i] for i in indices])
        accumulate_gradients(model, [{k: v.to(device) for k, v in batch.items()}], autocast, no_scaling)
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def evaluate(model: nn.Module, data: Data) -> tuple[dict, float]:
    """Test metrics (accuracy, macro P/R/F1) and the wall-clock seconds they took."""
    model.eval()
    started = time.perf_counter()
    logits = batched_logits(model, data.test_ids, EVAL_BATCH_SIZE, data.pad_id, progress=True)
    seconds = time.perf_counter() - started
    return classification_metrics(data.test_labels, logits.argmax(dim=1).numpy()), seconds


def encoder_result(name: str, model: nn.Module, data: Data, args) -> dict:
    """Fine-tune one encoder variant, evaluate it on test; metrics, parameters and seconds."""
    train_seconds = fine_tune(name, model, data, args.epochs, args.seed, args.device)
    metrics, test_seconds = evaluate(model, data)
    return {**metrics, "trainable": count_parameters(model)[0], "train_s": train_seconds, "test_s": test_seconds}


def tfidf_result(data: Data) -> dict:
    """TF-IDF (1-2 grams, sublinear tf) + logistic regression on the same rows."""
    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    classifier = LogisticRegression(C=TFIDF_C, max_iter=1000)
    classifier.fit(vectorizer.fit_transform(data.train_texts), data.train_labels)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    predictions = classifier.predict(vectorizer.transform(data.test_texts))
    test_seconds = time.perf_counter() - started
    return {
        **classification_metrics(data.test_labels, predictions),
        "trainable": classifier.coef_.size + classifier.intercept_.size,
        "train_s": train_seconds,
        "test_s": test_seconds,
    }


# ----------------------------------------------------------------------------- report
def results_body(results: dict[str, dict], data: Data, args) -> str:
    """The section body: the setting, the table and the parity verdict."""
    rows = [
        [
            METHOD_NAMES[name],
            f"{r['trainable']:,}",
            f"{100 * r['accuracy']:.2f}",
            f"{100 * r['f1_macro']:.2f}",
            f"{r['train_s']:.1f}",
            f"{r['test_s']:.1f}",
        ]
        for name, r in results.items()
    ]
    gap = 100 * abs(results["ours"]["accuracy"] - results["peft"]["accuracy"])
    verdict = "PASS" if gap <= TARGET_PARITY_POINTS else "MISS"
    return "\n".join(
        [
            f"MiniLM (all-MiniLM-L6-v2), {len(data.train_ids):,} cleaned training rows, "
            f"{len(data.test_ids):,} test rows, {args.epochs} epoch(s), batch {BATCH_SIZE}, seed "
            f"{args.seed}. LoRA r={LORA['r']}, alpha={LORA['alpha']:g}, dropout {LORA['dropout']} "
            f"on query and value, classifier and pooler trainable, lr {LEARNING_RATES['ours']:g}; "
            f"full fine-tuning lr {LEARNING_RATES['full']:g}; AdamW without weight decay, "
            f"{WARMUP_RATIO:.0%} warm-up then linear decay, the same length-grouped batches for "
            "(a)-(c). peft starts from our LoRA weights and head (equal starting logits checked). "
            "TF-IDF's trainable parameters are the logistic regression's weights "
            "(vocabulary x 4 classes + 4 biases).",
            "",
            common.markdown_table(
                ["method", "trainable params", "test accuracy %", "macro F1 %", "train s", "test eval s"], rows
            ),
            "",
            f"- Parity, ours vs peft: |accuracy difference| = {gap:.2f} points, {verdict} "
            f"(<= {TARGET_PARITY_POINTS} points)",
        ]
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    data = load_data(args.quick, args.seed)
    models = build_models(data.labels, args.seed)
    check_same_start(models, data)
    results = {name: encoder_result(name, model, data, args) for name, model in models.items()}
    results["tfidf"] = tfidf_result(data)
    common.report(
        args,
        "bench/accuracy.py",
        "bench/accuracy.py: test accuracy, LoRA vs peft vs full fine-tuning vs TF-IDF",
        results_body(results, data, args) + "\n" + common.run_summary(started, load_at_start),
        device_line=f"{'CUDA' if args.device.type == 'cuda' else 'CPU'}, float32; "
        "one run per method; wall-clock seconds",
    )


if __name__ == "__main__":
    main()
