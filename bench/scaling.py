"""Training step time and peak memory of this project's LoRA against full fine-tuning as the
rank grows and as the sequence length grows, on the roberta-base shape (random weights).

    python -m bench.scaling [--device auto|cpu|cuda] [--quick] [--repeats N] [--warmup N]
                            [--threads N] [--rank-batch N] [--seq-batch N]

Rank sweep: LoRA r = 1, 2, 4, 8, 16, 64 (alpha 16) at batch ``--rank-batch`` x 128 tokens, with
full fine-tuning as the rank-free reference; all seven interleaved. Sequence sweep: 32 to 512
tokens at batch ``--seq-batch``, LoRA r=8 and full fine-tuning interleaved per length. Memory:
every point's peak training memory, each in a fresh process. LoRA on query and value, head
trainable. Writes a section of BENCHMARKS.md and the plot bench/scaling.png.
"""

import time
from pathlib import Path

from bench import common
from bench.common import Setup, markdown_table, paired_ratio, ratio_cell

PLOT = Path(__file__).with_name("scaling.png")
QUICK_PLOT = Path(__file__).parent / "out" / "scaling.png"  # git-ignored
RANKS, SEQ_LENS, RANK_SWEEP_SEQ_LEN = (1, 2, 4, 8, 16, 64), (32, 64, 128, 256, 512), 128
QUICK_RANKS, QUICK_SEQ_LENS = (1, 4), (16, 32)
SEQ_SWEEP_R, ALPHA = 8, 16.0


def measure(setups: dict[str, Setup], base, args) -> dict[str, dict[str, float]]:
    """Per named setup: median seconds per training step and its paired ratio to the ``full``
    setup (all interleaved), and peak training memory (a fresh process each; see
    ``common.measure_training_memory``)."""
    steps = common.build_training_steps(setups, args.device, base)
    times = common.interleaved_times(steps, args.device, args.repeats, args.warmup)
    del steps  # free the models before the memory processes start
    seconds = common.medians(times)
    return {
        name: {
            "seconds": seconds[name],
            "vs_full": paired_ratio(times, name, "full"),
            **common.measure_training_memory(setup, args.device),
        }
        for name, setup in setups.items()
    }


def rank_sweep(model, ranks, batch_size, base, args) -> dict[str, dict[str, float]]:
    """``r=1`` ... and ``full`` at ``batch_size`` x 128 tokens, measured together."""
    setups = {f"r={r}": Setup(model, "ours", batch_size, RANK_SWEEP_SEQ_LEN, r=r, alpha=ALPHA) for r in ranks}
    setups["full"] = Setup(model, "full", batch_size, RANK_SWEEP_SEQ_LEN)
    return measure(setups, base, args)


def seq_sweep(model, seq_lens, batch_size, base, args) -> dict[int, dict[str, dict[str, float]]]:
    """Per sequence length: ``ours`` (r=8) and ``full``, measured together."""
    return {
        seq_len: measure(
            {
                "ours": Setup(model, "ours", batch_size, seq_len, r=SEQ_SWEEP_R, alpha=ALPHA),
                "full": Setup(model, "full", batch_size, seq_len),
            },
            base,
            args,
        )
        for seq_len in seq_lens
    }


def rank_table(results: dict[str, dict[str, float]]) -> str:
    """One row per rank and one for full fine-tuning, with ratios to full fine-tuning."""
    full = results["full"]
    rows = [
        [
            name,
            f"{m['seconds']:.3f}",
            ratio_cell(m["vs_full"]),
            f"{m['increase']:.0f}",
            ratio_cell(m["increase"] / full["increase"]),
            f"{m['peak']:.0f}",
        ]
        for name, m in results.items()
    ]
    return markdown_table(
        ["variant", "s / step", "time vs full FT", "peak increase MiB", "increase vs full FT", "absolute peak MiB"],
        rows,
    )


def seq_table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    """One row per sequence length: ours and full fine-tuning side by side, with ratios."""
    rows = []
    for seq_len, m in results.items():
        ours, full = m["ours"], m["full"]
        rows.append(
            [
                seq_len,
                f"{ours['seconds']:.3f}",
                f"{full['seconds']:.3f}",
                ratio_cell(ours["vs_full"]),
                f"{ours['increase']:.0f}",
                f"{full['increase']:.0f}",
                ratio_cell(ours["increase"] / full["increase"]),
                f"{ours['peak']:.0f}",
                f"{full['peak']:.0f}",
            ]
        )
    return markdown_table(
        [
            "tokens",
            "ours s",
            "full FT s",
            "ours / full FT",
            "ours increase MiB",
            "full FT increase MiB",
            "ours / full FT",
            "ours peak MiB",
            "full FT peak MiB",
        ],
        rows,
    )


def plot(model, ranks, by_rank, by_seq, path: Path, args) -> None:
    """Two rows (time, memory increase) by two columns (vs rank, vs sequence length)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    seq_lens = list(by_seq)
    memory_unit = "CUDA allocated" if args.device.type == "cuda" else "RSS"
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    for row, key, label in (
        (0, "seconds", "seconds per training step"),
        (1, "increase", f"peak increase, MiB ({memory_unit})"),
    ):
        by_rank_axis, by_seq_axis = axes[row]
        by_rank_axis.plot(ranks, [by_rank[f"r={r}"][key] for r in ranks], "o-", label="ours (LoRA)")
        by_rank_axis.axhline(by_rank["full"][key], color="C1", linestyle="--", label="full fine-tuning")
        by_seq_axis.plot(
            seq_lens, [by_seq[n]["ours"][key] for n in seq_lens], "o-", label=f"ours (LoRA r={SEQ_SWEEP_R})"
        )
        by_seq_axis.plot(seq_lens, [by_seq[n]["full"][key] for n in seq_lens], "s--", label="full fine-tuning")
        for axis, ticks in ((by_rank_axis, ranks), (by_seq_axis, seq_lens)):
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(t) for t in ticks])
            axis.set_ylim(bottom=0)
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            axis.legend()
    axes[0][0].set_title(f"rank sweep: batch {args.rank_batch} x {RANK_SWEEP_SEQ_LEN} tokens")
    axes[0][1].set_title(f"sequence length sweep: batch {args.seq_batch}")
    axes[1][0].set_xlabel("LoRA rank r")
    axes[1][1].set_xlabel("sequence length (tokens)")
    figure.suptitle(f"{model} shape, training step: LoRA (query, value) vs full fine-tuning")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    parser = common.make_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--rank-batch", type=int, default=8, help="rank sweep batch size (8)")
    parser.add_argument("--seq-batch", type=int, default=4, help="sequence sweep batch size (4)")
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    model = "roberta-tiny" if args.quick else "roberta-base"
    ranks, seq_lens = (QUICK_RANKS, QUICK_SEQ_LENS) if args.quick else (RANKS, SEQ_LENS)
    base = common.build_base_model(model)
    by_rank = rank_sweep(model, ranks, args.rank_batch, base, args)
    by_seq = seq_sweep(model, seq_lens, args.seq_batch, base, args)
    plot_path = QUICK_PLOT if args.quick else PLOT
    plot(model, ranks, by_rank, by_seq, plot_path, args)
    body = "\n\n".join(
        [
            f"Model: {model} shape, random weights; LoRA on query and value, head trainable. "
            f"{common.memory_note(args.device)} Plot: `{plot_path.relative_to(common.REPO_ROOT)}`.",
            f"### Rank sweep: batch {args.rank_batch} x {RANK_SWEEP_SEQ_LEN} tokens, alpha {ALPHA:g}",
            rank_table(by_rank),
            f"### Sequence length sweep: batch {args.seq_batch}, LoRA r={SEQ_SWEEP_R}",
            seq_table(by_seq),
            common.run_summary(started, load_at_start),
        ]
    )
    common.report(
        args, "bench/scaling.py", "bench/scaling.py: LoRA vs full fine-tuning as rank and sequence length grow", body
    )


if __name__ == "__main__":
    main()
