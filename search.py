"""``python search.py ...`` is ``lora-search ...``: the command lives in ``lora/cli/search.py``."""

from lora.cli.search import run

if __name__ == "__main__":
    run()
