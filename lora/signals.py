"""Stopping a run without losing a step: Ctrl-C (SIGINT) and SIGTERM.

SIGTERM is what ``kill``, SLURM's ``scancel``, Kubernetes, spot-instance preemption and
``torchrun`` (on its own SIGTERM, or a second Ctrl-C) send; the process then has a grace period
(torchrun: 30 s) before SIGKILL. Both signals are handled alike: the first one only sets
``requested`` (the loop checks it at the start of every step, agrees on it with every other rank,
writes one checkpoint and stops); a second one stops at once, falling back to the last checkpoint.
"""
import contextlib
import signal
import sys
import threading
from dataclasses import dataclass

HANDLED = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StopRequest:
    """Set by the signal handler, read by the loop at step boundaries."""
    requested: bool = False
    signal_name: str | None = None


@contextlib.contextmanager
def graceful_stop():
    """Within this block the first SIGINT or SIGTERM sets ``requested`` on the yielded
    ``StopRequest``; a second raises ``KeyboardInterrupt`` at once. The previous handlers come
    back on exit. Outside the main thread (Python delivers signals only there) nothing changes."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.signal_name = True, signal.Signals(signum).name
        print(f"\n{stop.signal_name}: stopping after this step to save a checkpoint "
              "(send it again to stop at once)", file=sys.stderr)

    previous = {signum: signal.signal(signum, on_signal) for signum in HANDLED}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
