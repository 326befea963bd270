"""``python serve.py ...`` is ``lora-serve ...``: the command lives in ``lora/cli/serve.py``."""

from lora.cli.serve import run

if __name__ == "__main__":
    run()
