"""``python export.py ...`` is ``lora-export ...``: the command lives in ``lora/cli/export.py``."""

from lora.cli.export import run

if __name__ == "__main__":
    run()
