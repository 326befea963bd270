"""Data-parallel training throughput: 1 vs 2 gloo processes on MiniLM (CPU), one thread each.

    HF_HUB_OFFLINE=1 python -m bench.distributed [--repeats 3] [--steps 12] [--output BENCHMARKS.md]

Each round runs ``torchrun --nproc_per_node N -- train.py`` for N = 1 and 2 (interleaved), with
``OMP_NUM_THREADS=1`` per process, the bundled training rows and the same per-process batch, and
reads the training throughput (examples of all processes per second of training, evaluation
excluded) from the run's ``summary.json``. Scaling efficiency = (2-process ex/s) / (2 x 1-process ex/s).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.common import (
    BENCHMARKS_MD,
    REPO_ROOT,
    _replace_section,
    load_average,
    load_line,
    markdown_table,
    usable_cores,
)
from lora.data import BUNDLED_DIR

SCRIPT = "bench/distributed.py"


def small_test_copy(folder: Path) -> Path:
    """The bundled training rows with a 100-row test split: the final test pass is not what is timed."""
    pd.read_csv(BUNDLED_DIR / "train.csv").to_csv(folder / "train.csv", index=False)
    pd.read_csv(BUNDLED_DIR / "test.csv").head(100).to_csv(folder / "test.csv", index=False)
    return folder


def throughput(processes: int, data: Path, steps: int, batch_size: int, folder: Path) -> float:
    out = folder / f"run-{processes}-{time.monotonic_ns()}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--",
        str(REPO_ROOT / "train.py"),
        "--model",
        "minilm",
        "--data",
        str(data),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "1",
        "--eval-steps",
        str(10 * steps),
        "--val-size",
        "0.02",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, capture_output=True, env=env)
    return json.loads((out / "summary.json").read_text())["examples_per_second"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="examples per process per step (default: %(default)s)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help=f"write the section into this file (e.g. {BENCHMARKS_MD.name})"
    )
    args = parser.parse_args(argv)
    started, load_start = time.perf_counter(), load_average()
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        data = small_test_copy(Path(folder))
        for _ in range(args.repeats):
            for processes in results:
                results[processes].append(throughput(processes, data, args.steps, args.batch_size, Path(folder)))
    one, two = (statistics.median(results[n]) for n in (1, 2))
    table = markdown_table(
        ["processes", "examples/s (median)", "per round", "speed-up", "scaling efficiency"],
        [
            [1, f"{one:.1f}", ", ".join(f"{v:.1f}" for v in results[1]), "1.00", "1.00"],
            [2, f"{two:.1f}", ", ".join(f"{v:.1f}" for v in results[2]), f"{two / one:.2f}", f"{two / (2 * one):.2f}"],
        ],
    )
    section = "\n".join(
        [
            f"<!-- BEGIN {SCRIPT} -->",
            "## Several processes (torchrun + DDP, gloo on CPU)",
            "",
            f"- Command: `HF_HUB_OFFLINE=1 python -m bench.distributed --repeats {args.repeats} --steps {args.steps} "
            f"--batch-size {args.batch_size}`",
            f"- What runs: `torchrun --nproc_per_node N -- train.py --model minilm` on the bundled rows, "
            f"{args.steps} steps of {args.batch_size} examples per process (so 2 processes train a 2x larger "
            "effective batch), one thread per process (`OMP_NUM_THREADS=1`); examples/s of all processes "
            "per second of training, from `summary.json`; medians of interleaved rounds",
            f"- Machine: {usable_cores()} CPU cores; {load_line(load_start, load_average())}; "
            f"whole run {(time.perf_counter() - started) / 60:.1f} min",
            "",
            table,
            "",
            "Two processes on two shared CPU cores are not two GPUs: they contend for memory bandwidth and "
            "the gloo all-reduce goes through the CPU. On GPUs the all-reduce carries only the adapter's and "
            "the head's gradients (962,308 numbers, 3.8 MB for roberta-base at r=10), small next to a RoBERTa "
            "step; no GPU machine was lent to this task, so NCCL and the CUDA path were not measured.",
            f"<!-- END {SCRIPT} -->",
        ]
    )
    print(section)
    if args.output:
        _replace_section(args.output, SCRIPT, section)


if __name__ == "__main__":
    main()
