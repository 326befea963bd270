"""``train.py`` with one planted fault, for tests/test_launcher.py (run as a script, never imported).

    LORA_TEST_FAULT=kill-rank1@5        rank 1 SIGKILLs itself in its 5th window (a crashed worker)
    LORA_TEST_FAULT=sigterm-launcher@5  rank 0 sends SIGTERM to its parent, the torchrun launcher

The fault fires only in the first attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT`` 0): a group
that torchrun restarts runs clean.
"""

import os
import signal

import lora.train.loop as training
from lora.cli.train import run

fault = os.environ.get("LORA_TEST_FAULT")
if fault and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    what, at = fault.split("@")
    real_step, calls = training.accumulate_gradients, {"n": 0}

    def faulty_step(*args):
        calls["n"] += 1
        rank = int(os.environ["RANK"])
        if calls["n"] == int(at) and what == "kill-rank1" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if calls["n"] == int(at) and what == "sigterm-launcher" and rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)
        return real_step(*args)

    training.accumulate_gradients = faulty_step

run()
