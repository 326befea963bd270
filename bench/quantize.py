"""A quantized frozen base (lora/quantize.py): float32 vs int8 vs nf4 vs nf4 + double quant.

    python -m bench.quantize [--device auto|cpu|cuda] [--quick] [--repeats N] [--threads N]
    python -m bench.quantize --accuracy [--accuracy-runs DIR]      # part 3 alone (long)

1. Bytes of the quantized base weights (every frozen encoder Linear), roberta-base shape
   (random weights) and MiniLM. Goal: nf4 <= 0.16 x float32.
2. Peak training memory, each variant in a fresh process (the method of bench/speed.py), and
   seconds per training step, variants interleaved; batch 16 x 128 (4 x 32 with --quick); also
   float32 and nf4 with activation checkpointing (``--gradient-checkpointing``), and full
   fine-tuning for reference. Goals: every quantized run's peak below the float32 LoRA run's;
   nf4 + checkpointing's peak <= 0.30 x full fine-tuning's; int8 and nf4 steps <= 1.3 x float32's.
3. With ``--accuracy`` (its own section: four whole training runs take a while): offline test
   accuracy of MiniLM on the bundled AG News with the demo recipe, one run per variant
   (``--accuracy-runs DIR`` reads ``DIR/<variant>/summary.json`` of runs made with the
   ``train.py`` commands in the table instead of training here). Goal: nf4 within 0.5 points
   of float32.
LoRA everywhere: r=10, alpha=64, dropout 0, on query and value, classifier head trainable.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import common
from bench.common import Setup, markdown_table, paired_ratio_cell, ratio_cell
from lora.quantize import QuantizedLinear
from lora.train.loop import TrainConfig, train

LORA = dict(r=TrainConfig.r, alpha=TrainConfig.alpha)  # the course project's recipe (TrainConfig's defaults)
VARIANTS = {"float32": None, "int8": "int8", "nf4": "nf4", "nf4+dq": "nf4+dq"}
TARGET_NF4_BYTES = 0.16
# Part 2 only: the bases above and these, each as Setup options; full fine-tuning is the reference.
TRAINING_VARIANTS = {
    **{variant: dict(quantize=quantize) for variant, quantize in VARIANTS.items()},
    "float32+ckpt": dict(checkpointing=True),
    "nf4+ckpt": dict(quantize="nf4", checkpointing=True),
}
TARGET_CHECKPOINTED_NF4_VS_FULL = 0.30  # peak memory
TARGET_QUANTIZED_STEP = 1.3  # int8 and nf4 step time over float32's
TARGET_ACCURACY_POINTS = 0.5
# The offline demo's recipe when part 3 was first run (another was chosen later for make
# train, see bench/recipes.py): kept so that part 3 stays comparable; each variant adds its flags.
DEMO = dict(
    model="minilm",
    data="bundled",
    clean=True,
    epochs=2,
    lr=1e-3,
    trainable_modules=("classifier", "pooler"),
    eval_steps=25,
)
DEMO_COMMAND = (
    "python train.py --model minilm --data bundled --clean --epochs 2 --lr 1e-3 "
    "--trainable-modules classifier pooler --eval-steps 25"
)
FLAGS = {
    None: "",
    "int8": " --quantize-base int8",
    "nf4": " --quantize-base nf4",
    "nf4+dq": " --quantize-base nf4 --double-quant",
}


def weights_part(models) -> str:
    """1: bytes of the quantized layers per scheme, against float32 and float16."""
    rows = []
    for name in models:
        stored = {}
        for variant, quantize in VARIANTS.items():
            if quantize is None:
                continue
            model = common.build(Setup(name, "ours", 1, 1, quantize=quantize, **LORA))
            layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
            stored[variant] = sum(layer.storage_bytes() for layer in layers)
            weights = sum(layer.in_features * layer.out_features for layer in layers)
        float32 = 4 * weights
        rows.append(
            [
                name,
                len(layers),
                f"{weights / 1e6:.2f}M",
                f"{float32 / 1e6:.1f}",
                f"{float32 / 2e6:.1f}",
                *(f"{stored[v] / 1e6:.1f} ({8 * stored[v] / weights:.3f} bits)" for v in stored),
                ratio_cell(stored["nf4"] / float32, TARGET_NF4_BYTES),
            ]
        )
    return "### 1. Stored base weights (MB = 10^6 bytes), the quantized Linear layers only\n\n" + markdown_table(
        [
            "model",
            "Linear layers",
            "weights",
            "float32 MB",
            "float16 MB",
            "int8 MB",
            "nf4 MB",
            "nf4+dq MB",
            "nf4 / float32",
        ],
        rows,
    )


def training_part(models, shape, args) -> str:
    """2: peak memory per variant in fresh processes, then interleaved step times."""
    memory_rows, time_rows = [], []
    for name in models:
        setups = {
            variant: Setup(name, "ours", *shape, **options, **LORA) for variant, options in TRAINING_VARIANTS.items()
        }
        full = Setup(name, "full", *shape, **LORA)
        # Each measurement is its own fresh process, so running a few at once changes no peak.
        with ThreadPoolExecutor(args.memory_processes) as pool:
            peaks = pool.map(lambda setup: common.measure_training_memory(setup, args.device), [*setups.values(), full])
            memory = dict(zip([*setups, "full FT"], peaks))
        for variant in [*TRAINING_VARIANTS, "full FT"]:
            below = memory[variant]["peak"] < memory["float32"]["peak"]
            verdict = " PASS" if below else " MISS"
            if variant in ("float32", "full FT") or not TRAINING_VARIANTS[variant].get("quantize"):
                verdict = ""
            versus_full = memory[variant]["peak"] / memory["full FT"]["peak"]
            memory_rows.append(
                [
                    name,
                    variant,
                    *(f"{memory[variant][key]:.0f}" for key in ("loaded", "peak", "increase")),
                    f"{memory[variant]['peak'] / memory['float32']['peak']:.3f}{verdict}",
                    ratio_cell(versus_full, TARGET_CHECKPOINTED_NF4_VS_FULL)
                    if variant == "nf4+ckpt"
                    else f"{versus_full:.3f}",
                ]
            )
        if args.skip_timing:
            continue
        times = common.interleaved_times(
            common.build_training_steps(setups, args.device), args.device, args.repeats, args.warmup
        )
        step = common.medians(times)
        time_rows += [
            [
                name,
                variant,
                f"{step[variant]:.3f}",
                ""
                if variant == "float32"
                else paired_ratio_cell(
                    times, variant, "float32", TARGET_QUANTIZED_STEP if variant in ("int8", "nf4") else None
                ),
            ]
            for variant in TRAINING_VARIANTS
        ]
    memory = (
        f"### 2. Training, batch {shape[0]} x {shape[1]} tokens\n\n"
        f"{common.memory_note(args.device)} Goals: a quantized base's peak below float32's "
        f"(ratio < 1); nf4 with activation checkpointing (`+ckpt`: `--gradient-checkpointing`) "
        f"at most {TARGET_CHECKPOINTED_NF4_VS_FULL} x full fine-tuning's.\n\n"
        + markdown_table(
            ["model", "base", "loaded MiB", "peak MiB", "increase MiB", "peak / float32", "peak / full FT"], memory_rows
        )
    )
    if args.skip_timing:
        return memory + "\n\nStep times: not measured in this run (`--skip-timing`)."
    return (
        memory + "\n\nSeconds per training step (forward, backward, AdamW step); goal: int8 and "
        f"nf4 at most {TARGET_QUANTIZED_STEP} x float32's:\n\n"
        + markdown_table(["model", "base", "s / step", "time / float32"], time_rows)
    )


def accuracy_part(args) -> str:
    """3: MiniLM test accuracy per variant, trained here or read from ``--accuracy-runs``."""
    summaries = {}
    for variant, quantize in VARIANTS.items():
        if args.accuracy_runs is not None:
            path = args.accuracy_runs / variant.replace("+", "-") / "summary.json"
            summaries[variant] = json.loads(path.read_text())
        else:
            scheme, _, double_quant = (quantize or "").partition("+")
            summaries[variant] = train(
                TrainConfig(
                    **DEMO,
                    quantize_base=scheme or None,
                    double_quant=double_quant == "dq",
                    max_steps=2 if args.quick else None,
                    output_dir=str(args.runs_dir / variant.replace("+", "-")),
                    overwrite=True,
                )
            )
    baseline = 100 * summaries["float32"]["test"]["accuracy"]
    rows = []
    for variant, summary in summaries.items():
        accuracy = 100 * summary["test"]["accuracy"]
        gap = baseline - accuracy
        verdict = "" if variant == "float32" else " PASS" if gap <= TARGET_ACCURACY_POINTS else " MISS"
        rows.append(
            [
                variant,
                f"`{DEMO_COMMAND}{FLAGS[VARIANTS[variant]]}`",
                summary["steps"],
                f"{accuracy:.2f}",
                f"{-gap:+.2f}{verdict}",
                f"{summary['examples_per_second']:.1f}",
            ]
        )
    source = f"read from `{args.accuracy_runs}`" if args.accuracy_runs is not None else "trained by this script"
    return (
        "### 3. MiniLM test accuracy on the bundled AG News (7,600 test rows), demo recipe\n\n"
        f"Runs {source}; goal for the quantized bases: within {TARGET_ACCURACY_POINTS} points "
        "of float32 (MISS when further below).\n\n"
        + markdown_table(
            ["base", "command", "steps", "test accuracy %", "points vs float32", "train examples / s"], rows
        )
    )


def main(argv=None) -> None:
    parser = common.make_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--skip-timing", action="store_true", help="part 2: peak memory only")
    parser.add_argument(
        "--memory-processes",
        type=int,
        default=1,
        help="memory measurements run at once, each in its own process (default: %(default)s)",
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="part 3 only: MiniLM test accuracy per base, demo recipe (its own section)",
    )
    parser.add_argument(
        "--accuracy-runs", type=Path, default=None, help="read part 3 from DIR/{float32,int8,nf4,nf4-dq}/summary.json"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs/bench-quantize"),
        help="where part 3 trains when --accuracy-runs is not given (default: %(default)s)",
    )
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    if args.accuracy:
        common.report(
            args,
            "bench/quantize.py --accuracy",
            "bench/quantize.py --accuracy: MiniLM test accuracy on a quantized base",
            "\n\n".join([accuracy_part(args), common.run_summary(started, load_at_start)]),
            device_line="CPU, float32; one training run per base",
        )
        return
    models = ("roberta-tiny" if args.quick else "roberta-base", "minilm")
    shape = (4, 32) if args.quick else (16, 128)
    parts = [weights_part(models), training_part(models, shape, args)]
    common.report(
        args,
        "bench/quantize.py",
        "bench/quantize.py: a quantized frozen base (QLoRA)",
        "\n\n".join([*parts, common.run_summary(started, load_at_start)]),
    )


if __name__ == "__main__":
    main()
