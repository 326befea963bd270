"""``python predict.py ...`` is ``lora-predict ...``: the command lives in ``lora/cli/predict.py``."""

from lora.cli.predict import run

if __name__ == "__main__":
    run()
