"""The settings of a training run, checked before anything heavy is imported, loaded or written."""

from dataclasses import dataclass

from ..config import HEADS, LoRAConfig, SettingError
from ..quantize import SCHEMES
from ..variants import DORA_NEEDS_FLOAT_BASE, INITS
from .report import check_report_to

# The validation metrics a run can select on, and whether higher is better.
HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "precision_macro": True, "recall_macro": True, "loss": False}
PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Every setting of a run; ``train.py`` fills it from the command line.

    The defaults are the best Optuna configuration of the course project this started from
    (roberta-base on AG News, LoRA r=10, alpha=64 on query and value; see the README).
    """

    r: int = 10
    alpha: float = 64.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")
    layers: tuple[int, ...] | None = None
    trainable_modules: tuple[str, ...] | None = None  # None: the head and what the checkpoint lacks
    head: str = "full"  # "full", "lora", "linear": what trains in the classification head
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

    def lora_config(self) -> LoRAConfig:
        """The adapter's settings: what ``inject_lora`` gets."""
        return LoRAConfig(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            layers=self.layers,
            rslora=self.rslora,
            dora=self.dora,
            init=self.init,
            trainable_modules=self.trainable_modules,
            head=self.head,
        )

    def check(self) -> None:
        """Raise ``SettingError`` for impossible settings, before anything is loaded or written."""
        positive = ["batch_size", "grad_accum", "eval_steps", "log_steps", "epochs", "patience", "max_length"]
        if self.max_steps is not None:
            positive.append("max_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingError(f"{{{name}}} must be at least 1, got {getattr(self, name)}", name)
        if not self.lr > 0:
            raise SettingError(f"{{lr}} must be > 0, got {self.lr}", "lr")
        if not self.max_grad_norm > 0:
            raise SettingError(f"{{max_grad_norm}} must be > 0, got {self.max_grad_norm}", "max_grad_norm")
        if not 0 <= self.warmup_ratio < 1:
            raise SettingError(f"{{warmup_ratio}} must be in [0, 1), got {self.warmup_ratio}", "warmup_ratio")
        if self.weight_decay < 0:
            raise SettingError(f"{{weight_decay}} must be >= 0, got {self.weight_decay}", "weight_decay")
        if not 0 < self.val_size < 1:
            raise SettingError(f"{{val_size}} must be between 0 and 1, got {self.val_size}", "val_size")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise SettingError(f"{{lora_plus_ratio}} must be > 0, got {self.lora_plus_ratio}", "lora_plus_ratio")
        if self.metric not in HIGHER_IS_BETTER:
            raise SettingError(f"{{metric}} must be one of {list(HIGHER_IS_BETTER)}", "metric")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise SettingError(f"{{precision}} must be one of {list(PRECISIONS)}, got {self.precision!r}", "precision")
        if self.quantize_base is not None and self.quantize_base not in SCHEMES:
            raise SettingError(
                f"{{quantize_base}} must be one of {list(SCHEMES)}, got {self.quantize_base!r}", "quantize_base"
            )
        if self.dora and self.quantize_base is not None:
            raise SettingError(DORA_NEEDS_FLOAT_BASE)  # the message DoRALinear and quantize_base raise
        if self.double_quant and self.quantize_base != "nf4":
            raise SettingError("{double_quant} applies to {quantize_base} nf4 only", "double_quant", "quantize_base")
        if self.resume not in (False, True, "auto"):
            raise SettingError(f"{{resume}} takes no value or 'auto', got {self.resume!r}", "resume")
        if self.resume == "auto" and self.output_dir is None:
            raise SettingError(
                "{resume} auto needs {output_dir}: the folder to continue, or to start in", "resume", "output_dir"
            )
        if self.resume and self.overwrite:
            raise SettingError(
                "{resume} continues a run and {overwrite} replaces it: pass one of them", "resume", "overwrite"
            )
        if self.head not in HEADS:
            raise SettingError(f"{{head}} must be one of {list(HEADS)}, got {self.head!r}", "head")
        if self.init not in INITS:
            raise SettingError(f"{{init}} must be one of {list(INITS)}, got {self.init!r}", "init")
        check_report_to(self.report_to)
        try:
            self.lora_config()
        except ValueError as error:  # r, alpha or dropout: the message names which
            raise SettingError(str(error)) from None
