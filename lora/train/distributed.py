"""Data parallelism with PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP.

    torchrun --nproc_per_node 2 -- train.py --model minilm --data bundled   # 2 processes, one model

Every process (rank) holds the whole model and reads its own share of each batch; DDP averages
the gradients across ranks in backward, so every rank applies the same update. ``python
train.py`` alone runs with world size 1 and no process group: nothing here changes it.

How a global batch is shared: the training loop builds the same length-grouped batches on every
rank (same seed) with the *global* batch size ``batch_size * world_size``, and rank ``r`` takes
the ``r``-th contiguous slice of each. A run on N processes therefore sees exactly the examples,
in exactly the groups, of a one-process run with ``--batch-size`` N times larger. The loop calls
this module; this module never calls the loop.

Stopping a run without losing a step (``graceful_stop``): Ctrl-C (SIGINT) and SIGTERM.
SIGTERM is what ``kill``, SLURM's ``scancel``, Kubernetes, spot-instance preemption and
``torchrun`` (on its own SIGTERM, or a second Ctrl-C) send; the process then has a grace period
(torchrun: 30 s) before SIGKILL. Both signals are handled alike: the first one only sets
``requested`` (the loop checks it at the start of every step, agrees on it with every other rank,
writes one checkpoint and stops); a second one stops at once, falling back to the last checkpoint.
"""

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import InputError


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, and the device it trains on."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 prints and writes files; the others compute and wait."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> World:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); world size 1 without it.

    On CUDA each rank takes the GPU ``LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return World(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torchrun keeps one store for all attempts of a group (--max-restarts): keys that the
        # ranks of a failed attempt wrote (their gloo/NCCL addresses) are still there when the
        # restarted ranks look for each other, and a rank that reads its partner's old address
        # fails with "Connection refused". Each attempt therefore gets keys of its own.
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"lora/attempt-{attempt}", store),
            rank=rank,
            world_size=size,
        )
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """DDP around ``model`` on several ranks, the model itself on one.

    DDP registers gradient hooks only for parameters with ``requires_grad``: the frozen base has
    none, so its buckets hold just LoRA's A and B and the head. No ``find_unused_parameters``:
    ``check_every_trainable_gets_a_gradient`` makes sure none is unused before training.
    """
    if not world.distributed:
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: torch.nn.Module, last_micro_batch: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's contiguous slice of a global batch (the first ranks take one more when it
    does not divide evenly; a rank may get none of a short last batch)."""
    per_rank, extra = divmod(len(indices), world.size)
    start = world.rank * per_rank + min(world.rank, extra)
    return indices[start : start + per_rank + (world.rank < extra)]


def gather(value, world: World) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    """Wait until every rank got here (after rank 0 wrote files the others will read)."""
    if world.distributed:
        dist.barrier()


def total(value: float, world: World) -> float:
    """The sum of ``value`` over all ranks (e.g. each rank's share of the window's mean loss)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.item()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on one (a Ctrl-C that reached some ranks first)."""
    return total(float(flag), world) > 0


def from_main(world: World, compute):
    """``compute()`` on rank 0 only, its result on every rank; an ``InputError`` it raises is
    raised on every rank (so that all stop, instead of the others waiting forever)."""
    if not world.distributed:
        return compute()
    outcome = None
    if world.is_main:
        try:
            outcome = ("value", compute())
        except InputError as error:
            outcome = ("error", error)
    kind, value = gather(outcome, world)[0]
    if kind == "error":
        raise value
    return value


@contextlib.contextmanager
def quiet_unless_main(world: World):
    """Only rank 0 prints: the other ranks' standard output goes nowhere."""
    if world.is_main:
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere):
        yield


# ----------------------------------------------------------------------------- stopping on a signal
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
        print(
            f"\n{stop.signal_name}: stopping after this step to save a checkpoint (send it again to stop at once)",
            file=sys.stderr,
        )

    previous = {signum: signal.signal(signum, on_signal) for signum in HANDLED}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
