"""Export a trained adapter: in Hugging Face peft's format (the default), or as the whole merged
classifier in ONNX for CPUs without PyTorch.

    python export.py runs/minilm exported/minilm                       # peft: PeftModel, the Hub
    python export.py runs/minilm exported/minilm-onnx --format onnx    # ONNX Runtime, float32
    python export.py runs/minilm exported/minilm-int8 --format onnx --int8 --check-data lora/bundled/ag_news/test.csv

peft: writes adapter_model.safetensors and adapter_config.json (peft's LoRA, task_type SEQ_CLS,
the head in modules_to_save), config.json (the base model's config with this adapter's label
names) and lora_extras.json (what peft's config has no field for; predict.py and inspect_lora.py
read it back). Then, in Python (see docs/peft-and-hub.md):

    base_name = PeftConfig.from_pretrained("exported/minilm").base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(
        base_name, config=AutoConfig.from_pretrained("exported/minilm"))
    model = PeftModel.from_pretrained(base, "exported/minilm")

onnx: merges the adapter into its base (a quantized base is dequantized first), exports the
whole classifier (dynamic batch and sequence axes) with its tokenizer, labels, max length,
cleaning, base fingerprint and provenance, checks it against PyTorch and writes parity.json;
--int8 quantizes the weights (ONNX Runtime's dynamic quantization) and is refused when it loses
more than --max-accuracy-drop points on --check-data. predict.py --adapter and lora-serve read
the folder. See docs/deploy.md.

Reads top to bottom: read the adapter, map it (peft) or merge and export it (onnx), write.
"""

import argparse
from pathlib import Path

from lora.adapter import WEIGHTS_NAME
from lora.classifier import load_classifier, load_model_config, read_adapter, resolve_model
from lora.cli import UsageError, one_line, run_command
from lora.data import encode_labels, read_table
from lora.peft_format import is_peft_folder, save_peft_adapter

FORMATS = ("peft", "onnx")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder of train.py (adapter.safetensors + adapter_config.json)")
    parser.add_argument("out_dir", help="folder to write the export into")
    parser.add_argument("--format", choices=FORMATS, default="peft", help="(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="peft: write into a non-empty OUT_DIR")
    onnx = parser.add_argument_group("onnx")
    onnx.add_argument("--int8", action="store_true", help="quantize the weights to int8 (dynamic quantization)")
    onnx.add_argument(
        "--check-data",
        help="labelled texts (CSV, JSONL, Parquet... as predict.py reads them): accuracy and macro F1 "
        "of the PyTorch and the ONNX model on them go to parity.json and gate --int8",
    )
    onnx.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="--int8: the most accuracy (points) the export may lose on --check-data (default: 0.5)",
    )
    onnx.add_argument("--force", action="store_true", help="write the export even when it fails its gate")
    onnx.add_argument(
        "--float-ffn-output",
        action="store_true",
        help="--int8: keep the feed-forward output projections in float32 (labels closer to float32's, "
        "about a fifth slower; see docs/deploy.md)",
    )
    args = parser.parse_args(argv)
    onnx_only = [flag for flag, given in (("--int8", args.int8), ("--check-data", args.check_data),
                                          ("--max-accuracy-drop", args.max_accuracy_drop is not None),
                                          ("--force", args.force),
                                          ("--float-ffn-output", args.float_ffn_output)) if given]  # fmt: skip
    if args.format != "onnx" and onnx_only:
        raise UsageError(f"{', '.join(onnx_only)} apply to --format onnx only")
    if args.float_ffn_output and not args.int8:
        raise UsageError("--float-ffn-output keeps part of an --int8 model in float32: it needs --int8")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run_dir, out_dir = Path(args.run_dir), Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file")
    if is_peft_folder(run_dir) and not (run_dir / WEIGHTS_NAME).is_file():
        raise UsageError(f"{run_dir} is a peft adapter already; predict.py and inspect_lora.py read it as it is")
    if args.format == "onnx":
        export_onnx_folder(args, run_dir, out_dir)
        return
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"{out_dir} is not empty; pass --overwrite to write into it")
    state, config = read_adapter(run_dir)
    base = resolve_model(config.base_model)  # an alias (minilm) becomes its folder
    model_config = load_model_config(base, list(config.labels))  # the base's config, our label names
    save_peft_adapter(out_dir, state, config, base_model_name_or_path=base)
    model_config.save_pretrained(out_dir)
    print(f"wrote a peft LoRA adapter (base {base}, {len(config.labels)} labels) to {out_dir}")
    if config.quantize_base is not None:
        print(
            f"note: the adapter was trained on a {config.quantize_base} base; peft reproduces its "
            "predictions on a base loaded with the same bitsandbytes quantization"
        )


def export_onnx_folder(args: argparse.Namespace, run_dir: Path, out_dir: Path) -> None:
    """``--format onnx``: merge, export, measure, gate, write (or refuse: exit 2, nothing written)."""
    from lora.serve.onnx import DEFAULT_MAX_ACCURACY_DROP, ExportRefused, export_onnx

    if out_dir.exists():
        raise UsageError(f"{out_dir} exists; an ONNX export goes into a new folder")
    classifier = load_classifier(run_dir, device="cpu", merge=True)
    if classifier.config.quantize_base is not None:
        print(f"note: the {classifier.config.quantize_base} base is dequantized, then the adapter merged into it")
    check = None
    if args.check_data:
        frame = read_table(args.check_data)
        labels = encode_labels(frame, classifier.labels, args.check_data)["label"].tolist()
        check = (args.check_data, frame["text"].tolist(), labels)
    max_drop = DEFAULT_MAX_ACCURACY_DROP if args.max_accuracy_drop is None else args.max_accuracy_drop
    try:
        parity = export_onnx(classifier, out_dir, args.int8, check, max_drop, args.force, args.float_ffn_output)
    except ExportRefused as refused:
        for line in refused.parity.lines():  # what was measured; the error itself is one line
            print(line)
        raise UsageError(one_line(refused)) from None
    print(f"wrote {'an int8' if args.int8 else 'a float32'} ONNX classifier to {out_dir}")
    for line in parity.lines():
        print(line)
    if args.int8 and check is None:
        print("accuracy not checked: give --check-data FILE (labelled texts) to gate the int8 model")


def run() -> None:
    """The ``lora-export`` console command and ``python export.py``."""
    run_command(main)


if __name__ == "__main__":
    run()
