"""LoRA and its refinements side by side on the offline demo: plain LoRA, LoRA+, DoRA, PiSSA, rsLoRA.

    python -m bench.variants [--seeds 42 43 44] [--epochs 1] [--runs-dir runs/bench-variants]
                             [--threads 1] [--repeats 5] [--output PATH] [--report-only]

Part 1, accuracy: ``train.py`` with the demo recipe (MiniLM, bundled AG News, ``--clean --lr 1e-3
--trainable-modules classifier pooler --eval-steps 25``, r=10, alpha=64, dropout 0.1) and the
same number of optimizer steps for every variant, once per seed and variant; the only difference
is the variant's flag. A run whose ``summary.json`` exists is not run again, so an interrupted
benchmark goes on where it stopped and ``--report-only`` tabulates the runs there are.

Part 2, speed, interleaved on one machine: one training micro-batch (forward, backward, AdamW
step; 32 texts x 64 tokens) per variant, and one merged-inference batch per variant with the
adapters the first seed trained (``load_classifier``, merged as predict.py merges them).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

from bench import common
from lora import inject_lora
from lora.classifier import load_classifier, load_classifier_model
from lora.cli.train import main as train_main
from lora.train.loop import TrainConfig, adamw

RECIPE = [
    "--model",
    "minilm",
    "--data",
    "bundled",
    "--clean",
    "--lr",
    "1e-3",
    "--trainable-modules",
    "classifier",
    "pooler",
    "--eval-steps",
    "25",
]
VARIANTS = {  # name -> the train.py flags that make it
    "LoRA": [],
    "LoRA+ (ratio 16)": ["--lora-plus-ratio", "16"],
    "DoRA": ["--dora"],
    "PiSSA": ["--init", "pissa"],
    "rsLoRA": ["--rslora"],
}
KEYWORDS = {  # the same, as inject_lora / TrainConfig keywords, for the timing part
    "LoRA": {},
    "LoRA+ (ratio 16)": {"lora_plus_ratio": 16.0},
    "DoRA": {"dora": True},
    "PiSSA": {"init": "pissa"},
    "rsLoRA": {"rslora": True},
}
BATCH, TOKENS = 32, 64


def run_dir(runs_dir: Path, variant: str, seed: int) -> Path:
    slug = variant.split(" ")[0].lower().replace("+", "plus")
    return runs_dir / f"{slug}-seed{seed}"


def train_all(args) -> None:
    """Part 1: every (seed, variant) run that has no summary yet, seed by seed."""
    for seed in args.seeds:
        for variant, flags in VARIANTS.items():
            folder = run_dir(args.runs_dir, variant, seed)
            if (folder / "summary.json").is_file():
                continue
            print(f"=== {variant}, seed {seed} -> {folder}", file=sys.stderr, flush=True)
            train_main(
                RECIPE
                + flags
                + ["--epochs", str(args.epochs), "--seed", str(seed), "--output-dir", str(folder), "--overwrite"]
            )


def read_runs(args) -> dict[str, list[dict]]:
    import json

    results = {}
    for variant in VARIANTS:
        summaries = [
            json.loads((run_dir(args.runs_dir, variant, seed) / "summary.json").read_text())
            for seed in args.seeds
            if (run_dir(args.runs_dir, variant, seed) / "summary.json").is_file()
        ]
        results[variant] = summaries
    return results


def timing(args, first_seed: int) -> tuple[dict, dict]:
    """Part 2: interleaved training-step and merged-inference times per variant."""
    base = load_classifier_model("minilm", common.LABELS)
    config = TrainConfig()
    steps, inference = {}, {}
    for variant, keywords in KEYWORDS.items():
        torch.manual_seed(0)
        model = load_classifier_model("minilm", common.LABELS)
        model.load_state_dict(base.state_dict())
        settings = {k: v for k, v in keywords.items() if k != "lora_plus_ratio"}
        inject_lora(
            model,
            ("query", "value"),
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            trainable_modules=("classifier", "pooler"),
            **settings,
        )
        optimizer = adamw(model, TrainConfig(lr=1e-3, **keywords))
        batch = common.make_batch(model, BATCH, TOKENS, args.device)
        model.train()

        def step(model=model, optimizer=optimizer, batch=batch) -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[variant] = step
        folder = run_dir(args.runs_dir, variant, first_seed)
        if (folder / "adapter.safetensors").is_file():
            merged = load_classifier(folder, device="cpu", merge=True).model
            inference[variant] = common.inference_step(
                merged, common.make_batch(merged, BATCH, TOKENS, args.device, labels=False), args.device
            )
    print("training steps:", file=sys.stderr)
    step_times = common.interleaved_times(steps, args.device, args.repeats, args.warmup)
    print("merged inference:", file=sys.stderr)
    inference_times = common.interleaved_times(inference, args.device, args.repeats, args.warmup)
    return step_times, inference_times


def table(args, runs: dict[str, list[dict]], step_times: dict, inference_times: dict) -> str:
    rows = []
    for variant, summaries in runs.items():
        accuracies = [100 * s["test"]["accuracy"] for s in summaries]
        f1 = [s["test"]["f1_macro"] for s in summaries]
        if accuracies:
            spread = (
                f"{statistics.stdev(accuracies):.2f} ({min(accuracies):.2f}-{max(accuracies):.2f})"
                if len(accuracies) > 1
                else "-"
            )
            accuracy, f1_cell = f"{statistics.mean(accuracies):.2f}", f"{statistics.mean(f1):.4f}"
            trainable = f"{summaries[0]['trainable_parameters']:,}"
            steps = f"{summaries[0]['steps']}"
            per_step = statistics.median(s["train_seconds"] / s["steps"] for s in summaries)
        else:
            spread = accuracy = f1_cell = trainable = steps = "not run"
            per_step = None
        step_ratio = common.paired_ratio_cell(step_times, variant, "LoRA") if variant in step_times else "-"
        infer_ratio = (
            common.paired_ratio_cell(inference_times, variant, "LoRA")
            if variant in inference_times and "LoRA" in inference_times
            else "-"
        )
        rows.append(
            [
                variant,
                len(accuracies),
                accuracy,
                spread,
                f1_cell,
                trainable,
                steps,
                f"{per_step:.2f}" if per_step else "-",
                step_ratio,
                infer_ratio,
            ]
        )
    return common.markdown_table(
        [
            "variant",
            "seeds",
            "test accuracy % (mean)",
            "std (min-max)",
            "macro F1 (mean)",
            "trainable parameters",
            "optimizer steps",
            "s / step in the runs (median)",
            "training step time / LoRA",
            "merged inference time / LoRA",
        ],
        rows,
    )


def main(argv=None) -> None:
    parser = common.make_parser(__doc__, repeats=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-variants"))
    parser.add_argument(
        "--report-only", action="store_true", help="tabulate the runs already in --runs-dir; train nothing"
    )
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    if not args.report_only:
        train_all(args)
    runs = read_runs(args)
    step_times, inference_times = timing(args, args.seeds[0])
    body = "\n\n".join(
        [
            f"- Recipe: `python train.py {' '.join(RECIPE)} --epochs {args.epochs} --seed SEED` plus the "
            "variant's flag (`--lora-plus-ratio 16`, `--dora`, `--init pissa`, `--rslora`); r=10, "
            "alpha=64, dropout 0.1 on query and value; every variant makes the same optimizer steps. "
            f"Seeds asked for: {' '.join(map(str, args.seeds))}; the `seeds` column says how many of them "
            "each variant has a finished run for. Test: the official 7,600-row split, once per run, with "
            "the best adapter on validation.",
            f"- Step time in the runs: `train_seconds / steps` from each run's summary.json (the runs "
            "ran one after another on a shared machine: indicative only). The ratio columns come from "
            f"part 2, interleaved: one micro-batch of {BATCH} x {TOKENS} tokens (forward, backward, AdamW "
            "step), and one merged-inference forward with the first seed's adapters as predict.py "
            "loads them.",
            table(args, runs, step_times, inference_times),
            common.run_summary(started, load_at_start),
        ]
    )
    common.report(args, "bench/variants.py", "bench/variants.py: LoRA vs LoRA+ vs DoRA vs PiSSA vs rsLoRA", body)


if __name__ == "__main__":
    main()
