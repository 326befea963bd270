"""Run the teaching notebook top to bottom and write it with its outputs.

    python notebooks/execute.py                       # full run -> notebooks/lora_from_scratch.ipynb
    LORA_NOTEBOOK_QUICK=1 python notebooks/execute.py --output /tmp/quick.ipynb   # what the tests run

The source is the paired ``notebooks/lora_from_scratch.py`` (jupytext percent format). The kernel
is this Python's own ipykernel (``sys.executable``), found without any installed kernelspec, so a
fresh virtual environment with the ``dev`` extra runs it as it is.
"""

import argparse
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
SOURCE = NOTEBOOKS / "lora_from_scratch.py"
CELL_TIMEOUT_S = 900  # the whole full run must fit in 15 minutes on 2 cores; no cell may take more


def own_kernel() -> KernelManager:
    """A manager for ipykernel on this very Python. ``kernel_dirs=[]``: no kernelspec from the
    user's, the environment's or the system's folders (one named python3 could point at another
    Python); "python3" is then the native kernel, ``sys.executable -m ipykernel_launcher``."""
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def execute(source: Path, output: Path, cell_timeout: int = CELL_TIMEOUT_S) -> float:
    """Execute ``source`` in a fresh kernel, from the repository root; write ``output``.
    Returns the wall time in seconds (kernel start included)."""
    notebook = jupytext.read(source)
    client = NotebookClient(
        notebook,
        km=own_kernel(),
        timeout=cell_timeout,
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS.parent)}},
    )
    started = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - started
    nbformat.write(notebook, output)
    return elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(SOURCE.with_suffix(".ipynb")), help="the executed .ipynb")
    parser.add_argument("--cell-timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell")
    args = parser.parse_args(argv)
    elapsed = execute(SOURCE, Path(args.output), args.cell_timeout)
    print(f"executed {SOURCE.name} in {elapsed:.0f} s -> {args.output} (python: {sys.executable})")


if __name__ == "__main__":
    main()
