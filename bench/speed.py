"""This project's LoRA against peft's LoRA and full fine-tuning: speed, latency, memory.

    python -m bench.speed [--device auto|cpu|cuda] [--quick] [--repeats N] [--warmup N]

1a. Seconds per training step at one padded batch (16 x 128): ours, peft, full fine-tuning,
    on a random-weight roberta-base shape and on MiniLM. Targets: ours/peft <= 1.00,
    ours/full <= 0.70.
1b. Inference latency of one batch (32 x 128): base model, LoRA unmerged, LoRA merged.
    Target: merged/base <= 1.02.
1c. Peak memory of training steps, each variant in a fresh process. Targets: ours <= 0.6 x full,
    ours <= peft.
LoRA everywhere: r=10, alpha=64, dropout 0, on query and value, classifier head trainable.
"""
import time

from bench import common
from bench.common import Setup, markdown_table, paired_ratio_cell, ratio_cell
from lora import merge_lora

LORA = dict(r=10, alpha=64.0)
TRAIN_VARIANTS = ("ours", "peft", "full")
INFERENCE_VARIANTS = ("base", "unmerged", "merged")
TARGET_OURS_VS_PEFT = 1.00
TARGET_OURS_VS_FULL_TIME = 0.70
TARGET_MERGED_VS_BASE = 1.02
TARGET_OURS_VS_FULL_MEMORY = 0.60


def training_step_part(models, shape, args) -> str:
    """1a: median seconds per training step of each variant, interleaved, per model."""
    rows = []
    for name in models:
        setups = {variant: Setup(name, variant, *shape, **LORA) for variant in TRAIN_VARIANTS}
        steps = common.build_training_steps(setups, args.device, common.build_base_model(name))
        times = common.interleaved_times(steps, args.device, args.repeats, args.warmup)
        seconds = common.medians(times)
        rows.append([name, *(f"{seconds[v]:.3f}" for v in TRAIN_VARIANTS),
                     paired_ratio_cell(times, "ours", "peft", TARGET_OURS_VS_PEFT),
                     paired_ratio_cell(times, "ours", "full", TARGET_OURS_VS_FULL_TIME)])
    return (f"### 1a. Training step, batch {shape[0]} x {shape[1]} tokens\n\n"
            "Forward, backward, AdamW step, `zero_grad(set_to_none=True)`; seconds per step.\n\n"
            + markdown_table(["model", "ours s", "peft s", "full FT s", "ours / peft",
                              "ours / full FT"], rows))


def inference_steps(name, shape, device) -> dict:
    """Inference step functions of the base model and of our LoRA model unmerged and merged."""
    base = common.build_base_model(name)
    models = {variant: common.build(Setup(name, "base" if variant == "base" else "ours",
                                          *shape, **LORA), base)
              for variant in INFERENCE_VARIANTS}
    merge_lora(models["merged"])
    return {variant: common.inference_step(model, common.make_batch(model, *shape, device,
                                                                    labels=False), device)
            for variant, model in models.items()}


def inference_part(models, shape, args) -> str:
    """1b: median latency of one eval-mode batch for base, unmerged and merged, per model."""
    rows = []
    for name in models:
        times = common.interleaved_times(inference_steps(name, shape, args.device), args.device,
                                         args.repeats, args.warmup)
        seconds = common.medians(times)
        rows.append([name, *(f"{1000 * seconds[v]:.1f}" for v in INFERENCE_VARIANTS),
                     paired_ratio_cell(times, "unmerged", "base"),
                     paired_ratio_cell(times, "merged", "base", TARGET_MERGED_VS_BASE)])
    return (f"### 1b. Inference latency, batch {shape[0]} x {shape[1]} tokens\n\n"
            "One forward under `torch.inference_mode()` in eval mode; milliseconds per batch. "
            "Merged: `merge_lora` folded the update into the weights.\n\n"
            + markdown_table(["model", "base ms", "LoRA unmerged ms", "LoRA merged ms",
                              "unmerged / base", "merged / base"], rows))


def memory_part(models, shape, args) -> str:
    """1c: peak training memory per variant (each in a fresh process) and the target ratios."""
    rows, ratio_rows = [], []
    for name in models:
        memory = {variant: common.measure_training_memory(Setup(name, variant, *shape, **LORA),
                                                          args.device)
                  for variant in TRAIN_VARIANTS}
        rows += [[name, variant, *(f"{memory[variant][key]:.0f}"
                                   for key in ("loaded", "peak", "increase"))]
                 for variant in TRAIN_VARIANTS]
        for key, label in (("increase", "increase over loaded"), ("peak", "absolute peak")):
            ours, peft, full = (memory[variant][key] for variant in TRAIN_VARIANTS)
            ratio_rows.append([name, label, ratio_cell(ours / full, TARGET_OURS_VS_FULL_MEMORY),
                               ratio_cell(ours / peft, TARGET_OURS_VS_PEFT)])
    return (f"### 1c. Peak training memory, batch {shape[0]} x {shape[1]} tokens\n\n"
            f"{common.memory_note(args.device)}\n\n"
            + markdown_table(["model", "variant", "loaded MiB", "peak MiB", "increase MiB"], rows)
            + "\n\n"
            + markdown_table(["model", "measure", "ours / full FT", "ours / peft"], ratio_rows))


def main(argv=None) -> None:
    parser = common.make_parser(__doc__.splitlines()[0], repeats=5)
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    models = ("roberta-tiny" if args.quick else "roberta-base", "minilm")
    train_shape, inference_shape = ((4, 32), (4, 32)) if args.quick else ((16, 128), (32, 128))
    parts = [training_step_part(models, train_shape, args),
             inference_part(models, inference_shape, args),
             memory_part(models, train_shape, args)]
    # ==========================================================================================
    # PART 2 GOES HERE: training throughput on real AG News lengths, this project's training
    # loop vs peft + transformers.Trainer. Not written yet (it needs the training loop); its
    # table is appended to `parts` so that it lands in this script's BENCHMARKS.md section.
    # ==========================================================================================
    common.report(args, "bench/speed.py", "bench/speed.py: LoRA vs peft vs full fine-tuning",
                  "\n\n".join([*parts, common.run_summary(started, load_at_start)]))


if __name__ == "__main__":
    main()
