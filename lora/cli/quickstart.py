"""What ``make train`` runs: the seeds' roberta-base job where it can run, else the offline demo.

    make train                       # python -m lora.cli.quickstart
    make train ARGS="--epochs 1"     # extra train.py flags, appended: they win over the chosen ones

roberta-base on the full AG News needs a CUDA GPU (it takes hours on a CPU) and the Hugging Face
hub (its weights and the data). Anywhere else the demo trains the pip-packaged all-MiniLM-L6-v2
on the AG News copy shipped in the package. One line says which job runs and why; the job is
``python train.py`` with the flags it prints.
"""
import sys

import torch

from lora.backbone import hub_reachable
from lora.cli import train
from lora.config import TrainConfig
from lora.errors import run_command

# The seeds' recipe: TrainConfig's defaults, spelled out so the printed command shows them.
FULL_JOB = ["--r", str(TrainConfig.r), "--alpha", f"{TrainConfig.alpha:g}"]
OFFLINE_DEMO = ["--model", "minilm", "--data", "bundled", "--clean", "--epochs", "2", "--lr", "1e-3",
                "--trainable-modules", "classifier", "pooler", "--eval-steps", "25"]


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
