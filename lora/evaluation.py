"""Forward passes over many texts, and the metrics of a split (loss, accuracy, macro P/R/F1)."""
import contextlib

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import distributed, report
from .data import length_grouped_batches, pad_batch
from .distributed import World


@torch.inference_mode()
def batched_logits(model, token_ids: list[list[int]], batch_size: int, pad_id: int,
                   autocast=None, progress: bool = False) -> torch.Tensor:
    """Float32 logits ``(N, num_labels)`` on the CPU, row ``i`` for ``token_ids[i]``.

    Batches hold texts of similar length (sorted), each padded only to its own longest
    text (dynamic padding); rows are put back in input order.
    """
    device = next(model.parameters()).device
    logits = torch.empty(len(token_ids), model.config.num_labels)
    batches = length_grouped_batches([len(ids) for ids in token_ids], batch_size, seed=0, shuffle=False)
    with tqdm(total=len(token_ids), desc="predicting", unit="text", disable=not progress) as bar:
        for indices in batches:
            batch = pad_batch([token_ids[i] for i in indices], pad_id)
            with autocast or contextlib.nullcontext():
                out = model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits
            logits[indices] = out.float().cpu()
            bar.update(len(indices))
    return logits


def evaluate(model, token_ids: list[list[int]], labels: list[int], batch_size: int, pad_id: int,
             autocast=None, world: World = World()) -> tuple[dict, torch.Tensor]:
    """Loss, accuracy and macro P/R/F1 on a split; also the probabilities ``(N, num_labels)``.

    With several ranks each computes the logits of its contiguous share and all of them get
    every share back, in order: every rank computes the same metrics (and so takes the same
    early-stopping decision), and no row is counted twice.
    """
    was_training = model.training
    model.eval()
    mine = distributed.shard(list(range(len(token_ids))), world)
    logits = batched_logits(model, [token_ids[i] for i in mine], batch_size, pad_id, autocast)
    logits = torch.cat(distributed.gather(logits, world))
    model.train(was_training)
    targets = torch.tensor(labels)
    metrics = {"loss": F.cross_entropy(logits, targets).item(),
               **report.classification_metrics(labels, logits.argmax(dim=1).numpy())}
    return metrics, logits.softmax(dim=1)
