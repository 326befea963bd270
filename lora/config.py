"""What an adapter is: ``LoRAConfig``, the settings ``inject_lora`` takes, and the one kind of
error the library raises about the values it is given (``InputError``).

    config = LoRAConfig(r=8, alpha=16, target_modules=("query", "value"))
    inject_lora(model, config)          # model.lora.config is config

Every LoRA layer gets ``delta_W = (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with ``rslora``).
"""

from dataclasses import dataclass

from .layer import check_lora_hyperparameters, lora_scaling
from .variants import INITS

# What trains in the classification head (inject_lora): the head's hidden layer and its output
# layer in full; a LoRA on the hidden layer and the output layer in full; the output layer alone.
HEADS = ("full", "lora", "linear")


class InputError(ValueError):
    """A value, file or name the library cannot work with. The message says what is wrong with
    the value; ``lora.cli`` prints it as one line and exits with code 2."""


class SettingError(InputError):
    """An ``InputError`` about settings the caller chose. ``message`` names each of ``fields`` as
    ``{field}``: the error reads ``lr must be > 0`` from Python and ``--lr must be > 0`` on the
    command line (``lora.cli`` names the flags: ``named(flag_for)``)."""

    def __init__(self, message: str, *fields: str):
        self.message, self.fields = message, fields
        super().__init__(self.named(lambda field: field))

    def __reduce__(self):  # pickled whole (``distributed.from_main``), its fields included
        return type(self), (self.message, *self.fields)

    def named(self, name) -> str:
        """The message with each ``{field}`` replaced by ``name(field)``."""
        text = self.message
        for field in self.fields:
            text = text.replace("{" + field + "}", name(field))
        return text


@dataclass(frozen=True)
class LoRAConfig:
    """Where LoRA goes in a model, and how its updates are scaled.

    Attributes:
        r: rank of every update (``A``: ``(r, in)``, ``B``: ``(out, r)``).
        alpha: scale numerator: ``scaling = alpha / r``.
        dropout: dropout probability on the LoRA branch's input (0: none).
        target_modules: the ``nn.Linear`` modules to adapt: a last name component (``"query"``)
            or a dotted path inside an encoder layer (``"attention.output.dense"``). BERT's names
            (``query``, ``key``, ``value``, ``attention.output.dense``, ``intermediate.dense``,
            ``output.dense``) stand for each supported family's own (``model.FAMILIES``).
        layers: only these encoder layer indices (None: every layer).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        dora: a trainable magnitude per output row (``DoRALinear``).
        init: ``"lora"`` (``B = 0``, Kaiming-uniform ``A``) or ``"pissa"`` (``pissa_init_``).
        trainable_modules: modules trained in full. None: the head (as ``head`` says) and every
            module the checkpoint did not hold (``model.head_modules``).
        head: what trains in the classification head (``HEADS``): ``"full"``, its hidden layer
            and output layer; ``"lora"``, a LoRA on the hidden layer and the output layer in full;
            ``"linear"``, the output layer alone.

    Lists become tuples, so that a config is hashable and compares equal to itself read back
    from JSON. Raises ``ValueError`` for an impossible value.
    """

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    dora: bool = False
    init: str = "lora"
    trainable_modules: tuple[str, ...] | None = None
    head: str = "full"

    def __post_init__(self):
        check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {self.head!r}")
        for name in ("target_modules", "trainable_modules", "layers"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``."""
        return lora_scaling(self.r, self.alpha, self.rslora)
