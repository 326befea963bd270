"""The metrics of a split (loss, accuracy, macro precision / recall / F1), computed the same way
by every rank and always with dropout off."""

import torch
from torch.nn import functional as F

from ..classifier import batched_logits, classification_metrics
from . import distributed
from .distributed import World

SINGLE_PROCESS = World()  # a run without torchrun


def evaluate(
    model,
    token_ids: list[list[int]],
    labels: list[int],
    batch_size: int,
    pad_id: int,
    autocast=None,
    world: World = SINGLE_PROCESS,
) -> tuple[dict, torch.Tensor]:
    """Loss, accuracy and macro P/R/F1 on a split; also the probabilities ``(N, num_labels)``.

    The model runs in eval mode (dropout off: with it, early stopping and the best checkpoint
    would follow dropout's noise) and comes back in the mode it was in. With several ranks each
    computes the logits of its contiguous share and all of them get every share back, in order:
    every rank computes the same metrics (and so takes the same early-stopping decision), and no
    row is counted twice.
    """
    was_training = model.training
    model.eval()
    mine = distributed.shard(list(range(len(token_ids))), world)
    logits = batched_logits(model, [token_ids[i] for i in mine], batch_size, pad_id, autocast)
    logits = torch.cat(distributed.gather(logits, world))
    model.train(was_training)
    targets = torch.tensor(labels)
    metrics = {
        "loss": F.cross_entropy(logits, targets).item(),
        **classification_metrics(labels, logits.argmax(dim=1).numpy()),
    }
    return metrics, logits.softmax(dim=1)
