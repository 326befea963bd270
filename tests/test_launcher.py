"""Under the real launcher: ``torchrun`` with 2 gloo processes on CPU, stopped by SIGTERM (kill,
scancel, preemption) and with a worker killed outright (``--max-restarts 1`` + ``--resume auto``).
Each case must end with the adapter, optimizer and records of the uninterrupted run, bit for bit:
every run here is the same computation (2 processes, 1 thread each, as torchrun sets)."""

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_same_run, processes_mentioning, run_process_group

pytestmark = pytest.mark.timeout(300)

ENTRY = Path(__file__).with_name("train_with_faults.py")
LAUNCH_TIMEOUT = 120  # one torchrun of the tiny model: about 10 s on 2 idle cores


def torchrun(model_dir, data_dir, output_dir, fault=None):
    """``torchrun --standalone --nproc_per_node 2 --max-restarts 1 -- train.py ... --resume auto``."""
    env = {**os.environ, "PYTHONPATH": str(ENTRY.parent.parent), "LORA_TEST_FAULT": fault or ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.2",
        "--",
        str(ENTRY),
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--output-dir",
        str(output_dir),
        "--resume",
        "auto",
        "--r",
        "4",
        "--alpha",
        "8",
        "--lr",
        "5e-3",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--max-steps",
        "8",
        "--eval-steps",
        "3",
        "--log-steps",
        "1",
        "--max-length",
        "32",
        "--val-size",
        "0.1",
        "--warmup-ratio",
        "0",
        "--metric",
        "loss",
    ]
    return run_process_group(command, LAUNCH_TIMEOUT, env=env)


@pytest.fixture(scope="module")
def launched(tiny_model_dir, noisy_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    return {
        name: (root / name, torchrun(tiny_model_dir, noisy_data_dir, root / name, fault))
        for name, fault in [("straight", None), ("killed", "kill-rank1@5"), ("sigterm", "sigterm-launcher@5")]
    }


def test_an_uninterrupted_run_under_torchrun(launched):
    out, result = launched["straight"]
    assert result.returncode == 0, result.stdout[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["step"] == 8


def test_a_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(launched):
    out, result = launched["killed"]
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resuming at step 3 of 8" in result.stdout  # the restarted group found the step-3 checkpoint
    assert_same_run(out, launched["straight"][0])


def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_and_resume_auto_finishes_the_run(
    launched, tiny_model_dir, noisy_data_dir
):
    out, result = launched["sigterm"]
    assert result.returncode != 0 and "SIGTERM: stopping after this step" in result.stdout, result.stdout[-3000:]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["step"] == 5  # the step it was in, not the last evaluation's (3)
    assert processes_mentioning(str(out)) == []  # no stray worker
    resumed = torchrun(tiny_model_dir, noisy_data_dir, out)  # the same command again
    assert resumed.returncode == 0 and "resuming at step 5 of 8" in resumed.stdout, resumed.stdout[-3000:]
    assert_same_run(out, launched["straight"][0])
