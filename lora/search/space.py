"""What ``search.py`` searches: where LoRA goes and how it trains, under a budget of trainable
parameters.

``suggest`` is the whole space, in the order it is sampled: target modules, layers and the
head first, then the rank, bounded by what the budget leaves, then the optimisation settings.
A setting given as a train.py flag is fixed and not searched. The trainable count of every
configuration is exact and known before anything trains: LoRA is injected into the model
built on the meta device (shapes only, no weights), and counted with ``count_parameters``.

The head is part of the budget: ``full`` trains its hidden and output layers (roberta-base's is
593,668 numbers, more than LoRA r=10 on query and value), ``lora`` and ``linear`` leave most of
that for a higher rank (``lora.config.HEADS``).
"""

import dataclasses
from dataclasses import dataclass
from functools import cache
from itertools import product

import optuna
import torch

from ..classifier import load_classifier_model, load_model_config
from ..config import HEADS, SettingError
from ..model import count_parameters, inject_lora, lora_layers
from ..train import TrainConfig

# Where LoRA goes. Dotted names are paths inside an encoder layer (see lora.model.is_target):
# BERT and RoBERTa call the attention output, and the FFN's two layers, all "dense".
TARGETS = {
    "qv": ("query", "value"),
    "qkv": ("query", "key", "value"),
    "qkvo": ("query", "key", "value", "attention.output.dense"),
    "ffn": ("intermediate.dense", "output.dense"),
    "qv_ffn": ("query", "value", "intermediate.dense", "output.dense"),
    "all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}
LAYERS = ("all", "top_half", "bottom_half")
MAX_RANK = 64
BATCH_SIZES = (16, 32)
GRAD_ACCUMS = (1, 2, 4)

# The TrainConfig fields the search sets; one given as a train.py flag is fixed instead.
SEARCHABLE = (
    "target_modules",
    "layers",
    "head",
    "r",
    "alpha",
    "dropout",
    "lr",
    "weight_decay",
    "batch_size",
    "grad_accum",
)


class OverBudget(Exception):
    """A configuration with more trainable parameters than the budget; ``count`` says how many."""

    def __init__(self, count: int, budget: int):
        super().__init__(f"{count:,} trainable parameters, over the budget of {budget:,}")
        self.count = count


def layer_indices(choice: str, num_layers: int) -> tuple[int, ...] | None:
    """``"all"`` -> None (every layer); ``"top_half"`` / ``"bottom_half"`` -> the indices."""
    half = num_layers // 2
    return {"all": None, "top_half": tuple(range(half, num_layers)), "bottom_half": tuple(range(half))}[choice]


class ParameterCounter:
    """Exact trainable counts of LoRA configurations of one model, from its shapes, and from the
    names of the parameters its checkpoint lacks (loaded once: they train by default)."""

    def __init__(self, model_name: str, labels: list[str]):
        self.model_config = load_model_config(model_name, labels)
        self.num_layers = self.model_config.num_hidden_layers
        self.fresh_parameters = load_classifier_model(model_name, labels).fresh_parameters

    def meta_model(self) -> torch.nn.Module:
        """The classifier on the meta device (shapes, no memory), with the checkpoint's loading report."""
        from transformers import AutoModelForSequenceClassification

        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(self.model_config)
        model.fresh_parameters = self.fresh_parameters
        return model

    @cache  # noqa: B019  (one counter a search: its cache lives as long as the search)
    def cost(
        self,
        targets: tuple[str, ...],
        layers: tuple[int, ...] | None,
        trainable_modules: tuple[str, ...] | None,
        head: str = "full",
    ) -> tuple[int, int]:
        """``(fixed, per_rank)``: the trainable count at rank r is ``fixed + r * per_rank``,
        where ``per_rank`` is what rank 1 costs in the adapted layers and ``fixed`` counts the
        modules trained in full. Raises ``ValueError`` when the targets match nothing, or the
        head does not fit the model."""
        model = self.meta_model()
        inject_lora(model, targets, r=1, alpha=1.0, trainable_modules=trainable_modules, layers=layers, head=head)
        trainable, _ = count_parameters(model)
        per_rank = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora_layers(model))
        return trainable - per_rank, per_rank


@dataclass
class SearchSpace:
    """The choices left to search once the fixed flags and the budget have had their say."""

    base: TrainConfig
    searched: frozenset[str]
    counter: ParameterCounter
    max_params: int | None
    targets: tuple[str, ...]  # keys of TARGETS that fit
    layers: tuple[str, ...]  # LAYERS that fit
    heads: tuple[str, ...]  # HEADS that fit

    def max_rank(self, fixed: int, per_rank: int) -> int:
        """The largest rank (at most MAX_RANK) that keeps ``fixed + r * per_rank`` in the budget."""
        if self.max_params is None:
            return MAX_RANK
        return min(MAX_RANK, (self.max_params - fixed) // per_rank)


def build_space(base: TrainConfig, fixed: set[str], counter: ParameterCounter, max_params: int | None) -> SearchSpace:
    """The search space for ``base`` with the ``fixed`` fields held; choices of targets, layers
    and head that cannot fit the budget at the smallest rank (or the model) are left out.

    Raises ``SettingError`` when nothing is left to search or no configuration fits.
    """
    searched = frozenset(SEARCHABLE) - fixed
    if not searched:
        raise SettingError(
            "every searched setting is fixed: nothing to search (leave one of "
            f"{', '.join('{' + name + '}' for name in SEARCHABLE)} free)",
            *SEARCHABLE,
        )
    targets = list(TARGETS) if "target_modules" in searched else [None]
    layers = [c for c in LAYERS if layer_indices(c, counter.num_layers) != ()] if "layers" in searched else [None]
    heads = list(HEADS) if "head" in searched else [None]
    smallest_rank = 1 if "r" in searched else base.r
    fits, smallest = [], None
    for combination in product(targets, layers, heads):
        try:
            fixed_cost, per_rank = counter.cost(*where_lora_goes(base, counter, *combination))
        except ValueError:  # these targets name no layer of this model, or the head does not fit it
            continue
        count = fixed_cost + smallest_rank * per_rank
        smallest = count if smallest is None else min(smallest, count)
        if max_params is None or count <= max_params:
            fits.append(combination)
    if smallest is None:
        raise SettingError(
            f"none of the searched target modules {sorted(TARGETS)} names a layer of "
            f"{base.model}; fix them with {{target_modules}}",
            "target_modules",
        )
    if not fits:
        raise SettingError(
            f"no configuration fits {{max_params}} {max_params:,}: the smallest has {smallest:,} trainable parameters",
            "max_params",
        )
    return SearchSpace(
        base,
        searched,
        counter,
        max_params,
        targets=tuple(dict.fromkeys(t for t, _, _ in fits)),
        layers=tuple(dict.fromkeys(chosen for _, chosen, _ in fits)),
        heads=tuple(dict.fromkeys(h for _, _, h in fits)),
    )


def where_lora_goes(
    base: TrainConfig, counter: ParameterCounter, targets: str | None, layers: str | None, head: str | None
):
    """``(target_modules, layers, trainable_modules, head)`` for a choice of each (None: fixed)."""
    return (
        base.target_modules if targets is None else TARGETS[targets],
        base.layers if layers is None else layer_indices(layers, counter.num_layers),
        base.trainable_modules,
        base.head if head is None else head,
    )


def suggest(trial: optuna.Trial, space: SearchSpace) -> tuple[TrainConfig, int]:
    """The trial's configuration and its exact trainable count. The whole space is here.

    Raises ``OverBudget`` (before the rank is drawn) when even the smallest rank of the drawn
    targets, layers and head is over the budget.
    """
    searched, base = space.searched, space.base

    def pick(field: str, sample):
        """A drawn value, or the flag's value when ``field`` is fixed."""
        return sample() if field in searched else getattr(base, field)

    def choose(field: str, name: str, choices: tuple):
        return trial.suggest_categorical(name, choices) if field in searched else None

    # Where LoRA goes, then the largest rank the budget leaves for it.
    target_modules, layers, trainable_modules, head = where_lora_goes(
        base,
        space.counter,
        choose("target_modules", "target_modules", space.targets),
        choose("layers", "layers", space.layers),
        choose("head", "head", space.heads),
    )
    fixed, per_rank = space.counter.cost(target_modules, layers, trainable_modules, head)
    smallest = fixed + (1 if "r" in searched else base.r) * per_rank
    if space.max_params is not None and smallest > space.max_params:
        raise OverBudget(smallest, space.max_params)
    r = pick("r", lambda: trial.suggest_int("r", 1, space.max_rank(fixed, per_rank), log=True))
    alpha = pick("alpha", lambda: r * trial.suggest_float("alpha_over_r", 0.5, 8.0, log=True))

    # How it trains.
    config = dataclasses.replace(
        base,
        target_modules=target_modules,
        layers=layers,
        trainable_modules=trainable_modules,
        head=head,
        r=r,
        alpha=alpha,
        dropout=pick("dropout", lambda: trial.suggest_float("dropout", 0.0, 0.3)),
        lr=pick("lr", lambda: trial.suggest_float("lr", 5e-5, 5e-3, log=True)),
        weight_decay=pick("weight_decay", lambda: trial.suggest_float("weight_decay", 0.0, 0.1)),
        batch_size=pick("batch_size", lambda: trial.suggest_categorical("batch_size", BATCH_SIZES)),
        grad_accum=pick("grad_accum", lambda: trial.suggest_categorical("grad_accum", GRAD_ACCUMS)),
    )
    return config, fixed + r * per_rank
