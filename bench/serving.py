"""Many adapters on one base: a mixed batch against the base alone, a loop over merged models and
peft's mixed batch; and lora-serve under load, with dynamic batching on and off.

    python -m bench.serving [--device auto|cpu|cuda] [--quick] [--repeats N] [--warmup N]
                            [--load-seconds S] [--clients N] [--parts batch load overload]

1. One batch of 64 rows x 64 tokens (about an AG News text) spread evenly over 1, 8 and 32
   LoRA adapters (r=10, alpha=64, query and value, each its own head), on MiniLM and the
   roberta-base shape, interleaved rounds, milliseconds per batch:
   - base: the base model alone on the batch (no adapter: the floor);
   - ours: ``MultiAdapterModel``, one forward, each row's update gathered (padded to the largest rank);
   - grouped: the same, with the update computed by a loop over the adapters present instead
     of the gather (the alternative the library does not keep);
   - merged loop: for each adapter present, its rows through its merged model (one merged copy
     reused for every adapter: the same compute as one copy each, without K copies of memory);
   - peft: ``peft`` with the K adapters loaded, ``model(**batch, adapter_names=[...])``.
   All give the same logits (checked before timing; the merged loop on adapter 0's rows).
   Targets: ours / base <= 1.30 at 32 adapters; ours / peft <= 1.00.
2. Load test on loopback: ``serve.py`` in a subprocess serving 8 MiniLM adapters (2, 4 and 5
   labels), 16 client threads for 60 s, each sending 1-4 random AG News test texts to a random
   adapter and waiting for the answer; batching on (``--max-batch 64 --batch-wait-ms 5``) and
   off (``--max-batch 1``). Every answer is checked against ``predict.py``'s offline
   predictions for the same text and adapter: none lost, none mismatched. Throughput (texts
   per second), p50 / p99 latency. The clients share the machine with the server.
3. Overload: the server with its defaults, 32 clients each sending 256 texts in a loop (after a
   429, waiting what ``Retry-After`` says): p50 / p99 of the accepted requests against the
   deadline, how many were refused (429) or expired (504), none accepted lost or wrong.
   ``--parts overload`` runs this part alone.
"""

import copy
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bench import common
from bench.common import markdown_table, paired_ratio_cell
from lora import inject_lora, lora_layers, lora_state_dict, merge_lora, save_adapter
from lora.classifier import load_classifier, load_classifier_model
from lora.data import BUNDLED_DIR, read_table
from lora.serve.multi import AdapterWeights, MultiAdapterModel, MultiLoRALinear

LORA = dict(r=10, alpha=64.0)
ADAPTER_COUNTS, QUICK_ADAPTER_COUNTS = (1, 8, 32), (1, 8)
BATCH, QUICK_BATCH = (64, 64), (16, 16)  # rows x tokens
VARIANTS = ("base", "ours", "grouped", "merged loop", "peft")
TARGET_OURS_VS_BASE_AT_32 = 1.30
TARGET_OURS_VS_PEFT = 1.00
AGREEMENT = 1e-3  # largest logit difference between the variants (float32 sums in other orders)
# Part 2
LOAD_ADAPTERS = 8
LOAD_LABELS = (["negative", "positive"], common.LABELS, ["a", "b", "c", "d", "e"])
LOAD_SECONDS, QUICK_LOAD_SECONDS = 60.0, 5.0
LOAD_CLIENTS, QUICK_LOAD_CLIENTS = 16, 4
LOAD_TEXTS = 256  # the first rows of the bundled AG News test split
LOAD_MODES = {
    "batching on": ["--max-batch", "64", "--batch-wait-ms", "5"],
    "batching off": ["--max-batch", "1", "--batch-wait-ms", "0"],
}
PROBABILITY_TOLERANCE = 1e-4  # server (mixed batches) against offline (merged, alone)
STARTUP_SECONDS, REQUEST_SECONDS = 300, 120
# Part 3: the load that made p50 21 s before the queue had a bound.
OVERLOAD_CLIENTS = 32
OVERLOAD_TEXTS = 256  # --max-texts' default: the largest request allowed


# ----------------------------------------------------------------------------- part 1
class GroupedMultiLoRALinear(MultiLoRALinear):
    """The grouped alternative to the gather: one pair of matmuls per adapter present."""

    def lora_update(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        update = rows.new_zeros(*rows.shape[:2], self.lora_B.shape[1])
        for slot in slots.unique().tolist():
            if slot:
                members = (slots == slot).nonzero().squeeze(1)
                update[members] = F.linear(
                    F.linear(rows[members], self.lora_A[slot]) * self.scaling[slot], self.lora_B[slot]
                )
        return update


def random_adapters(base: nn.Module, count: int) -> list[nn.Module]:
    """``count`` LoRA models of ``base`` (r=10 on query and value, random B and head)."""
    adapted = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        inject_lora(model, common.TARGET_MODULES, dropout=0.0, **LORA)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.normal_(std=0.02)
            for parameter in model.classifier.parameters():
                parameter.normal_(std=0.02)
        adapted.append(model.eval())
    return adapted


def adapter_weights(model: nn.Module) -> AdapterWeights:
    config = model.lora.config
    return AdapterWeights.from_state(
        lora_state_dict(model), config.r, config.alpha, trainable_modules=config.trainable_modules
    )


def peft_model(base: nn.Module, adapters: list[nn.Module]):
    """peft with every adapter loaded under the name ``a{i}``. The head's Linear layers are its
    ``modules_to_save`` (peft's mixed batch refuses a whole RoBERTa head module)."""
    from peft import LoraConfig, get_peft_model

    heads = [
        f"classifier.{name}".rstrip(".")
        for name, module in base.classifier.named_modules()
        if isinstance(module, nn.Linear)
    ]
    config = LoraConfig(
        target_modules=list(common.TARGET_MODULES),
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=0.0,
        modules_to_save=heads,
    )
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for index in range(1, len(adapters)):
        model.add_adapter(f"a{index}", config)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for index, adapter in enumerate(adapters):
            for key, tensor in lora_state_dict(adapter).items():
                owner, _, leaf = key.rpartition(".")
                if leaf in ("lora_A", "lora_B"):
                    name = f"base_model.model.{owner}.{leaf}.a{index}.weight"
                else:
                    head = next(h for h in heads if key.startswith(h + "."))
                    name = f"base_model.model.{head}.modules_to_save.a{index}.{key[len(head) + 1 :]}"
                parameters[name].copy_(tensor)
    return model.eval()


def mixed_batch_steps(name: str, count: int, shape, device) -> dict:
    """The five step functions of part 1 for ``count`` adapters, after checking they agree."""
    base = common.build_base_model(name).eval()
    adapters = random_adapters(base, count)
    batch = common.make_batch(base, *shape, device, labels=False)
    index = torch.arange(shape[0]) % count
    ours = MultiAdapterModel(copy.deepcopy(base).to(device))
    ours.set_adapters([adapter_weights(adapter) for adapter in adapters])
    grouped = MultiAdapterModel(copy.deepcopy(base).to(device))
    grouped.set_adapters([adapter_weights(adapter) for adapter in adapters])
    for module in grouped.model.modules():
        if isinstance(module, MultiLoRALinear):
            module.__class__ = GroupedMultiLoRALinear  # the same stacks, the other lora_update
    merged = [copy.deepcopy(adapter).to(device) for adapter in adapters[:1]]
    merge_lora(merged[0])
    heads = [adapter.classifier.to(device) for adapter in adapters]
    theirs = peft_model(base, adapters).to(device)
    base = base.to(device)
    groups = [(adapter, (index == adapter).nonzero().squeeze(1).to(device)) for adapter in range(count)]

    def merged_loop() -> torch.Tensor:
        """Each adapter's rows through the merged model, with that adapter's head."""
        logits = None
        for adapter, rows in groups:
            merged[0].classifier = heads[adapter]
            out = merged[0](**{key: value[rows] for key, value in batch.items()}).logits
            logits = out.new_empty(shape[0], out.shape[1]) if logits is None else logits
            logits[rows] = out
        return logits

    calls = {
        "base": lambda: base(**batch).logits,
        "ours": lambda: ours(index, **batch).logits,
        "grouped": lambda: grouped(index, **batch).logits,
        "merged loop": merged_loop,
        "peft": lambda: theirs(**batch, adapter_names=[f"a{i}" for i in index.tolist()]).logits,
    }
    with torch.inference_mode(), common.autocast(device):
        outputs = {variant: call().float() for variant, call in calls.items()}
    first = groups[0][1]  # the merged loop is right for adapter 0's rows only (one merged copy)
    for variant, rows in (("grouped", slice(None)), ("merged loop", first), ("peft", slice(None))):
        difference = (outputs[variant][rows] - outputs["ours"][rows]).abs().max().item()
        if difference > AGREEMENT:
            raise SystemExit(f"{name}, {count} adapters: {variant} differs from ours by {difference:.2g}")

    def step(call):
        def run():
            with torch.inference_mode(), common.autocast(device):
                call()

        return run

    return {variant: step(call) for variant, call in calls.items()}


def mixed_batch_part(models, counts, shape, args) -> str:
    rows = []
    for name in models:
        for count in counts:
            times = common.interleaved_times(
                mixed_batch_steps(name, count, shape, args.device), args.device, args.repeats, args.warmup
            )
            seconds = common.medians(times)
            target = TARGET_OURS_VS_BASE_AT_32 if count == 32 else None
            rows.append(
                [
                    name,
                    count,
                    *(f"{1000 * seconds[v]:.1f}" for v in VARIANTS),
                    paired_ratio_cell(times, "ours", "base", target),
                    paired_ratio_cell(times, "ours", "peft", TARGET_OURS_VS_PEFT),
                    paired_ratio_cell(times, "ours", "merged loop"),
                    paired_ratio_cell(times, "grouped", "ours"),
                ]
            )
    return (
        f"### 1. One mixed batch, {shape[0]} rows x {shape[1]} tokens\n\n"
        "Rows spread evenly over the adapters (row i: adapter i mod K); LoRA r=10, alpha=64 on "
        "query and value, each adapter its own head; one forward under `torch.inference_mode()`; "
        "milliseconds per batch. All variants' logits agree within "
        f"{AGREEMENT:g} (checked first). *merged loop* reuses one merged copy for every adapter "
        "(the compute of K merged models without K copies of memory; its logits are checked on "
        "adapter 0's rows).\n\n"
        + markdown_table(
            [
                "model",
                "adapters",
                *(f"{v} ms" for v in VARIANTS),
                "ours / base",
                "ours / peft",
                "ours / merged loop",
                "grouped / ours",
            ],
            rows,
        )
    )


# ----------------------------------------------------------------------------- part 2
def write_load_adapters(root: Path) -> dict[str, Path]:
    """``LOAD_ADAPTERS`` MiniLM adapters as ``train.py`` writes them, label counts 2, 4 and 5."""
    base = load_classifier_model("minilm", common.LABELS)
    folders = {}
    for index in range(LOAD_ADAPTERS):
        torch.manual_seed(index)
        labels = LOAD_LABELS[index % len(LOAD_LABELS)]
        model = load_classifier_model("minilm", labels) if len(labels) != len(common.LABELS) else copy.deepcopy(base)
        inject_lora(model, common.TARGET_MODULES, r=4 + 2 * (index % 4), alpha=16.0)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.normal_(std=0.05)
            for parameter in model.classifier.parameters():
                parameter.normal_(std=0.1)
        folders[f"adapter{index}"] = save_adapter(
            root / f"adapter{index}", model, base_model="minilm", labels=labels, max_length=128, clean=index % 2 == 0
        )
    return folders


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(adapters_dir: Path, flags: list[str], log: Path):
    """``serve.py`` in a subprocess on a free loopback port; yields its URL once /healthz
    answers; always stopped (SIGTERM, then SIGKILL)."""
    import httpx

    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                str(common.REPO_ROOT / "serve.py"),
                "--adapters-dir",
                str(adapters_dir),
                "--port",
                str(port),
                *flags,
            ],
            cwd=common.REPO_ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lora-serve did not start: {log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def client(url: str, seed: int, deadline: float, texts: list[str], expected: dict, results: list) -> None:
    """Send requests until ``deadline``; record ``(latency s, texts, ok)`` per request."""
    import httpx

    rng = random.Random(seed)
    names = sorted(expected)
    with httpx.Client(timeout=REQUEST_SECONDS) as session:
        while time.monotonic() < deadline:
            name, rows = rng.choice(names), rng.sample(range(len(texts)), rng.randint(1, 4))
            started = time.perf_counter()
            try:
                response = session.post(f"{url}/v1/classify", json={"adapter": name, "texts": [texts[r] for r in rows]})
                answer = response.json()["predictions"] if response.status_code == 200 else None
            except (httpx.HTTPError, json.JSONDecodeError):
                answer = None
            latency = time.perf_counter() - started
            ok = (
                answer is not None
                and len(answer) == len(rows)
                and all(
                    prediction["label"] == expected[name]["labels"][int(expected[name]["rows"][r].argmax())]
                    and max(abs(p - w) for p, w in zip(prediction["probabilities"].values(), expected[name]["rows"][r]))
                    <= PROBABILITY_TOLERANCE
                    for prediction, r in zip(answer, rows)
                )
            )
            results.append((latency, len(rows), ok))


def load_test(url: str, seconds: float, clients: int, texts: list[str], expected: dict) -> dict:
    results: list = []
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(url, seed, deadline, texts, expected, results)) for seed in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(latency for latency, _, _ in results)
    return {
        "requests": len(results),
        "texts": sum(n for _, n, _ in results),
        "failed": sum(not ok for _, _, ok in results),
        "seconds": elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def load_part(args) -> str:
    seconds = QUICK_LOAD_SECONDS if args.quick else args.load_seconds
    clients = QUICK_LOAD_CLIENTS if args.quick else args.clients
    texts = read_table(BUNDLED_DIR / "test.csv")["text"].head(LOAD_TEXTS).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        folders = write_load_adapters(Path(directory) / "adapters")
        expected = {}
        for name, folder in folders.items():  # predict.py's offline answers: each adapter alone, merged
            classifier = load_classifier(folder, device="cpu")
            expected[name] = {"labels": classifier.labels, "rows": classifier.predict_proba(texts)}
            del classifier
        for mode, flags in LOAD_MODES.items():
            with running_server(Path(directory) / "adapters", flags, Path(directory) / f"{mode}.log") as url:
                print(f"  load test, {mode}: {clients} clients, {seconds:g} s", file=sys.stderr, flush=True)
                result = load_test(url, seconds, clients, texts, expected)
            rows.append(
                [
                    mode,
                    result["requests"],
                    result["texts"],
                    f"{result['texts'] / result['seconds']:.1f}",
                    f"{1000 * result['p50']:.0f}",
                    f"{1000 * result['p99']:.0f}",
                    result["failed"],
                ]
            )
    return (
        f"### 2. lora-serve under load: {clients} clients, {seconds:g} s, {LOAD_ADAPTERS} MiniLM adapters\n\n"
        "`serve.py` in a subprocess on loopback; each client thread sends 1-4 random texts of the "
        f"first {LOAD_TEXTS} bundled AG News test rows to a random adapter and waits for the answer. "
        "*failed*: answers lost, refused or differing from `predict.py`'s offline prediction "
        f"(label, or a probability by more than {PROBABILITY_TOLERANCE:g}).\n\n"
        + markdown_table(["mode", "requests", "texts", "texts / s", "p50 ms", "p99 ms", "failed"], rows)
    )


# ----------------------------------------------------------------------------- part 3
def overload_client(url: str, deadline: float, texts: list[str], expected: dict, results: list) -> None:
    """Send all ``texts`` to one adapter in a loop until ``deadline``, as fast as answers come;
    after a 429, wait what ``Retry-After`` says. Records ``(status, latency s, ok)``; ``ok``: a 200
    whose every prediction equals ``predict.py``'s (other statuses: None)."""
    import httpx

    name = sorted(expected)[0]
    with httpx.Client(timeout=REQUEST_SECONDS) as session:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = session.post(f"{url}/v1/classify", json={"adapter": name, "texts": texts})
                status = response.status_code
            except httpx.HTTPError:
                results.append(("lost", time.perf_counter() - started, False))
                continue
            latency = time.perf_counter() - started
            ok = None
            if status == 200:
                answer = response.json()["predictions"]
                ok = len(answer) == len(texts) and all(
                    prediction["label"] == expected[name]["labels"][int(expected[name]["rows"][r].argmax())]
                    and max(abs(p - w) for p, w in zip(prediction["probabilities"].values(), expected[name]["rows"][r]))
                    <= PROBABILITY_TOLERANCE
                    for r, prediction in enumerate(answer)
                )
            results.append((status, latency, ok))
            if status == 429:
                time.sleep(float(response.headers["Retry-After"]))


def overload_part(args) -> str:
    """Far more work than the server can do: every client sends the largest request allowed
    (``OVERLOAD_TEXTS``) in a loop. The server's defaults bound the queue (429 beyond it) and the
    wait (504 past the deadline): the accepted requests' p99 must stay under the deadline, and
    every accepted answer must be right."""
    seconds = QUICK_LOAD_SECONDS if args.quick else args.load_seconds
    clients = QUICK_LOAD_CLIENTS if args.quick else OVERLOAD_CLIENTS
    texts = read_table(BUNDLED_DIR / "test.csv")["text"].head(OVERLOAD_TEXTS).tolist()
    from lora.serve.batching import DEFAULT_MAX_QUEUED_TEXTS, DEFAULT_REQUEST_TIMEOUT_S

    with tempfile.TemporaryDirectory() as directory:
        folders = write_load_adapters(Path(directory) / "adapters")
        classifier = load_classifier(folders["adapter0"], device="cpu")
        expected = {"adapter0": {"labels": classifier.labels, "rows": classifier.predict_proba(texts)}}
        del classifier
        results: list = []
        with running_server(Path(directory) / "adapters", [], Path(directory) / "overload.log") as url:
            print(f"  overload: {clients} clients x {OVERLOAD_TEXTS} texts, {seconds:g} s", file=sys.stderr, flush=True)
            deadline = time.monotonic() + seconds
            threads = [
                threading.Thread(target=overload_client, args=(url, deadline, texts, expected, results))
                for _ in range(clients)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
    accepted = sorted(latency for status, latency, _ in results if status == 200)
    count = {status: sum(1 for s, _, _ in results if s == status) for status in (200, 429, 504, "lost")}
    wrong = sum(1 for status, _, ok in results if status == 200 and not ok)
    other = len(results) - sum(count.values())
    p50 = statistics.median(accepted) if accepted else float("nan")
    p99 = accepted[min(len(accepted) - 1, int(0.99 * len(accepted)))] if accepted else float("nan")
    answered_all = not (wrong or count[504] or count["lost"] or other)
    verdict = "PASS" if accepted and p99 < DEFAULT_REQUEST_TIMEOUT_S and answered_all and count[429] else "MISS"
    row = [
        clients,
        OVERLOAD_TEXTS,
        count[200],
        f"{len(accepted) * OVERLOAD_TEXTS / elapsed:.1f}",
        f"{1000 * p50:.0f}",
        f"{1000 * p99:.0f}",
        count[429],
        count[504],
        count["lost"] + other,
        wrong,
        verdict,
    ]
    return (
        f"### 3. lora-serve overloaded: {clients} clients x {OVERLOAD_TEXTS} texts in a loop, {seconds:g} s\n\n"
        f"The server's defaults: `--max-queued-texts {DEFAULT_MAX_QUEUED_TEXTS}`, `--request-timeout "
        f"{DEFAULT_REQUEST_TIMEOUT_S:g}`. Each client sends the first {OVERLOAD_TEXTS} bundled test texts to one "
        "MiniLM adapter in a loop and, after a 429, waits what `Retry-After` says. Latencies of the accepted "
        "(200) requests; *504*: admitted, not answered in time; *wrong*: an accepted answer that differs from "
        "`predict.py`'s; *lost*: no HTTP answer, or another status. Goal: p99 under the deadline "
        f"({DEFAULT_REQUEST_TIMEOUT_S:g} s), excess requests refused with 429, nothing admitted lost (504 or no "
        "answer) or wrong.\n\n"
        + markdown_table(
            [
                "clients",
                "texts / request",
                "accepted",
                "texts / s",
                "p50 ms",
                "p99 ms",
                "429",
                "504",
                "lost",
                "wrong",
                "goal",
            ],
            [row],
        )
    )


def main(argv=None) -> None:
    parser = common.make_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=LOAD_SECONDS,
        help=f"length of each load test (default {LOAD_SECONDS:g}; {QUICK_LOAD_SECONDS:g} with --quick)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=LOAD_CLIENTS,
        help=f"concurrent clients (default {LOAD_CLIENTS}; {QUICK_LOAD_CLIENTS} with --quick)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["batch", "load", "overload"], help="run only these parts (default: all three)"
    )
    args = common.parse_args(parser, argv)
    started, load_at_start = time.perf_counter(), common.load_average()
    models = ("roberta-tiny" if args.quick else "roberta-base", "minilm")
    counts, shape = (QUICK_ADAPTER_COUNTS, QUICK_BATCH) if args.quick else (ADAPTER_COUNTS, BATCH)
    runners = {
        "batch": lambda: mixed_batch_part(models, counts, shape, args),
        "load": lambda: load_part(args),
        "overload": lambda: overload_part(args),
    }
    chosen = args.parts or list(runners)
    parts = [runners[name]() for name in chosen]
    subset = "" if chosen == list(runners) else " --parts " + " ".join(chosen)  # its own section: the rest stays
    common.report(
        args,
        f"bench/serving.py{subset}",
        f"bench/serving.py{subset}: many adapters on one base, and lora-serve under load",
        "\n\n".join([*parts, common.run_summary(started, load_at_start)]),
    )


if __name__ == "__main__":
    main()
