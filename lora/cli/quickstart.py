"""What ``make train`` runs: the roberta-base job where it can run, else the offline demo.

    make train                       # python -m lora.cli.quickstart
    make train ARGS="--epochs 1"     # extra train.py flags, appended: they win over the chosen ones

roberta-base on the full AG News needs a CUDA GPU (it takes hours on a CPU) and the Hugging Face
hub (its weights and the data). Anywhere else the demo trains the pip-packaged all-MiniLM-L6-v2
on the AG News copy shipped in the package. One line says which job runs and why; the job is
``python train.py`` with the flags it prints.
"""

import sys

import torch

from lora.classifier import hub_reachable
from lora.cli import run_command, train
from lora.train.config import TrainConfig

# The course project's recipe: TrainConfig's defaults, spelled out so the printed command shows them.
FULL_JOB = ["--r", str(TrainConfig.r), "--alpha", f"{TrainConfig.alpha:g}"]
# The offline demo's recipe, chosen by bench/recipes.py (BENCHMARKS.md): r=8 on every attention and
# feed-forward Linear, 3 epochs of batch 32, no early stop (--patience 10 > the run's 9 evaluations:
# 248 validation rows are too few to stop on); the best of the recipes tried there within 10 minutes.
OFFLINE_DEMO = [
    "--model",
    "minilm",
    "--data",
    "bundled",
    "--clean",
    "--trainable-modules",
    "classifier",
    "pooler",
    "--epochs",
    "3",
    "--lr",
    "1e-3",
    "--grad-accum",
    "1",
    "--eval-steps",
    "50",
    "--r",
    "8",
    "--alpha",
    "16",
    "--target-modules",
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
    "--patience",
    "10",
]


def choose_job(cuda: bool, hub: bool) -> tuple[list[str], str]:
    """The train.py flags of the job to run, and why that one."""
    if cuda and hub:
        return FULL_JOB, "a CUDA GPU and the Hugging Face hub, so roberta-base on the full AG News"
    reason = "no CUDA GPU" if not cuda else "a CUDA GPU but no Hugging Face hub (out of reach or HF_HUB_OFFLINE)"
    return OFFLINE_DEMO, f"{reason}, so the offline demo (MiniLM on the bundled AG News)"


def main(argv: list[str] | None = None) -> None:
    extra = sys.argv[1:] if argv is None else argv
    cuda = torch.cuda.is_available()
    flags, reason = choose_job(cuda, cuda and hub_reachable())  # no GPU: no need to wait on the network
    print(f"make train: {reason}: python train.py {' '.join(flags + extra)}", flush=True)
    train.main(flags + extra)


def run() -> None:
    run_command(main)


if __name__ == "__main__":
    run()
