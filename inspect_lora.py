"""``python inspect_lora.py ...`` is ``lora-inspect ...``: the command lives in ``lora/cli/inspect_lora.py``."""

from lora.cli.inspect_lora import run

if __name__ == "__main__":
    run()
