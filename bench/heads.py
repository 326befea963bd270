"""The classification head in the parameter budget: what each ``--head`` costs, and what MiniLM
reaches on the bundled AG News when the budget of the demo's head goes to LoRA rank instead.

    python -m bench.heads [--configs NAME ...] [--seeds 42 43 44] [--jobs 1]
                          [--runs-dir runs/bench-heads] [--report-only] [--output PATH]

Part 1 (no training): the exact trainable counts of ``--head full``, ``lora`` and ``linear`` for
roberta-base (the course project's r=10, alpha=64 on query and value; counted on the meta device,
shapes only) and for the offline demo's MiniLM recipe.

Part 2: whole ``python train.py`` processes on the demo's data (MiniLM, bundled AG News,
``--clean``), 3 seeds each: the demo's recipe as ``make train`` runs it (r=8 on every attention and
FFN Linear, the head in full: BERT's pooler 384 x 384 and the classifier), against the same
recipe at the largest rank whose count stays within the demo's, with ``--head lora`` (LoRA on the
pooler, the classifier in full) or ``--head linear`` (the classifier alone, the pooler frozen).
alpha / r stays 2. A run whose ``summary.json`` exists is not run again (``--report-only``
tabulates what is there); ``--jobs 2`` runs two processes at once with one thread each.
"""

import statistics
import time
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from bench import common, recipes
from lora.cli.train import parse_args
from lora.config import HEADS
from lora.model import count_parameters, head_parameters, inject_lora
from lora.search.space import TARGETS, ParameterCounter

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
DEMO = recipes.RECIPES[recipes.CHOSEN]  # `make train` offline: HEAD (classifier and pooler in full) + the rest


def with_rank(head: str, r: int) -> list[str]:
    """The demo's flags with the pooler no longer named, ``--r r --alpha 2r`` and ``--head head``."""
    flags = DEMO[len(recipes.HEAD) :]
    settings = {"--r": str(r), "--alpha": str(2 * r)}
    return [settings.get(flags[i - 1], flag) for i, flag in enumerate(flags)] + ["--head", head]


def counts(counter: ParameterCounter, flags: list[str]) -> tuple[int, int]:
    """``(trainable, of which the head)`` of the train.py run with ``flags``, from shapes alone."""
    model = counter.meta_model()
    inject_lora(model, parse_args(recipes.DATA + flags).lora_config())
    return count_parameters(model)[0], head_parameters(model)


def configurations(counter: ParameterCounter) -> dict[str, list[str]]:
    """The demo, and its budget spent on rank with the cheaper heads: the largest rank that fits."""
    budget, _ = counts(counter, DEMO)
    found = {f"demo: r={parse_args(DEMO).r}, head full": DEMO}
    for head in ("lora", "linear"):
        fixed, per_rank = counter.cost(TARGETS["all"], None, None, head)
        r = (budget - fixed) // per_rank
        found[f"r={r}, head {head}"] = with_rank(head, r)
    return found


def count_rows(counter: ParameterCounter, found: dict[str, list[str]]) -> list[list[str]]:
    """roberta-base with the course project's r=10, alpha=64 on query and value under each head,
    then the MiniLM configurations of part 2."""
    rows = []
    for head in HEADS:
        with torch.device("meta"):
            model = RobertaForSequenceClassification(
                RobertaConfig(max_position_embeddings=514, type_vocab_size=1, num_labels=4)
            )
        inject_lora(model, ("query", "value"), r=10, alpha=64.0, head=head)
        rows.append(["roberta-base, r=10 on query and value", head, count_parameters(model)[0], head_parameters(model)])
    for name, flags in found.items():
        rows.append([f"MiniLM, {name}", parse_args(flags).head, *counts(counter, flags)])
    return [[model, head, f"{trainable:,}", f"{head_count:,}"] for model, head, trainable, head_count in rows]


def table(args, found: dict[str, list[str]]) -> str:
    rows = []
    for name in args.configs:
        runs = [run for seed in args.seeds if (run := recipes.read_run(recipes.run_dir(args.runs_dir, name, seed)))]
        if not runs:
            rows.append([name, f"`{' '.join(found[name])}`", 0, "not run", "", "", "", "", ""])
            continue
        accuracies = [100 * summary["test"]["accuracy"] for summary, _ in runs]
        spread = (
            f"{statistics.stdev(accuracies):.2f} ({min(accuracies):.2f}-{max(accuracies):.2f})"
            if len(accuracies) > 1
            else f"- ({accuracies[0]:.2f})"
        )
        minutes = [wall["seconds"] / 60 for _, wall in runs if wall]
        rows.append(
            [
                name,
                f"`{' '.join(found[name])}`",
                len(runs),
                f"{statistics.mean(accuracies):.2f}",
                spread,
                f"{runs[0][0]['trainable_parameters']:,}",
                f"{runs[0][0]['head_parameters']:,}",
                recipes.steps_cell([summary["steps"] for summary, _ in runs]),
                f"{statistics.median(minutes):.1f} ({runs[0][1].get('jobs', 1)} at once)" if minutes else "-",
            ]
        )
    return common.markdown_table(
        [
            "configuration",
            "train.py flags (after the data flags)",
            "seeds",
            "test accuracy % (mean)",
            "std (min-max)",
            "trainable parameters",
            "of which the head",
            "optimizer steps",
            "wall minutes per run (median)",
        ],
        rows,
    )


def main(argv=None) -> None:
    counter = ParameterCounter("minilm", LABELS)
    found = configurations(counter)
    parser = common.make_parser(__doc__, repeats=1)
    parser.add_argument("--configs", nargs="+", choices=list(found), default=list(found), metavar="NAME")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--jobs", type=int, default=1, help="train.py processes at once (default: %(default)s)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-heads"))
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs in --runs-dir")
    args = common.parse_args(parser, argv)
    args.recipes = args.configs
    started, load_at_start = time.perf_counter(), common.load_average()
    if not args.report_only:
        recipes.train_all(args, found)
    head_table = common.markdown_table(
        ["model and LoRA", "--head", "trainable parameters", "of which the head"], count_rows(counter, found)
    )
    body = "\n\n".join(
        [
            "Part 1, the head in the budget (exact counts; `--head full`: the head's hidden and output "
            "layers in full; `lora`: LoRA of the same rank on the hidden layer, the output layer in full; "
            "`linear`: the output layer alone):",
            head_table,
            f"Part 2: every run is `python train.py {' '.join(recipes.DATA)} FLAGS --seed SEED` "
            "(`HF_HUB_OFFLINE=1`), tested once on the official 7,600-row split with the best adapter on "
            "validation. The cheaper heads get the largest rank (alpha = 2r) whose count stays within the "
            "demo's.",
            table(args, found),
            common.run_summary(started, load_at_start),
        ]
    )
    common.report(
        args,
        "bench/heads.py",
        "bench/heads.py: the head in the parameter budget",
        body,
        device_line="CPU, float32; one train.py process per run",
    )


if __name__ == "__main__":
    main()
