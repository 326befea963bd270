"""Where a result came from: the package version, the git commit of the code that ran, and the
torch and transformers versions. Training writes them into ``summary.json`` and
``adapter_config.json`` (under ``"provenance"``); inference warns when an adapter was written by
another major version of the package.
"""
import subprocess
from pathlib import Path

import torch
import transformers

from . import __version__

# The top of the checkout when the package runs from one (an editable install, the repository).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = SOURCE_ROOT) -> dict:
    """``{"git_commit": sha, "git_dirty": bool}`` when ``root`` is the top of a git checkout,
    dirty meaning tracked files differ from that commit; ``{}`` anywhere else (an installed
    package, a folder inside some other repository, no git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return {}
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": git("status", "--porcelain", "--untracked-files=no") != ""}
    except (OSError, subprocess.SubprocessError):
        return {}


def provenance() -> dict:
    """The versions and commit that produced a run, as recorded next to its results. Plain
    strings only (``torch.__version__`` is a ``TorchVersion``, which ``torch.load`` with
    ``weights_only=True`` refuses), so anything holding them stays loadable."""
    return {"lora_version": __version__, **git_state(),
            "torch": str(torch.__version__), "transformers": str(transformers.__version__)}


def version_warning(adapter_config: dict) -> str | None:
    """One line when the adapter was written by another major version of this package;
    ``None`` when the major versions agree or the adapter does not say (written before 0.3)."""
    trained = (adapter_config.get("provenance") or {}).get("lora_version")
    if trained is None or trained.split(".")[0] == __version__.split(".")[0]:
        return None
    return (f"this adapter was trained with lora {trained} and this is lora {__version__}, "
            "another major version: its files may not be read as they were meant")
