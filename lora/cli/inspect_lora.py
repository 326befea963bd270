"""Look inside a trained LoRA adapter: what it changed, by how much, in how many directions.

    python inspect_lora.py --adapter runs/minilm [--plot runs/minilm/lora_updates.png]
    python inspect_lora.py --adapter exported/minilm       # a peft LoRA folder works too
    python inspect_lora.py --adapter runs/r4 --compare runs/r32     # + subspace similarity
    python inspect_lora.py --adapter runs/minilm --json             # everything as JSON

Prints the parameter accounting (r * (in + out) per layer), then per adapted layer the size of
``delta_W = (alpha / r) * B @ A`` against the pretrained ``W``, its singular values, two
effective ranks (the directions holding 90% of ``||delta_W||_F^2``, and Roy and Vetterli's
entropy rank), the paper's amplification factor (see lora/inspection.py), and for DoRA how far
the magnitude vector moved from the pretrained row norms (``|dm|/|m|``); checks that merging the
adapter into the weights leaves the logits unchanged; and draws the relative update per layer
and module. ``--compare OTHER_RUN`` adds the LoRA paper's subspace similarity phi between the
two adapters' ``A`` matrices, layer by layer, and draws it as one heatmap per layer.
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

from lora import count_parameters, parameter_table
from lora.classifier import CHECK_TEXTS, load_classifier
from lora.cli import UsageError, latest_run, run_command
from lora.data import pad_batch, tokenize
from lora.inspection import (
    ENERGY_SHARE,
    adapter_stats,
    compare_adapters,
    merge_gap,
    plot_similarity,
    plot_stats,
    random_similarity,
)


def print_stats(stats) -> None:
    dora = any(s.magnitude_change is not None for s in stats)
    magnitude = f" {'|dm|/|m|':>9}" if dora else ""
    print(
        f"{'layer':<48} {'r':>3} {'|W|':>8} {'|dW|':>8} {'|dW|/|W|':>9}{magnitude} {'rank90':>6} "
        f"{'erank':>6} {'top share':>9} {'amplif.':>8}  singular values"
    )
    for s in stats:
        values = " ".join(f"{v:.3g}" for v in s.singular_values)
        magnitude = f" {s.magnitude_change:>9.4f}" if dora else ""
        print(
            f"{s.name:<48} {s.r:>3} {s.weight_norm:>8.3f} {s.update_norm:>8.4f} {s.relative_update:>9.4f}"
            f"{magnitude} {s.energy_rank:>6} {s.entropy_rank:>6.2f} {s.top_share:>9.3f} "
            f"{s.amplification:>8.2f}  {values}"
        )
    print(
        f"rank90: fewest directions holding {ENERGY_SHARE:.0%} of |dW|^2; "
        "erank: exp(entropy of s_i / sum s_j) (Roy and Vetterli 2007)"
    )


def print_similarity(similarities, other: Path) -> None:
    first = similarities[0]
    print(
        f"\nsubspace similarity phi(i, j) = |U_i^T V_j|_F^2 / min(i, j) of A (r={first.r_first}) "
        f"and A of {other} (r={first.r_second}); random subspaces: max(i, j) / in"
    )
    print(f"{'layer':<48} {'phi(1,1)':>8} {'random':>7} {'phi(k,k)':>8} {'random':>7}   k = min(r1, r2)")
    for s in similarities:
        k = min(s.r_first, s.r_second)
        print(
            f"{s.name:<48} {s.top:>8.3f} {random_similarity(1, 1, s.in_features):>7.3f} "
            f"{s.common:>8.3f} {random_similarity(k, k, s.in_features):>7.3f}"
        )


def strict_json(value):
    """``value`` with every infinite or NaN float as None (JSON has no such numbers; the
    amplification of an update that is still zero is infinite)."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="run folder or peft LoRA folder (default: the newest run under runs/)")
    parser.add_argument("--base", help="base model to load instead of the one the adapter names (hub id or folder)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="load the adapter even onto base weights other than those it was trained on",
    )
    parser.add_argument("--plot", help="PNG to draw (default: <adapter>/lora_updates.png)")
    parser.add_argument(
        "--compare",
        metavar="OTHER_RUN",
        help="a second run folder: subspace similarity of the two adapters, layer by layer",
    )
    parser.add_argument(
        "--compare-plot", help="PNG of the similarity heatmaps (default: <adapter>/subspace_similarity.png)"
    )
    parser.add_argument("--json", action="store_true", help="print everything as one JSON object instead")
    args = parser.parse_args(argv)
    if args.compare_plot and not args.compare:
        raise UsageError("--compare-plot needs --compare OTHER_RUN")
    adapter_dir = Path(args.adapter) if args.adapter else latest_run()
    classifier = load_classifier(adapter_dir, device="cpu", merge=False, base_model=args.base, force=args.force)
    model, tokenizer = classifier.model, classifier.tokenizer
    similarities = None
    if args.compare:
        other = load_classifier(args.compare, device="cpu", merge=False, force=args.force).model
        try:
            similarities = compare_adapters(model, other)
        except ValueError as error:
            raise UsageError(f"--compare {args.compare}: {error}") from None

    stats = adapter_stats(model)
    ids = tokenize(CHECK_TEXTS, tokenizer, classifier.config.max_length)
    gap = merge_gap(model, pad_batch([i or [tokenizer.unk_token_id] for i in ids], tokenizer.pad_token_id))
    plot = Path(args.plot or adapter_dir / "lora_updates.png")
    plot_stats(stats, plot)
    compare_plot = None
    if similarities:
        compare_plot = Path(args.compare_plot or adapter_dir / "subspace_similarity.png")
        plot_similarity(similarities, compare_plot, adapter_dir.name, Path(args.compare).name)

    if args.json:
        trainable, total = count_parameters(model)
        report = {
            "adapter": str(adapter_dir),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "energy_share": ENERGY_SHARE,
            "layers": [dataclasses.asdict(s) for s in stats],
            "merge_gap": gap,
            "plot": str(plot),
        }
        if similarities:
            report["compare"] = {
                "other": args.compare,
                "plot": str(compare_plot),
                "layers": [{**dataclasses.asdict(s), "top": s.top, "common": s.common} for s in similarities],
            }
        print(json.dumps(strict_json(report), indent=2, allow_nan=False))
        return
    print(parameter_table(model), end="\n\n")
    print_stats(stats)
    print(f"\nmerged vs unmerged logits on {len(ids)} texts: largest difference {gap:.2e}")
    print(f"plot: {plot}")
    if similarities:
        print_similarity(similarities, Path(args.compare))
        print(f"plot: {compare_plot}")


def run() -> None:
    """The ``lora-inspect`` console command and ``python inspect_lora.py``."""
    run_command(main)


if __name__ == "__main__":
    run()
