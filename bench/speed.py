"""This project's LoRA against peft's LoRA and full fine-tuning: speed, latency, memory.

    python -m bench.speed [--device auto|cpu|cuda] [--quick] [--repeats N] [--warmup N]
    python -m bench.speed --execution [--quick] [--repeats N]    # part 3 alone (its own section)
    python -m bench.speed --floor [--quick] [--repeats N]        # part 4 alone (its own section)

1a. Seconds per training step at one padded batch (16 x 128): ours, peft, full fine-tuning,
    on a random-weight roberta-base shape and on MiniLM. Targets: ours/peft <= 1.00,
    ours/full <= 0.70.
1b. Inference latency of one batch (32 x 128): base model, LoRA unmerged, LoRA merged.
    Target: merged/base <= 1.02.
1c. Peak memory of training steps, each variant in a fresh process. Targets: ours <= 0.6 x full,
    ours <= peft.
LoRA everywhere: r=10, alpha=64, dropout 0, on query and value, classifier head trainable.
2.  Training throughput on the bundled AG News training rows (real lengths), MiniLM, batch 32:
    ``lora.train.loop.train`` (dynamic padding, length-grouped batches) against the course project's
    pipeline rebuilt, peft LoRA + ``transformers.Trainer`` on texts padded to 128 tokens; both
    TrainConfig's LoRA (r=10, alpha=64, dropout 0.1), the same steps; 3 rounds after the
    warm-up (1 with --quick). Target: ours >= 2x the examples per second.
3.  With ``--execution`` (its own section): seconds per training step (16 x 128) of ours and peft,
    each eager and compiled (``--compile``), with and without activation checkpointing
    (``--gradient-checkpointing``), all interleaved, on the roberta-base shape and MiniLM; the
    compile's cost (the first step) and the steps after which it pays back. Target: ours
    compiled <= 0.90 x peft eager. The checkpointing's memory saving: ``bench.quantize``. For a
    cold compile's cost, run with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` (else inductor's
    on-disk cache from an earlier run makes it look cheap).
4.  With ``--floor`` (its own section): the training step of ours and peft against its floor,
    the frozen base's forward and the backward through every layer to the embeddings with no
    adapter (roberta-base width, 4 layers, 16 x 128, LoRA r=10 with dropout 0.1 on query and
    value), interleaved. Target: our overhead over the floor <= 3% and below peft's.
"""

import dataclasses
import math
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from bench import common
from bench.common import Setup, markdown_table, paired_ratio_cell, ratio_cell
from lora import merge_lora
from lora.classifier import load_classifier_model, load_tokenizer
from lora.data import BUNDLED_DIR, length_grouped_batches, load_splits, read_table, tokenize
from lora.train.loop import TrainConfig, train

LORA = dict(r=TrainConfig.r, alpha=TrainConfig.alpha)  # the course project's recipe (TrainConfig's defaults)
TRAIN_VARIANTS = ("ours", "peft", "full")
INFERENCE_VARIANTS = ("base", "unmerged", "merged")
TARGET_OURS_VS_PEFT = 1.00
TARGET_OURS_VS_FULL_TIME = 0.70
TARGET_MERGED_VS_BASE = 1.02
TARGET_OURS_VS_FULL_MEMORY = 0.60
# Part 2: lora.train.loop.train against the course project's pipeline, both with TrainConfig's defaults.
THROUGHPUT = TrainConfig(model="minilm", batch_size=32, grad_accum=1)
THROUGHPUT_STEPS, QUICK_THROUGHPUT_STEPS = 10, 2
THROUGHPUT_REPEATS = 3  # whole training runs take a while: 3 rounds, whatever --repeats says
THROUGHPUT_TEST_ROWS = 64
TARGET_TIME_PER_EXAMPLE = 0.50  # ours / theirs: ours at least 2x the examples per second
# Part 3: how the step runs (lora/execution.py), the Setup options of each mode.
EXECUTION_MODES = {
    "eager": {},
    "compiled": dict(compiled=True),
    "checkpointed": dict(checkpointing=True),
    "compiled + checkpointed": dict(compiled=True, checkpointing=True),
}
TARGET_COMPILED_VS_PEFT = 0.90  # ours compiled / peft eager
# Part 4: the floor.
FLOOR_LAYERS, FLOOR_SHAPE, FLOOR_DROPOUT = 4, (16, 128), 0.1
TARGET_OVER_FLOOR = 0.03  # ours / floor - 1


def training_step_part(models, shape, args) -> str:
    """1a: median seconds per training step of each variant, interleaved, per model."""
    rows = []
    for name in models:
        setups = {variant: Setup(name, variant, *shape, **LORA) for variant in TRAIN_VARIANTS}
        steps = common.build_training_steps(setups, args.device, common.build_base_model(name))
        times = common.interleaved_times(steps, args.device, args.repeats, args.warmup)
        seconds = common.medians(times)
        rows.append(
            [
                name,
                *(f"{seconds[v]:.3f}" for v in TRAIN_VARIANTS),
                paired_ratio_cell(times, "ours", "peft", TARGET_OURS_VS_PEFT),
                paired_ratio_cell(times, "ours", "full", TARGET_OURS_VS_FULL_TIME),
            ]
        )
    return (
        f"### 1a. Training step, batch {shape[0]} x {shape[1]} tokens\n\n"
        "Forward, backward, AdamW step, `zero_grad(set_to_none=True)`; seconds per step.\n\n"
        + markdown_table(["model", "ours s", "peft s", "full FT s", "ours / peft", "ours / full FT"], rows)
    )


def inference_steps(name, shape, device) -> dict:
    """Inference step functions of the base model and of our LoRA model unmerged and merged."""
    base = common.build_base_model(name)
    models = {
        variant: common.build(Setup(name, "base" if variant == "base" else "ours", *shape, **LORA), base)
        for variant in INFERENCE_VARIANTS
    }
    merge_lora(models["merged"])
    return {
        variant: common.inference_step(model, common.make_batch(model, *shape, device, labels=False), device)
        for variant, model in models.items()
    }


def inference_part(models, shape, args) -> str:
    """1b: median latency of one eval-mode batch for base, unmerged and merged, per model."""
    rows = []
    for name in models:
        times = common.interleaved_times(
            inference_steps(name, shape, args.device), args.device, args.repeats, args.warmup
        )
        seconds = common.medians(times)
        rows.append(
            [
                name,
                *(f"{1000 * seconds[v]:.1f}" for v in INFERENCE_VARIANTS),
                paired_ratio_cell(times, "unmerged", "base"),
                paired_ratio_cell(times, "merged", "base", TARGET_MERGED_VS_BASE),
            ]
        )
    return (
        f"### 1b. Inference latency, batch {shape[0]} x {shape[1]} tokens\n\n"
        "One forward under `torch.inference_mode()` in eval mode; milliseconds per batch. "
        "Merged: `merge_lora` folded the update into the weights.\n\n"
        + markdown_table(
            ["model", "base ms", "LoRA unmerged ms", "LoRA merged ms", "unmerged / base", "merged / base"], rows
        )
    )


def memory_part(models, shape, args) -> str:
    """1c: peak training memory per variant (each in a fresh process) and the target ratios."""
    rows, ratio_rows = [], []
    for name in models:
        memory = {
            variant: common.measure_training_memory(Setup(name, variant, *shape, **LORA), args.device)
            for variant in TRAIN_VARIANTS
        }
        rows += [
            [name, variant, *(f"{memory[variant][key]:.0f}" for key in ("loaded", "peak", "increase"))]
            for variant in TRAIN_VARIANTS
        ]
        for key, label in (("increase", "increase over loaded"), ("peak", "absolute peak")):
            ours, peft, full = (memory[variant][key] for variant in TRAIN_VARIANTS)
            ratio_rows.append(
                [
                    name,
                    label,
                    ratio_cell(ours / full, TARGET_OURS_VS_FULL_MEMORY),
                    ratio_cell(ours / peft, TARGET_OURS_VS_PEFT),
                ]
            )
    return (
        f"### 1c. Peak training memory, batch {shape[0]} x {shape[1]} tokens\n\n"
        f"{common.memory_note(args.device)}\n\n"
        + markdown_table(["model", "variant", "loaded MiB", "peak MiB", "increase MiB"], rows)
        + "\n\n"
        + markdown_table(["model", "measure", "ours / full FT", "ours / peft"], ratio_rows)
    )


def throughput_data(directory: Path) -> Path:
    """A data folder holding the bundled training rows and only the first test rows: ``train``
    ends with a test evaluation that is not timed, and 7,600 rows of it would take minutes."""
    (directory / "train.csv").symlink_to(BUNDLED_DIR / "train.csv")
    read_table(BUNDLED_DIR / "test.csv").head(THROUGHPUT_TEST_ROWS).to_csv(directory / "test.csv", index=False)
    return directory


def ours_throughput(data_dir: Path, steps: int, device) -> float:
    """Examples per second of ``lora.train.loop.train`` (its own count: training steps only)."""
    with tempfile.TemporaryDirectory() as output_dir:
        config = dataclasses.replace(
            THROUGHPUT, data=str(data_dir), max_steps=steps, eval_steps=steps, device=device.type, output_dir=output_dir
        )
        return train(config)["examples_per_second"]


class StepTimer(TrainerCallback):
    """Sums the seconds of ``Trainer``'s optimizer steps: from ``on_step_begin`` (the batch is
    loaded) to ``on_step_end`` (forward, backward, clipping, AdamW, scheduler, zero_grad)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.started = device, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        common.synchronize(self.device)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        common.synchronize(self.device)
        self.seconds += time.perf_counter() - self.started


def seeds_dataset(texts: list[str], labels: list[int], tokenizer):
    """The course project's pre-processing: every text tokenised and padded to ``max_length`` up front."""
    from datasets import Dataset

    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=THROUGHPUT.max_length)
    return Dataset.from_dict({**encoded, "labels": labels})


def trainer_throughput(dataset, tokenizer, steps: int, device: torch.device) -> float:
    """Examples per second of peft LoRA + ``transformers.Trainer``, timed by ``StepTimer``."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(THROUGHPUT.seed)
    model = get_peft_model(
        load_classifier_model(THROUGHPUT.model, common.LABELS),
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=THROUGHPUT.r,
            lora_alpha=THROUGHPUT.alpha,
            lora_dropout=THROUGHPUT.dropout,
            target_modules=list(THROUGHPUT.target_modules),
        ),
    )
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=THROUGHPUT.batch_size,
            max_steps=steps,
            learning_rate=THROUGHPUT.lr,
            warmup_steps=THROUGHPUT.warmup_ratio,
            weight_decay=THROUGHPUT.weight_decay,
            max_grad_norm=THROUGHPUT.max_grad_norm,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=device.type == "cpu",
            fp16=device.type == "cuda",
            seed=THROUGHPUT.seed,
        )
        Trainer(
            model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        ).train()
    return steps * THROUGHPUT.batch_size / timer.seconds


def mean_padded_lengths(lengths: list[int], steps: int) -> tuple[float, float]:
    """Mean padded width of ``train``'s batches: over the first ``steps`` (the timed ones, the
    same every run: seeded) and over the whole first epoch."""
    widths = [
        max(lengths[i] for i in batch)
        for batch in length_grouped_batches(lengths, THROUGHPUT.batch_size, THROUGHPUT.seed)
    ]
    return statistics.mean(widths[:steps]), statistics.mean(widths)


def throughput_part(args) -> str:
    """2: examples per second, our training loop vs peft + Trainer, interleaved; padded lengths."""
    steps, repeats = (QUICK_THROUGHPUT_STEPS, 1) if args.quick else (THROUGHPUT_STEPS, THROUGHPUT_REPEATS)
    tokenizer = load_tokenizer(THROUGHPUT.model)
    with tempfile.TemporaryDirectory() as directory:
        data_dir = throughput_data(Path(directory))
        rows = load_splits(str(data_dir), THROUGHPUT.val_size, THROUGHPUT.seed).train  # train's
        dataset = seeds_dataset(rows["text"].tolist(), rows["label"].tolist(), tokenizer)
        runs = {
            "ours": partial(ours_throughput, data_dir, steps, args.device),
            "theirs": partial(trainer_throughput, dataset, tokenizer, steps, args.device),
        }
        rounds = common.round_robin(runs, repeats, args.warmup)
    lengths = [len(ids) for ids in tokenize(rows["text"], tokenizer, THROUGHPUT.max_length)]
    theirs_padded = statistics.mean(len(ids) for ids in dataset["input_ids"])
    return throughput_report(rounds, lengths, theirs_padded, steps)


def throughput_report(rounds: dict[str, list[float]], lengths: list[int], theirs_padded: float, steps: int) -> str:
    """Part 2's text: the setting, the table, the ratio against its target, and why."""
    real = statistics.mean(lengths)
    ours_timed, ours_epoch = mean_padded_lengths(lengths, steps)
    rates = common.medians(rounds)
    ratio = common.paired_ratio(rounds, "ours", "theirs")
    table = markdown_table(
        [
            "pipeline",
            "mean padded length, timed steps",
            "mean padded length, epoch",
            "padding share, epoch",
            "examples / s",
        ],
        [
            [
                "ours: `lora.train.loop.train`, dynamic padding, length-grouped batches",
                f"{ours_timed:.1f}",
                f"{ours_epoch:.1f}",
                f"{1 - real / ours_epoch:.1%}",
                f"{rates['ours']:.2f}",
            ],
            [
                'seeds: peft + `transformers.Trainer`, `padding="max_length"`',
                f"{theirs_padded:.1f}",
                f"{theirs_padded:.1f}",
                f"{1 - real / theirs_padded:.1%}",
                f"{rates['theirs']:.2f}",
            ],
        ],
    )
    return "\n".join(
        [
            f"### 2. Training throughput on AG News lengths, MiniLM, batch {THROUGHPUT.batch_size}",
            "",
            f"{steps} optimizer steps per run, {len(rounds['ours'])} round(s) after the warm-up, "
            f"on the bundled training rows ({len(lengths):,} after "
            f"the {THROUGHPUT.val_size:.0%} validation split; {real:.1f} real tokens per text on "
            f"average, at most {THROUGHPUT.max_length}), a fresh model each run, runs interleaved "
            f"(ours theirs, theirs ours, ...), medians. Both: LoRA r={THROUGHPUT.r}, "
            f"alpha={THROUGHPUT.alpha:g}, dropout {THROUGHPUT.dropout} on query and value, "
            f"classifier trainable, AdamW lr {THROUGHPUT.lr:g}, {THROUGHPUT.warmup_ratio:.0%} "
            f"warm-up, clipping at {THROUGHPUT.max_grad_norm:g}, no evaluation. Examples per second "
            'count training steps only: ours is `train`\'s `summary["examples_per_second"]`, '
            "theirs is timed from `on_step_begin` to `on_step_end` of a `TrainerCallback`.",
            "",
            table,
            "",
            f"- ours / theirs, examples per second: {ratio:.2f}x (median of the per-round ratios); "
            "time per example, ours / theirs: "
            f"{paired_ratio_cell(rounds, 'theirs', 'ours', TARGET_TIME_PER_EXAMPLE)}",
            f"- Where the speedup comes from: padding. Padding every text to {theirs_padded:.0f} "
            f"tokens makes each step compute {theirs_padded / ours_epoch:.2f}x the token positions "
            f"of length-grouped batches padded to their own longest text ({ours_epoch:.1f} on "
            f"average over an epoch, {1 - real / ours_epoch:.1%} of it padding, against "
            f"{1 - real / theirs_padded:.1%}). The linear layers, frozen or LoRA, which do most "
            "of the work at these lengths, cost in proportion to the positions; attention scores "
            f"grow with their square ({(theirs_padded / ours_epoch) ** 2:.1f}x). The LoRA layers "
            "themselves cost what peft's do (part 1a).",
            f"- The timed steps' batches average {ours_timed:.1f} padded tokens against "
            f"{ours_epoch:.1f} over the epoch; scaled to the epoch's mean, ours / theirs would be "
            f"about {ratio * ours_timed / ours_epoch:.2f}x.",
        ]
    )


def execution_part(models, shape, args) -> str:
    """3: seconds per training step of ours and peft in every execution mode, interleaved; the
    compile's cost (the first step minus a compiled step) and its payback in steps."""
    rows, compile_rows = [], []
    for name in models:
        setups = {
            f"{variant} {mode}": Setup(name, variant, *shape, **LORA, **options)
            for variant in ("ours", "peft")
            for mode, options in EXECUTION_MODES.items()
        }
        steps = common.build_training_steps(setups, args.device, common.build_base_model(name))
        # The compiles: the first step of each (one graph per model; a fresh cache per model, so
        # that no model's graphs count against another's recompile limit).
        torch._dynamo.reset()
        first = {label: common.timed(step, args.device)() for label, step in steps.items()}
        times = common.interleaved_times(steps, args.device, args.repeats, args.warmup)
        seconds = common.medians(times)
        rows += [
            [
                name,
                mode,
                f"{seconds['ours ' + mode]:.3f}",
                f"{seconds['peft ' + mode]:.3f}",
                paired_ratio_cell(
                    times, f"ours {mode}", "peft eager", TARGET_COMPILED_VS_PEFT if mode == "compiled" else None
                ),
                paired_ratio_cell(times, f"ours {mode}", f"peft {mode}"),
                paired_ratio_cell(times, f"ours {mode}", "ours eager"),
            ]
            for mode in EXECUTION_MODES
        ]
        for variant in ("ours", "peft"):
            compile_seconds = first[f"{variant} compiled"] - seconds[f"{variant} compiled"]
            saved = seconds[f"{variant} eager"] - seconds[f"{variant} compiled"]
            compile_rows.append(
                [
                    name,
                    variant,
                    f"{compile_seconds:.1f}",
                    f"{saved:.3f}",
                    math.ceil(compile_seconds / saved) if saved > 0 else "never",
                ]
            )
    return (
        f"### 3. Compiled and checkpointed training steps, batch {shape[0]} x {shape[1]} tokens\n\n"
        "Forward, backward, AdamW step; seconds per step after the compile (the first step, "
        "not timed in the rounds). *compiled*: `torch.compile` of the whole model (`--compile`); "
        "*checkpointed*: every encoder layer's activations recomputed in backward "
        "(`--gradient-checkpointing`, non-reentrant).\n\n"
        + markdown_table(
            ["model", "mode", "ours s", "peft s", "ours / peft eager", "ours / peft, same mode", "ours / ours eager"],
            rows,
        )
        + "\n\nThe compile: the first step's seconds minus a compiled step's, the seconds a "
        "compiled step saves over an eager one, and the steps after which the compile has paid "
        "for itself.\n\n"
        + markdown_table(["model", "variant", "compile s", "saved s / step", "pays back after steps"], compile_rows)
    )


# ----------------------------------------------------------------------------- part 4: the floor
def floor_step(shape: tuple[int, int], device: torch.device):
    """The work no LoRA can skip: the frozen base's forward and the backward through every layer
    down to the embeddings' output (which is made to require a gradient), no adapter, no
    parameter gradient, no optimizer step."""
    model = build_floor_model().to(device).train()
    model.requires_grad_(False)
    model.roberta.embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    batch = common.make_batch(model, *shape, device)

    def step() -> None:
        model(**batch).loss.backward()

    return step


def build_floor_model():
    """roberta-base's width with 4 layers (random weights, seeded)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(
        RobertaConfig(num_labels=4, num_hidden_layers=FLOOR_LAYERS, max_position_embeddings=514, type_vocab_size=1)
    )
    model.config.problem_type = "single_label_classification"
    return model


def floor_part(shape, args) -> str:
    """4: ours and peft against the floor: what LoRA itself costs a step, interleaved rounds; and
    both without the LoRA dropout, which shows what drawing its masks costs."""
    base = build_floor_model()
    setups = {
        f"{variant}{suffix}": Setup("roberta-base", variant, *shape, r=10, alpha=64.0, dropout=dropout)
        for suffix, dropout in (("", FLOOR_DROPOUT), (", LoRA dropout 0", 0.0))
        for variant in ("ours", "peft")
    }
    steps = common.build_training_steps(setups, args.device, base)
    steps["floor"] = floor_step(shape, args.device)
    times = common.interleaved_times(steps, args.device, args.repeats, args.warmup)
    seconds = common.medians(times)
    ours, peft = (common.paired_ratio(times, variant, "floor") for variant in ("ours", "peft"))
    verdict = "PASS" if ours - 1 <= TARGET_OVER_FLOOR and ours < peft else "MISS"
    rows = [
        [
            name,
            f"{seconds[name]:.3f}",
            f"{1000 * (seconds[name] - seconds['floor']):+.0f}",
            "1" if name == "floor" else paired_ratio_cell(times, name, "floor"),
            paired_ratio_cell(times, name, name.replace("ours", "peft")) if name.startswith("ours") else "",
        ]
        for name in ("floor", *setups)
    ]
    return (
        f"### 4. The training step against its floor, roberta-base width, {FLOOR_LAYERS} layers, "
        f"batch {shape[0]} x {shape[1]}\n\n"
        "*floor*: the frozen base's forward and the backward through every layer to the embeddings, "
        "no adapter (what no LoRA implementation can skip; the base's own dropout included); *ours*, "
        f"*peft*: LoRA r=10, alpha=64, dropout {FLOOR_DROPOUT} on query and value (or none), the head "
        "trained, AdamW. Seconds per step.\n\n"
        + markdown_table(["variant", "s / step", "ms over the floor", "/ floor", "ours / peft"], rows)
        + f"\n\n- Goal: our overhead over the floor at most {100 * TARGET_OVER_FLOOR:.0f}% and below peft's: "
        f"ours {100 * (ours - 1):.1f}%, peft {100 * (peft - 1):.1f}%: **{verdict}**"
    )


def main(argv=None) -> None:
    parser = common.make_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument(
        "--execution",
        action="store_true",
        help="part 3 only: compiled and checkpointed steps, ours and peft (its own section)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="part 4 only: ours and peft against the frozen base's forward and backward (its own section)",
    )
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    models = ("roberta-tiny" if args.quick else "roberta-base", "minilm")
    train_shape, inference_shape = ((4, 32), (4, 32)) if args.quick else ((16, 128), (32, 128))
    if args.floor:
        common.report(
            args,
            "bench/speed.py --floor",
            "bench/speed.py --floor: the LoRA step against the frozen base's own forward and backward",
            "\n\n".join(
                [floor_part((4, 32) if args.quick else FLOOR_SHAPE, args), common.run_summary(started, load_at_start)]
            ),
        )
        return
    if args.execution:
        common.report(
            args,
            "bench/speed.py --execution",
            "bench/speed.py --execution: compiled and checkpointed steps, ours vs peft",
            "\n\n".join([execution_part(models, train_shape, args), common.run_summary(started, load_at_start)]),
        )
        return
    parts = [
        training_step_part(models, train_shape, args),
        inference_part(models, inference_shape, args),
        memory_part(models, train_shape, args),
        throughput_part(args),
    ]
    common.report(
        args,
        "bench/speed.py",
        "bench/speed.py: LoRA vs peft vs full fine-tuning",
        "\n\n".join([*parts, common.run_summary(started, load_at_start)]),
    )


if __name__ == "__main__":
    main()
