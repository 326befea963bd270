"""Look inside a trained LoRA adapter: what it changed, by how much, in how many directions.

    python inspect_lora.py --adapter runs/minilm [--plot runs/minilm/lora_updates.png]
    python inspect_lora.py --adapter exported/minilm       # a peft LoRA folder works too

Prints the parameter accounting (r * (in + out) per layer), then per adapted layer the size of
``delta_W = (alpha / r) * B @ A`` against the pretrained ``W``, its singular values, and the
paper's amplification factor (see lora/inspection.py), and for DoRA how far the magnitude
vector moved from the pretrained row norms (``|dm|/|m|``); checks that merging the adapter into the
weights leaves the logits unchanged; and draws the relative update per layer and module.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from lora import layer_index, parameter_table  # noqa: E402
from lora.data import pad_batch, tokenize  # noqa: E402
from lora.errors import run_command  # noqa: E402
from lora.inference import CHECK_TEXTS, latest_run, load_classifier  # noqa: E402
from lora.inspection import adapter_stats, merge_gap  # noqa: E402


def print_stats(stats) -> None:
    dora = any(s.magnitude_change is not None for s in stats)
    magnitude = f" {'|dm|/|m|':>9}" if dora else ""
    print(f"{'layer':<48} {'r':>3} {'|W|':>8} {'|dW|':>8} {'|dW|/|W|':>9}{magnitude} {'eff.rank':>8} "
          f"{'top share':>9} {'amplif.':>8}  singular values")
    for s in stats:
        values = " ".join(f"{v:.3g}" for v in s.singular_values)
        magnitude = f" {s.magnitude_change:>9.4f}" if dora else ""
        print(f"{s.name:<48} {s.r:>3} {s.weight_norm:>8.3f} {s.update_norm:>8.4f} {s.relative_update:>9.4f}"
              f"{magnitude} {s.effective_rank:>8} {s.top_share:>9.3f} {s.amplification:>8.2f}  {values}")


def plot_stats(stats, path: Path) -> None:
    """Left: |delta_W| / |W| per encoder layer and module. Right: normalised singular values."""
    modules = sorted({s.name.rsplit(".", 1)[-1] for s in stats})
    layers = sorted({layer_index(s.name) for s in stats})
    grid = np.full((len(layers), len(modules)), np.nan)
    for s in stats:
        grid[layers.index(layer_index(s.name)), modules.index(s.name.rsplit(".", 1)[-1])] = s.relative_update
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    image = left.imshow(grid, cmap="viridis", aspect="auto")
    left.set(xticks=range(len(modules)), xticklabels=modules, yticks=range(len(layers)), yticklabels=layers,
             xlabel="module", ylabel="encoder layer", title="|ΔW|_F / |W|_F")
    figure.colorbar(image, ax=left)
    for s in stats:
        values = np.array(s.singular_values)
        right.plot(range(1, len(values) + 1), values / values[0] if values[0] > 0 else values, alpha=0.6)
    right.set(xlabel="index", ylabel="σ_i / σ_1", title="Singular values of ΔW (one line per layer)")
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="run folder or peft LoRA folder (default: the newest run under runs/)")
    parser.add_argument("--base", help="base model to load instead of the one the adapter names (hub id or folder)")
    parser.add_argument("--force", action="store_true",
                        help="load the adapter even onto base weights other than those it was trained on")
    parser.add_argument("--plot", help="PNG to draw (default: <adapter>/lora_updates.png)")
    args = parser.parse_args(argv)
    adapter_dir = Path(args.adapter) if args.adapter else latest_run()
    model, tokenizer = load_classifier(adapter_dir, device="cpu", merge=False, base_model=args.base,
                                       force=args.force)

    print(parameter_table(model), end="\n\n")
    stats = adapter_stats(model)
    print_stats(stats)
    ids = tokenize(CHECK_TEXTS, tokenizer, model.adapter_config["max_length"])
    gap = merge_gap(model, pad_batch([i or [tokenizer.unk_token_id] for i in ids], tokenizer.pad_token_id))
    print(f"\nmerged vs unmerged logits on {len(ids)} texts: largest difference {gap:.2e}")
    plot = Path(args.plot or adapter_dir / "lora_updates.png")
    plot_stats(stats, plot)
    print(f"plot: {plot}")


def run() -> None:
    """The ``lora-inspect`` console command and ``python inspect_lora.py``."""
    run_command(main)
