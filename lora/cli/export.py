"""Write a trained adapter in Hugging Face peft's format, for PeftModel and the Hub.

    python export.py runs/minilm exported/minilm

Writes adapter_model.safetensors and adapter_config.json (peft's LoRA, task_type SEQ_CLS, the
head in modules_to_save), config.json (the base model's config with this adapter's label
names: transformers' id2label / label2id) and lora_extras.json (what peft's config has no
field for; predict.py and inspect_lora.py read it back). Then, in Python:

    base_name = PeftConfig.from_pretrained("exported/minilm").base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(
        base_name, config=AutoConfig.from_pretrained("exported/minilm"))
    model = PeftModel.from_pretrained(base, "exported/minilm")

(see docs/peft-and-hub.md). Reads top to bottom: read the adapter, map it,
write the folder.
"""

import argparse
from pathlib import Path

from lora.adapter import WEIGHTS_NAME
from lora.classifier import load_model_config, read_adapter, resolve_model
from lora.cli import UsageError, run_command
from lora.peft_format import is_peft_folder, save_peft_adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder of train.py (adapter.safetensors + adapter_config.json)")
    parser.add_argument("out_dir", help="folder to write the peft adapter into")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    run_dir, out_dir = Path(args.run_dir), Path(args.out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"{out_dir} is not empty; pass --overwrite to write into it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file")

    if is_peft_folder(run_dir) and not (run_dir / WEIGHTS_NAME).is_file():
        raise UsageError(f"{run_dir} is a peft adapter already; predict.py and inspect_lora.py read it as it is")
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


def run() -> None:
    """The ``lora-export`` console command and ``python export.py``."""
    run_command(main)


if __name__ == "__main__":
    run()
