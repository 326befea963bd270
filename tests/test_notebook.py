"""The teaching notebook cannot rot: it runs top to bottom in its quick setting (the same code,
a few steps per training run) and shows the numbers that must not change; the committed .ipynb
is its jupytext source, executed in full."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from notebooks.execute import own_kernel

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "notebooks" / "lora_from_scratch.py"
EXECUTED = SOURCE.with_suffix(".ipynb")
QUICK_RUN_TIMEOUT_S = 540  # about 40 s on 2 idle cores; far more on a loaded machine


def stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.timeout(QUICK_RUN_TIMEOUT_S + 30)
def test_the_notebook_runs_in_its_quick_setting_and_shows_the_numbers_that_must_not_change(tmp_path):
    output = tmp_path / "quick.ipynb"
    environment = {**os.environ, "LORA_NOTEBOOK_QUICK": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "notebooks" / "execute.py"),
            "--output",
            str(output),
            "--cell-timeout",
            str(QUICK_RUN_TIMEOUT_S),
        ],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # a failing cell names itself here
    cells = code_cells(nbformat.read(output, as_version=4))
    text = "\n".join(stream_text(cell) for cell in cells)
    assert "quick: True" in text
    assert "trainable: 6,144 = r * (in + out)" in text
    assert "zero-init output equals the base bit for bit: True" in text
    assert "unmerge restores W bit for bit: True" in text
    first = "roberta-base, r=10, alpha=64 on query and value (the course project's recipe)"
    second = "roberta-base, r=8, alpha=8 on query only (the other course project's recipe)"
    assert f"{first}: 962,308 trainable of 125,017,348" in text
    assert f"{second}: 741,124 trainable of 124,796,164" in text
    assert "unmerge restores every pretrained weight bit for bit: True" in text
    must_not_change = json.loads(stream_text(cells[-1]).split("checks them in its quick run):\n", 1)[1])
    assert must_not_change["trainable"] == {
        "r=10, alpha=64 on query and value (the course project's recipe)": 962_308,
        "r=8, alpha=8 on query only (the other course project's recipe)": 741_124,
    }
    assert must_not_change["zero_init_equal"] and must_not_change["restored"]
    assert 0 <= must_not_change["merge_gap"] < 1e-4  # float rounding of a merged vs unmerged forward
    assert text.count("rank90") >= 1 and "phi(1,1)" in text and "slope of delta_M on delta_D" in text
    images = [o for cell in cells for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # loss curve, updates per layer, similarity heatmaps, magnitude/direction


def test_the_committed_notebook_is_its_source_executed_in_full():
    source, executed = jupytext.read(SOURCE), nbformat.read(EXECUTED, as_version=4)
    assert [(c.cell_type, c.source) for c in source.cells] == [(c.cell_type, c.source) for c in executed.cells]
    cells = code_cells(executed)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))  # one run, in order
    assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    assert "quick: False" in stream_text(cells[0])
    assert executed.metadata.kernelspec.name == "python3"


def test_the_kernel_is_this_python_whatever_kernelspecs_are_installed(tmp_path, monkeypatch):
    bogus = tmp_path / "kernels" / "python3"
    bogus.mkdir(parents=True)
    (bogus / "kernel.json").write_text(
        json.dumps(
            {"argv": ["/bin/false", "{connection_file}"], "display_name": "another Python", "language": "python"}
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before every other kernelspec folder
    assert own_kernel().kernel_spec.argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]
