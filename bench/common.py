"""Shared benchmark machinery: command line, models and their variants, training and inference
steps, interleaved timing, peak memory in a fresh process, machine info, BENCHMARKS.md sections.

Variants of one model: ``base`` (as loaded, for inference), ``full`` (everything trains),
``ours`` (``lora.inject_lora``) and ``peft`` (``peft.get_peft_model``), both LoRA on query and
value with the classifier head trainable and the same r, alpha and dropout. Any of them may run
with activation checkpointing and compiled (``lora.execution``, what ``train.py``'s
``--gradient-checkpointing`` and ``--compile`` do).
"""

import argparse
import copy
import ctypes
import datetime
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora import inject_lora, quantize_base
from lora.classifier import load_classifier_model
from lora.train.execution import checkpoint_activations

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TARGET_MODULES = ("query", "value")
MIB = 2**20
# Random-weight RoBERTa shapes (timing needs no pretrained weights); roberta-tiny is for --quick.
ROBERTA_SHAPES = {
    "roberta-base": dict(max_position_embeddings=514, type_vocab_size=1),  # its config.json
    "roberta-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
INTRO = (
    "# Benchmarks\n\nWritten by the scripts in `bench/` (not part of the test suite or CI); "
    "each script replaces only its own section. Times are medians over interleaved rounds; "
    "a ratio is the median of the per-round ratios; its target is met (PASS) when "
    "the ratio is at or below it.\n"
)


# ----------------------------------------------------------------------------- command line
def make_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark script shares; ``repeats`` is the default of a full run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available (fp16 autocast + GradScaler there)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny shapes, 1 repeat; prints only, unless --output"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed rounds after the warm-up (default {repeats}; 1 with --quick)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice, one per core); 1 on a "
        "machine whose cores other busy processes share, where threads "
        "wait for each other at every parallel op",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file for the results (default {BENCHMARKS_MD.name} in the repo root; none with --quick)",
    )
    parser.set_defaults(full_repeats=repeats)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """Parse, then resolve ``device`` to a ``torch.device`` and fill the quick/full defaults."""
    args = parser.parse_args(argv)
    args.command = shlex.join(sys.argv[1:] if argv is None else argv)
    args.device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the spawned memory processes
    if args.repeats is None:
        args.repeats = 1 if args.quick else args.full_repeats
    if args.output is None and not args.quick:
        args.output = BENCHMARKS_MD
    return args


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Setup:
    """One training configuration: model shape, variant, LoRA rank/alpha and batch shape;
    for ``ours``, the frozen base optionally quantized (``int8``, ``nf4``, ``nf4+dq``); any
    variant with its encoder layers' activations checkpointed, and compiled."""

    model: str
    variant: str
    batch_size: int
    seq_len: int
    r: int = 10
    alpha: float = 64.0
    quantize: str | None = None  # "int8", "nf4", "nf4+dq"
    checkpointing: bool = False  # --gradient-checkpointing
    compiled: bool = False  # --compile: torch.compile; its first step pays for the compile
    dropout: float = 0.0  # on the LoRA input (ours, peft)


def build_base_model(name: str) -> nn.Module:
    """A 4-label sequence classifier: ``minilm`` pretrained, RoBERTa shapes with random weights.
    Its ``problem_type`` is set, as transformers would set it at the first call with labels: a
    compiled model's first graph would test it, and the second call would compile again."""
    torch.manual_seed(0)
    if name == "minilm":
        model = load_classifier_model("minilm", LABELS)
    else:
        from transformers import RobertaConfig, RobertaForSequenceClassification

        model = RobertaForSequenceClassification(RobertaConfig(num_labels=len(LABELS), **ROBERTA_SHAPES[name]))
    model.config.problem_type = "single_label_classification"
    return model


def build(setup: Setup, base: nn.Module | None = None) -> nn.Module:
    """The model of ``setup``: its variant of a copy of ``base`` (None: built anew)."""
    model = build_base_model(setup.model) if base is None else copy.deepcopy(base)
    if setup.variant == "ours":
        inject_lora(
            model,
            TARGET_MODULES,
            r=setup.r,
            alpha=setup.alpha,
            dropout=setup.dropout,
            trainable_modules=("classifier",),
        )
        if setup.quantize is not None:
            scheme, _, double_quant = setup.quantize.partition("+")
            quantize_base(model, scheme, double_quant == "dq")
    elif setup.variant == "peft":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            r=setup.r,
            lora_alpha=setup.alpha,
            target_modules=list(TARGET_MODULES),
            lora_dropout=setup.dropout,
            modules_to_save=["classifier"],
            task_type=TaskType.SEQ_CLS,
        )
        model = get_peft_model(model, config)
    elif setup.variant not in ("base", "full"):
        raise ValueError(f"unknown variant {setup.variant!r}")
    if setup.checkpointing:
        checkpoint_activations(model)  # peft's model hands the call on to the transformers model inside
    return torch.compile(model) if setup.compiled else model


def make_batch(
    model: nn.Module, batch_size: int, seq_len: int, device: torch.device, labels: bool = True
) -> dict[str, torch.Tensor]:
    """A seeded random batch of ``batch_size`` full-length sequences (no padding)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        batch["labels"] = torch.randint(0, len(LABELS), (batch_size,), generator=generator)
    return {key: value.to(device) for key, value in batch.items()}


# ----------------------------------------------------------------------------- steps
def autocast(device: torch.device):
    """fp16 autocast on CUDA; a disabled context on CPU (fp32)."""
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def training_step(model: nn.Module, batch: dict, device: torch.device) -> Callable[[], None]:
    """A function doing one step per call: forward, backward, AdamW step (trainable parameters
    only), ``zero_grad(set_to_none=True)``; GradScaler on CUDA."""
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def step() -> None:
        with autocast(device):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_step(model: nn.Module, batch: dict, device: torch.device) -> Callable[[], None]:
    """A function doing one eval-mode forward under ``torch.inference_mode`` per call."""
    model.to(device).eval()

    def step() -> None:
        with torch.inference_mode(), autocast(device):
            model(**batch)

    return step


def build_training_steps(
    setups: dict[str, Setup], device: torch.device, base: nn.Module | None = None
) -> dict[str, Callable[[], None]]:
    """One training step function per named setup, each on its own copy of ``base``."""
    steps = {}
    for name, setup in setups.items():
        model = build(setup, base)
        steps[name] = training_step(model, make_batch(model, setup.batch_size, setup.seq_len, device), device)
    return steps


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(calls: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """The values the functions return, run round-robin: ``warmup`` rounds discarded, then
    ``repeats`` rounds kept, so that drift in the machine's load hits every function alike;
    entry ``i`` of every list comes from the same round. Every other round runs in reverse
    order (A B C, C B A, ...), so that no function always follows the same one. Each round is
    logged to stderr."""
    values = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        names = list(calls) if round_index % 2 == 0 else list(reversed(calls))
        results = {name: calls[name]() for name in names}
        kind = "warm-up" if round_index < warmup else "round"
        print(
            f"  {kind} {round_index + 1}/{warmup + repeats}: "
            + ", ".join(f"{name} {value:.4g}" for name, value in results.items()),
            file=sys.stderr,
            flush=True,
        )
        if round_index >= warmup:
            for name, value in results.items():
                values[name].append(value)
    return values


def timed(call: Callable[[], None], device: torch.device) -> Callable[[], float]:
    """``call`` made to return its wall time in seconds (CUDA synchronized before and after)."""

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        return time.perf_counter() - start

    return run


def interleaved_times(
    calls: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, per timed round (see ``round_robin``)."""
    return round_robin({name: timed(call, device) for name, call in calls.items()}, repeats, warmup)


def medians(values: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list."""
    return {name: statistics.median(results) for name, results in values.items()}


def paired_ratios(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """Per round, ``numerator``'s time / ``denominator``'s time. The two ran back to back, so a
    change in the load of a shared machine between rounds cancels out of each ratio."""
    return [a / b for a, b in zip(times[numerator], times[denominator])]


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median of ``paired_ratios``."""
    return statistics.median(paired_ratios(times, numerator, denominator))


def paired_ratio_cell(
    times: dict[str, list[float]], numerator: str, denominator: str, target: float | None = None
) -> str:
    """``ratio_cell`` of ``paired_ratio``, then the range of the per-round ratios."""
    ratios = paired_ratios(times, numerator, denominator)
    return f"{ratio_cell(statistics.median(ratios), target)}; rounds {min(ratios):.2f}-{max(ratios):.2f}"


# ----------------------------------------------------------------------------- memory
def measure_training_memory(setup: Setup, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Peak memory (MiB) of ``steps`` training steps of ``setup`` in a fresh spawned process.

    Returns ``loaded`` (after building model, optimizer and batch and one no-grad forward),
    ``peak`` and ``increase`` (peak - loaded). CPU: resident set size, with glibc's mmap
    threshold fixed (see ``_fix_mmap_threshold``); the peak is ``VmHWM`` of /proc/self/status,
    reset after loading. (``ru_maxrss`` would be wrong here: Linux carries the parent's peak
    RSS over fork + exec into the child.) CUDA: ``torch.cuda`` memory allocated by tensors.
    Two steps, so that AdamW's state exists during a backward pass.
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_memory_child, setup, str(device), steps).result()


def memory_note(device: torch.device) -> str:
    """How ``measure_training_memory`` measures, for the reports."""
    unit = (
        "MiB of CUDA memory allocated"
        if device.type == "cuda"
        else "MiB of resident set size (glibc's mmap threshold fixed at 128 KiB, so that freed tensors leave it)"
    )
    return (
        f"Memory: {unit}, two training steps in a fresh process per measurement; *loaded*: "
        "after building model, optimizer and batch and one no-grad forward of a 1 x 8 batch "
        "(lazy imports, one-time set-up); *increase*: peak - loaded."
    )


def _memory_child(setup: Setup, device_name: str, steps: int) -> dict[str, float]:
    """The body of ``measure_training_memory``, run in the spawned process."""
    device = torch.device(device_name)
    if device.type == "cpu":
        _fix_mmap_threshold()
    model = build(setup)
    step = training_step(model, make_batch(model, setup.batch_size, setup.seq_len, device), device)
    with torch.no_grad():  # lazy imports and one-time set-up happen here, so they count as loaded
        model(**make_batch(model, 1, 8, device))
    synchronize(device)
    loaded = _reset_peak_memory(device)
    for _ in range(steps):
        step()
    synchronize(device)
    peak = _peak_memory(device)
    return {"loaded": loaded / MIB, "peak": peak / MIB, "increase": (peak - loaded) / MIB}


def _fix_mmap_threshold(size: int = 128 * 1024) -> None:
    """Make glibc serve every block of ``size`` bytes or more by ``mmap`` and return it to the
    system when freed. Its default threshold grows as blocks are freed, after which freed
    tensors stay resident, so that the RSS peak of one and the same run varied by ~100 MiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: keep the allocator's defaults
    libc.mallopt(-3, size)  # -3: M_MMAP_THRESHOLD


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_memory(device: torch.device) -> int:
    """Reset the peak counter to the current usage, and return that usage in bytes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
    return _proc_status_bytes("VmRSS")


def _peak_memory(device: torch.device) -> int:
    """Bytes at the peak since ``_reset_peak_memory``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


# ----------------------------------------------------------------------------- reporting
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_line(device: torch.device) -> str:
    """CPU model, usable cores, torch threads, and the GPU when timing on CUDA."""
    line = f"{cpu_model()}, {usable_cores()} cores (torch threads: {torch.get_num_threads()})"
    if device.type == "cuda":
        line += f"; GPU: {torch.cuda.get_device_name(device)}"
    return line


def load_average() -> float:
    """The 1-minute load average: runnable processes, averaged (Linux, macOS)."""
    return os.getloadavg()[0]


def load_line(start: float, end: float) -> str:
    """The load averages at the start and end of a run, flagged when other processes were
    competing for the cores (more than one runnable process beyond the usable cores)."""
    cores = usable_cores()
    line = f"Load average (1 min) at start / end: {start:.1f} / {end:.1f} on {cores} cores"
    if max(start, end) > cores + 1:
        line += " -- high: other processes shared the cores, so wall times are inflated"
    return line


def run_summary(started: float, load_at_start: float) -> str:
    """Markdown bullets: the run's wall-clock minutes since ``started`` (``time.perf_counter``)
    and the load averages at its start and now (see ``load_line``)."""
    return (
        f"- Whole run: {(time.perf_counter() - started) / 60:.1f} minutes wall clock\n"
        f"- {load_line(load_at_start, load_average())}"
    )


def versions_line() -> str:
    """Python, torch, transformers and peft versions."""
    import peft
    import transformers

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_cell(value: float, target: float | None = None) -> str:
    """``0.612`` or, against a target, ``0.612 PASS (<= 0.70)``."""
    if target is None:
        return f"{value:.3f}"
    verdict = "PASS" if value <= target else "MISS"
    return f"{value:.3f} {verdict} (<= {target:.2f})"


def report(args, script: str, title: str, body: str, device_line: str | None = None) -> None:
    """Print the results, and write them as the ``script`` section of ``args.output`` (if set):
    the section between its markers is replaced, the rest of the file is kept. ``device_line``
    replaces the default device and timing line (for a script that is not an interleaved timing)."""
    module = Path(script).with_suffix("").as_posix().replace("/", ".")
    device_note = "CUDA, fp16 autocast + GradScaler" if args.device.type == "cuda" else "CPU, float32"
    section = "\n".join(
        [
            f"<!-- BEGIN {script} -->",
            f"## {title}",
            "",
            f"- Command: `python -m {module}{' ' + args.command if args.command else ''}` "
            "(from the repo root, `HF_HUB_OFFLINE=1`)",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {machine_line(args.device)}",
            f"- Versions: {versions_line()}",
            f"- Device: {device_line}"
            if device_line
            else f"- Device: {device_note}; timing: {args.warmup} warm-up round(s), then {args.repeats} "
            "timed round(s), variants interleaved (A B C A B C ...); times: medians; "
            "ratios: median of the per-round ratios",
            "",
            body.strip(),
            f"<!-- END {script} -->",
        ]
    )
    print(section)
    if args.output is not None:
        _replace_section(args.output, script, section)
        print(f"\nwritten to {args.output}")


def _replace_section(path: Path, script: str, section: str) -> None:
    """Put ``section`` in place of the old ``script`` section of ``path``, or append it."""
    begin, end = f"<!-- BEGIN {script} -->", f"<!-- END {script} -->"
    text = path.read_text() if path.exists() else INTRO
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
