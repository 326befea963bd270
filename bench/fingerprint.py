"""The base fingerprint's cost (``lora.model.base_fingerprint``, taken once by ``inject_lora``).

    python -m bench.fingerprint [--quick] [--repeats N] [--threads N]

On the roberta-base shape (``RobertaConfig()`` defaults, random float32 weights on the CPU):
seconds to hash the adapted modules' weights for the default targets (query, value: 24
matrices 768 x 768) and for every encoder Linear (query, key, value, attention.output.dense,
intermediate.dense, output.dense: 72 matrices). Goal: under 1 s. ``--quick``: the tiny shape.
"""

import time

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from bench import common
from lora.model import base_fingerprint, is_target

TARGET_SECONDS = 1.0
TARGETS = {
    "query, value (default)": ("query", "value"),
    "every encoder Linear": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}


def adapted_names(model: torch.nn.Module, targets) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layer." in name and is_target(name, targets)
    ]


def main(argv=None) -> None:
    args = common.parse_args(common.make_parser(__doc__, repeats=7), argv)
    shape = common.ROBERTA_SHAPES["roberta-tiny"] if args.quick else {}
    model = RobertaForSequenceClassification(RobertaConfig(**shape, num_labels=4)).eval()
    rows = []
    for label, targets in TARGETS.items():
        names = adapted_names(model, targets)
        numbers = sum(
            model.get_submodule(name).weight.numel() + model.get_submodule(name).bias.numel() for name in names
        )
        for _ in range(args.warmup):
            base_fingerprint(model, names)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            base_fingerprint(model, names)
            times.append(time.perf_counter() - started)
        seconds = sorted(times)[len(times) // 2]
        rows.append(
            (
                label,
                len(names),
                f"{numbers * 4 / 1e6:.0f}",
                f"{seconds:.3f}",
                common.ratio_cell(seconds, TARGET_SECONDS),
            )
        )
    title = "bench/fingerprint.py: the base fingerprint's cost" + (" (quick: tiny shape)" if args.quick else "")
    body = common.markdown_table(
        ("adapted modules", "matrices", "MB hashed", "seconds (median)", "seconds vs goal"), rows
    )
    common.report(
        args,
        "bench/fingerprint.py",
        title,
        body,
        device_line=f"CPU, float32 weights, RobertaConfig() defaults; {args.warmup} warm-up, "
        f"median of {args.repeats} timed calls",
    )


if __name__ == "__main__":
    main()
