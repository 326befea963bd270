"""A trained classifier shipped to a CPU: PyTorch eager (merged) against torch.compile, PyTorch's
dynamic int8, ONNX Runtime float32 and ONNX Runtime int8 (``lora-export --format onnx [--int8]``,
with and without ``--float-ffn-output``).

    python -m bench.deploy [--adapter RUN] [--quick] [--repeats N] [--threads N]

Two models: the MiniLM demo adapter (``--adapter``, default: trained here with the demo recipe,
``make train``'s offline job, into runs/bench-deploy-minilm) and a roberta-base-shaped classifier
(random weights, the real shape, a random LoRA r=10 on query and value merged in; MiniLM's
tokenizer, whose ids are all valid roberta ids). For each variant, interleaved rounds:

- latency at batch 1: median (p50) and p95 over realistic texts (the first 64 bundled AG News test
  texts, each tokenised to its own length, at most 128 tokens);
- throughput at batch 32: texts per second over length-grouped batches of the first 256 texts
  (each batch padded to its own longest text, as predict.py batches);
- size on disk (the merged model's safetensors; torch.save of the int8 model; the .onnx files);
- peak memory: resident set size of a fresh process that loads the variant and classifies 256 texts;
- MiniLM only: accuracy on the 7,600 bundled test rows, and label agreement with eager.

Ratios are to PyTorch eager. Goals: ONNX Runtime int8 >= 2.5x eager at batch 1 and >= 2.0x at
batch 32 on both models, losing at most 0.5 points of accuracy; int8 labels as eager's on at least
99.5% of the test rows.
"""

import copy
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.common import markdown_table
from lora import LoRAConfig, inject_lora, merge_lora
from lora.classifier import Classifier, classification_metrics, load_classifier
from lora.data import BUNDLED_DIR, read_table
from lora.serve.onnx import export_onnx, load_onnx_classifier

VARIANTS = ("eager", "compiled", "torch int8", "onnx float32", "onnx int8", "onnx int8 float-ffn-output")
ONNX_EXPORTS = {  # variant -> export_onnx's settings
    "onnx float32": dict(int8=False),
    "onnx int8": dict(int8=True),
    "onnx int8 float-ffn-output": dict(int8=True, float_ffn_output=True),
}
LATENCY_TEXTS, THROUGHPUT_TEXTS, BATCH = 64, 256, 32
QUICK_LATENCY_TEXTS, QUICK_THROUGHPUT_TEXTS = 8, 64
TARGET_B1, TARGET_B32, TARGET_POINTS, TARGET_AGREEMENT = 2.5, 2.0, 0.5, 0.995
DEMO_RUN = common.REPO_ROOT / "runs" / "bench-deploy-minilm"


# ----------------------------------------------------------------------------- the models
def demo_adapter(folder: Path | None) -> Path:
    """The MiniLM demo adapter: ``folder``, or the demo recipe trained into ``DEMO_RUN`` once."""
    if folder is not None:
        return folder
    if not (DEMO_RUN / "adapter.safetensors").is_file():
        from lora.cli.quickstart import OFFLINE_DEMO

        print(f"training the demo adapter into {DEMO_RUN} (about 6 minutes on 2 cores)", file=sys.stderr)
        command = [sys.executable, "train.py", *OFFLINE_DEMO, "--output-dir", str(DEMO_RUN), "--overwrite"]
        subprocess.run(command, cwd=common.REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return DEMO_RUN


def roberta_classifier(minilm: Classifier) -> Classifier:
    """A roberta-base-shaped classifier (random weights, seeded) with a random LoRA merged in; it
    borrows the MiniLM adapter's config (labels, max length, cleaning) and tokenizer."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(max_position_embeddings=514, type_vocab_size=1, num_labels=4,
                           pad_token_id=minilm.tokenizer.pad_token_id)  # fmt: skip
    model = RobertaForSequenceClassification(config).eval()
    inject_lora(model, LoRAConfig(r=10, alpha=64, target_modules=("query", "value")))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    merge_lora(model)
    return Classifier(model, minilm.tokenizer, minilm.config)


def variants(classifier: Classifier, workspace: Path, check) -> dict[str, Classifier]:
    """Every way of running ``classifier`` (merged, eval mode), and the bytes each takes on disk."""
    out, sizes = {"eager": classifier}, {}
    classifier.model.save_pretrained(workspace / "float")
    sizes["eager"] = sizes["compiled"] = sum(p.stat().st_size for p in (workspace / "float").glob("*.safetensors"))
    compiled = copy.copy(classifier)
    compiled.model = torch.compile(classifier.model, dynamic=True)
    out["compiled"] = compiled
    quantized = copy.copy(classifier)
    quantized.model = torch_int8(classifier.model)
    torch.save(quantized.model.state_dict(), workspace / "int8.pt")
    sizes["torch int8"] = (workspace / "int8.pt").stat().st_size
    out["torch int8"] = quantized
    for name, settings in ONNX_EXPORTS.items():
        folder = workspace / name.replace(" ", "-")
        export_onnx(classifier, folder, check=check, force=True, **settings)
        out[name] = load_onnx_classifier(folder)
        sizes[name] = (folder / "model.onnx").stat().st_size
    return out, sizes


def torch_int8(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """PyTorch's eager dynamic int8 (``quantize_dynamic``: int8 Linear weights, activations
    quantized per batch). Deprecated in favour of torchao, still in torch 2.13."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model if inplace else copy.deepcopy(model)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=inplace)


# ----------------------------------------------------------------------------- timing
def latency_call(classifier: Classifier, token_ids: list[list[int]]):
    """One round: every text alone (batch 1); returns the per-text seconds."""

    def call() -> list[float]:
        seconds = []
        for ids in token_ids:
            started = time.perf_counter()
            classifier.logits([ids], batch_size=1)
            seconds.append(time.perf_counter() - started)
        return seconds

    return call


def throughput_call(classifier: Classifier, token_ids: list[list[int]]):
    """One round: the texts in length-grouped batches of 32; returns texts per second."""

    def call() -> float:
        started = time.perf_counter()
        classifier.logits(token_ids, batch_size=BATCH)
        return len(token_ids) / (time.perf_counter() - started)

    return call


def measure(runs: dict[str, Classifier], token_ids: list[list[int]], latency_texts: int, args) -> dict:
    """p50, p95 latency (ms) and throughput (texts / s) of every variant, interleaved rounds."""
    latency, throughput = {name: [] for name in runs}, {name: [] for name in runs}
    for round_index in range(args.warmup + args.repeats):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            seconds = latency_call(runs[name], token_ids[:latency_texts])()
            rate = throughput_call(runs[name], token_ids)()
            if round_index >= args.warmup:
                latency[name] += seconds
                throughput[name].append(rate)
        print(f"  round {round_index + 1}: " + ", ".join(
            f"{name} {1000 * statistics.median(latency[name] or [0]):.1f} ms" for name in runs),
            file=sys.stderr, flush=True)  # fmt: skip
    return {
        name: {
            "p50": 1000 * statistics.median(latency[name]),
            "p95": 1000 * float(np.percentile(latency[name], 95)),
            "throughput": statistics.median(throughput[name]),
        }
        for name in runs
    }


# ----------------------------------------------------------------------------- memory
def peak_memory(model_name: str, variant: str, adapter: Path, workspace: Path, texts: list[str]) -> float:
    """Peak resident MiB of a fresh process that loads ``variant`` (an export from ``workspace``,
    else the model built from ``adapter``) and classifies ``texts``."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_memory_child, model_name, variant, str(adapter), str(workspace), texts).result()


def _memory_child(model_name: str, variant: str, adapter: str, workspace: str, texts: list[str]) -> float:
    common._fix_mmap_threshold()
    if variant.startswith("onnx"):
        classifier = load_onnx_classifier(Path(workspace) / variant.replace(" ", "-"))
    else:
        classifier = load_classifier(adapter, device="cpu")
        if model_name != "minilm":
            classifier = roberta_classifier(classifier)
        if variant == "compiled":
            classifier.model = torch.compile(classifier.model, dynamic=True)
        elif variant == "torch int8":
            classifier.model = torch_int8(classifier.model, inplace=True)  # the float weights replaced
    classifier.predict_proba(texts, batch_size=BATCH)
    return common._proc_status_bytes("VmHWM") / common.MIB


# ----------------------------------------------------------------------------- the report
def model_part(name: str, classifier: Classifier, adapter: Path, args, texts, test) -> str:
    with tempfile.TemporaryDirectory() as directory:
        workspace = Path(directory)
        check = ("the bundled test split", test["text"].tolist(), test["label"].tolist()) if test is not None else None
        runs, sizes = variants(classifier, workspace, check if name == "minilm" else None)
        token_ids = classifier.token_ids(texts)
        latency_texts = QUICK_LATENCY_TEXTS if args.quick else LATENCY_TEXTS
        print(f"{name}: timing {len(runs)} variants", file=sys.stderr, flush=True)
        timing = measure(runs, token_ids, latency_texts, args)
        memory = {variant: peak_memory(name, variant, adapter, workspace, texts) for variant in runs}
        accuracy = {}
        if test is not None and name == "minilm":
            truth = test["label"].tolist()
            reference = runs["eager"].predict_proba(test["text"].tolist(), batch_size=BATCH).argmax(axis=1)
            for variant, run in runs.items():
                predicted = reference if variant == "eager" else run.predict_proba(
                    test["text"].tolist(), batch_size=BATCH).argmax(axis=1)  # fmt: skip
                accuracy[variant] = (classification_metrics(truth, predicted)["accuracy"],
                                     float((predicted == reference).mean()))  # fmt: skip
    eager = timing["eager"]
    rows = []
    for variant in runs:
        t = timing[variant]
        row = [name, variant, f"{t['p50']:.1f}", f"{t['p95']:.1f}", f"{eager['p50'] / t['p50']:.2f}x",
               f"{t['throughput']:.1f}", f"{t['throughput'] / eager['throughput']:.2f}x",
               f"{sizes[variant] / 1e6:.1f}", f"{memory[variant]:.0f}"]  # fmt: skip
        if accuracy:
            acc, agree = accuracy[variant]
            row += [f"{100 * acc:.2f}", f"{100 * (acc - accuracy['eager'][0]):+.2f}", f"{100 * agree:.2f}%"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    int8 = timing["onnx int8"]
    b1, b32 = eager["p50"] / int8["p50"], int8["throughput"] / eager["throughput"]
    points = 100 * (accuracy["onnx int8"][0] - accuracy["eager"][0]) if accuracy else None
    verdict = (
        "PASS" if b1 >= TARGET_B1 and b32 >= TARGET_B32 and (points is None or -points <= TARGET_POINTS) else "MISS"
    )
    lost = f", {points:+.2f} points of accuracy (goal >= -{TARGET_POINTS})" if accuracy else ""
    goal = (
        f"{name}: ONNX Runtime int8 {b1:.2f}x eager at batch 1 (goal >= {TARGET_B1}), {b32:.2f}x at batch 32 "
        f"(goal >= {TARGET_B32}){lost}: **{verdict}**"
    )
    if accuracy:
        agreements = ", ".join(
            f"{variant} {100 * accuracy[variant][1]:.2f}% "
            f"(**{'PASS' if accuracy[variant][1] >= TARGET_AGREEMENT else 'MISS'}**)"
            for variant in ONNX_EXPORTS
            if "int8" in variant
        )
        goal += f"; int8 labels as eager's on the test rows (goal >= {100 * TARGET_AGREEMENT:g}%): {agreements}"
    return rows, goal


def main(argv=None) -> None:
    parser = common.make_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--adapter", type=Path, default=None, help="the MiniLM adapter (default: the demo's)")
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    table = read_table(BUNDLED_DIR / "test.csv")
    texts = table["text"].head(QUICK_THROUGHPUT_TEXTS if args.quick else THROUGHPUT_TEXTS).tolist()
    adapter = demo_adapter(args.adapter)
    minilm = load_classifier(adapter, device="cpu")
    test = None
    if not args.quick:
        from lora.data import encode_labels

        test = encode_labels(table, minilm.labels, "the bundled test split")
    rows, goals = [], []
    for name, classifier in (("minilm", minilm), ("roberta-base shape", roberta_classifier(minilm))):
        model_rows, goal = model_part(name, classifier, adapter, args, texts, test if name == "minilm" else None)
        rows += model_rows
        goals.append(goal)
    body = (
        "### Latency, throughput, size, memory and accuracy of each way to run a merged classifier\n\n"
        f"Batch 1: each of the first {QUICK_LATENCY_TEXTS if args.quick else LATENCY_TEXTS} bundled AG News test "
        f"texts alone, at its own length (at most {minilm.config.max_length} tokens); p50 and p95 of all rounds. "
        f"Batch 32: the first {len(texts)} texts in length-grouped batches, texts per second, median of the rounds. "
        "Size: the merged model's safetensors (eager, compiled), torch.save of the int8 model, the .onnx file. "
        "Memory: peak resident MiB of a fresh process loading the variant and classifying the texts. Accuracy: "
        "the 7,600 bundled test rows (MiniLM demo adapter), and agreement with eager's labels. "
        f"Torch threads: {torch.get_num_threads()}; ONNX Runtime: its default threads.\n\n"
        + markdown_table(
            [
                "model",
                "variant",
                "b1 p50 ms",
                "b1 p95 ms",
                "b1 speed-up",
                "b32 texts / s",
                "b32 speed-up",
                "size MB",
                "peak MiB",
                "accuracy %",
                "points vs eager",
                "labels as eager",
            ],
            rows,
        )  # fmt: skip
        + "\n\n"
        + "\n".join(f"- {goal}" for goal in goals)
    )
    common.report(args, "bench/deploy.py", "bench/deploy.py: a merged classifier on a CPU, PyTorch vs ONNX Runtime",
                  "\n\n".join([body, common.run_summary(started, load_at_start)]))  # fmt: skip


if __name__ == "__main__":
    main()
