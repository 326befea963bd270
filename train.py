"""``python train.py ...`` is ``lora-train ...``: the command lives in ``lora/cli/train.py``."""

from lora.cli.train import run

if __name__ == "__main__":
    run()
