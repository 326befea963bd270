"""The package's shape: the core flat in ``lora/``, the jobs in sub-packages, the command lines in
``lora/cli``. Imports run one way only (core -> jobs -> command lines), without cycles; the
library never touches matplotlib's backend, never imports argparse and never raises the command
line's error; every command-line module runs with ``python -m``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora"
REPO = PACKAGE.parent
# Which layer each part of the package is, and what it may import from the package.
JOBS = ("train", "search", "serve")
MAY_IMPORT = {
    "core": {"core"},
    "train": {"core", "train"},
    "search": {"core", "train", "search"},
    "serve": {"core", "serve"},
    "cli": {"core", *JOBS, "cli"},
}
MAX_CORE_MODULES = 10


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """``lora.model`` -> core, ``lora.train.loop`` -> train, ``lora.cli.train`` -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in (*JOBS, "cli")) else "core"


def imported_lora_modules(path: Path) -> set[str]:
    """The ``lora`` modules a file imports at module level or in a function, resolved to names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lora"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "lora":
                continue
            for alias in node.names:  # "from lora import cli" imports the module lora.cli
                candidate = f"{base}.{alias.name}"
                found.add(
                    candidate
                    if (REPO / Path(*candidate.split("."))).with_suffix(".py").exists()
                    or (REPO / Path(*candidate.split(".")) / "__init__.py").exists()
                    else base
                )
    return found


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_core_is_at_most_ten_modules_and_the_jobs_are_sub_packages():
    core = [path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"]
    assert len(core) <= MAX_CORE_MODULES, sorted(core)
    assert {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()} == {*JOBS, "cli"}


def test_imports_run_from_the_core_to_the_jobs_to_the_command_lines_never_back():
    wrong = []
    for name, path in modules().items():
        for target in imported_lora_modules(path):
            if target == "lora" and name != "lora":  # the package's public list is the core's
                target = "lora.layer"
            if layer(target) not in MAY_IMPORT[layer(name)]:
                wrong.append(f"{name} ({layer(name)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {
        name: {target for target in imported_lora_modules(path) if target in modules()}
        for name, path in modules().items()
    }
    for name in graph:
        graph[name].discard(name)
    visiting, done, cycles = set(), set(), []

    def visit(name: str, trail: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append(" -> ".join(trail[trail.index(name) :] + [name]))
            return
        visiting.add(name)
        for target in sorted(graph[name]):
            if target.startswith(name + "."):  # a package importing its own modules in __init__
                continue
            visit(target, trail + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
    assert not cycles, cycles


def test_the_library_outside_the_command_lines_uses_no_argparse_and_not_their_error():
    offenders = []
    for name, path in modules().items():
        if layer(name) == "cli":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    offenders.append(f"{name} imports argparse")
            if isinstance(node, ast.Name) and node.id == "UsageError":
                offenders.append(f"{name} uses UsageError")
    assert not offenders, offenders


@pytest.mark.timeout(120)
def test_importing_the_library_leaves_matplotlibs_backend_as_it_was():
    library = [name for name in modules() if layer(name) != "cli"]
    script = (
        "import importlib, matplotlib\nmatplotlib.use('svg')\n"
        f"for name in {library!r}:\n    importlib.import_module(name)\n"
        "print(matplotlib.get_backend())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=110,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"


@pytest.mark.timeout(120)
def test_every_command_line_module_runs_with_python_m():
    """``python -m lora.cli.X --help`` for every X, in one process: ``runpy`` is what ``-m`` runs."""
    commands = sorted(name for name in modules() if layer(name) == "cli" and name != "lora.cli")
    script = (
        "import contextlib, io, runpy, sys\n"
        f"for command in {commands!r}:\n"
        "    sys.argv = [command, '--help']\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            runpy.run_module(command, run_name='__main__', alter_sys=True)\n"
        "        except SystemExit as stop:\n"
        "            assert stop.code in (0, None), (command, stop.code)\n"
        "    assert 'usage:' in out.getvalue(), (command, out.getvalue()[:200])\n"
        "    print(command)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=110,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == commands
