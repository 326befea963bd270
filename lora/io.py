"""Files that are never half-written: write to a temporary name, then rename over the real one."""
import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temporary_path)``, then rename over ``path``: readers never see half a file,
    and a crash or Ctrl-C in the middle leaves the previous version in place."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)
