"""The training job: ``train(TrainConfig(...))`` runs it from Python, ``train.py`` from the
command line. ``loop.py`` is the job in order; the rest are the steps it takes: the run folder,
its progress and checkpoint (``run_folder.py``), evaluation, the precision and two execution
trades (``execution.py``), several processes and signals (``distributed.py``), plots and
TensorBoard (``report.py``)."""

from .config import TrainConfig
from .loop import RunInterrupted, TrainingStopped, train

__all__ = ["TrainConfig", "train", "RunInterrupted", "TrainingStopped"]
