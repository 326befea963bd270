"""The settings of a training run, checked before anything heavy is imported, loaded or written."""
from dataclasses import dataclass

from .errors import UsageError
from .layer import check_lora_hyperparameters
from .quantize import SCHEMES
from .tensorboard import check_report_to
from .variants import DORA_NEEDS_FLOAT_BASE, INITS

# The validation metrics a run can select on, and whether higher is better.
HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "precision_macro": True,
                    "recall_macro": True, "loss": False}
# The one setting with several flags: the flag of each autocast precision.
PRECISION_FLAGS = {"fp16": "--fp16", "bf16": "--bf16", "fp32": "--no-amp"}


def flag_for(field_name: str) -> str:
    """The train.py flag of a ``TrainConfig`` field: ``grad_accum`` -> ``--grad-accum``."""
    if field_name == "precision":
        return "/".join(PRECISION_FLAGS.values())
    return "--" + field_name.replace("_", "-")


@dataclass
class TrainConfig:
    """Every setting of a run; ``train.py`` fills it from the command line.

    The defaults are the seeds' best Optuna configuration for roberta-base on AG News.
    """
    r: int = 10
    alpha: float = 64.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    trainable_modules: tuple[str, ...] = ("classifier",)
    rslora: bool = False
    dora: bool = False
    init: str = "lora"  # "lora" or "pissa"
    lora_plus_ratio: float | None = None  # LoRA+: lora_B learns at lr * ratio
    lr: float = 3.99e-4
    batch_size: int = 32
    grad_accum: int = 4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    epochs: int = 3
    max_steps: int | None = None
    max_length: int = 128
    eval_steps: int = 400
    log_steps: int = 10
    patience: int = 3
    metric: str = "accuracy"
    precision: str | None = None  # "fp16", "bf16", "fp32"; None: fp16 on CUDA, fp32 on CPU
    device: str = "auto"
    seed: int = 42
    model: str = "roberta-base"
    data: str = "ag_news"
    val_size: float = 0.05
    clean: bool = False
    output_dir: str | None = None
    resume: bool | str = False  # True: continue the run; "auto": continue it if it has a checkpoint
    overwrite: bool = False
    quantize_base: str | None = None  # "int8", "nf4": the frozen base stored quantized (lora/quantize.py)
    double_quant: bool = False  # nf4 only: the block absmax values in 8 bits too
    gradient_checkpointing: bool = False  # recompute the encoder layers' activations in backward (lora/execution.py)
    compile: bool = False  # torch.compile the model the loop runs forward and backward
    evaluate_test: bool = True  # False: stop after training (search.py ranks trials on validation)
    report_to: str | None = None  # "tensorboard": the metric records as event files in the run folder

    def check(self) -> None:
        """Raise ``UsageError`` for impossible settings, before anything is loaded or written."""
        positive = {"--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--eval-steps": self.eval_steps, "--log-steps": self.log_steps,
                    "--epochs": self.epochs, "--patience": self.patience,
                    "--max-length": self.max_length}
        if self.max_steps is not None:
            positive["--max-steps"] = self.max_steps
        for flag, value in positive.items():
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not self.max_grad_norm > 0:
            raise UsageError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.val_size < 1:
            raise UsageError(f"--val-size must be between 0 and 1, got {self.val_size}")
        if self.init not in INITS:
            raise UsageError(f"--init must be one of {list(INITS)}, got {self.init!r}")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise UsageError(f"--lora-plus-ratio must be > 0, got {self.lora_plus_ratio}")
        if self.metric not in HIGHER_IS_BETTER:
            raise UsageError(f"--metric must be one of {list(HIGHER_IS_BETTER)}")
        if self.quantize_base is not None and self.quantize_base not in SCHEMES:
            raise UsageError(f"--quantize-base must be one of {list(SCHEMES)}, got {self.quantize_base!r}")
        if self.dora and self.quantize_base is not None:
            raise UsageError(DORA_NEEDS_FLOAT_BASE)  # the message DoRALinear and quantize_base raise
        if self.double_quant and self.quantize_base != "nf4":
            raise UsageError("--double-quant applies to --quantize-base nf4 only")
        if self.resume not in (False, True, "auto"):
            raise UsageError(f"--resume takes no value or 'auto', got {self.resume!r}")
        if self.resume == "auto" and self.output_dir is None:
            raise UsageError("--resume auto needs --output-dir: the folder to continue, or to start in")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues a run and --overwrite replaces it: pass one of them")
        check_report_to(self.report_to)
        try:
            check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        except ValueError as error:
            raise UsageError(str(error)) from None
