"""What the test files share: tiny random RoBERTa models, a word-level tokenizer and a learnable
toy AG-News-like dataset; the suite's float tolerances; comparing runs; running several processes
with a deadline. Nothing is downloaded; nothing under ../shared is read. The fixtures built from
these live in ``conftest.py``."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    DebertaV2Config,
    DebertaV2Model,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

from lora.train import TrainConfig

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


@contextlib.contextmanager
def refused(message: str = ""):
    """The block raises the library's ``InputError`` (or the command line's ``UsageError``), and
    what the command line prints of it (``lora.cli.one_line``: settings named by their flags)
    matches the regular expression ``message``."""
    from lora.cli import UsageError, one_line
    from lora.config import InputError

    with pytest.raises((InputError, UsageError)) as caught:
        yield caught
    assert re.search(message, one_line(caught.value)), one_line(caught.value)


CLASS_WORDS = [
    "war election minister president troops peace government nations".split(),
    "match goal team season coach league cup player".split(),
    "stocks profit shares market company earnings bank investors".split(),
    "software internet computer space research chip scientists online".split(),
]
COMMON_WORDS = "the a of to in on and said new after for with by today report week".split()
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def tiny_config(**overrides) -> RobertaConfig:
    """A 2-layer, 32-wide RoBERTa for 4 labels whose vocabulary fits ``tiny_tokenizer``."""
    settings = dict(
        vocab_size=len(SPECIAL_TOKENS) + len(COMMON_WORDS) + 32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        num_labels=4,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    settings.update(overrides)
    return RobertaConfig(**settings)


def roberta_base_config(**overrides) -> RobertaConfig:
    """roberta-base's real shape (random weights): 514 positions and one token type, as in its
    published config; ``RobertaConfig()``'s defaults (512 / 2) would be a slightly different model."""
    return RobertaConfig(**{"max_position_embeddings": 514, "type_vocab_size": 1, "num_labels": 4, **overrides})


def tiny_model(seed: int = 0, **overrides) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_config(**overrides)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-cased, ``<s> words </s>``, RoBERTa's special-token ids."""
    words = COMMON_WORDS + [w for words in CLASS_WORDS for w in words]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=64,
    )


def toy_news(rows: int, seed: int = 0, noise: float = 0.0) -> pd.DataFrame:
    """A learnable 4-class ``text,label`` table: each text mixes words of its class with
    common words; lengths vary from 3 to 20 words. Balanced, shuffled, seeded. With ``noise``,
    that share of the rows gets a random label instead (accuracy can then not saturate)."""
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        label = i % 4
        length = rng.randint(3, 20)
        words = [
            rng.choice(CLASS_WORDS[label]) if rng.random() < 0.4 else rng.choice(COMMON_WORDS) for _ in range(length)
        ]
        words[rng.randrange(length)] = rng.choice(CLASS_WORDS[label])
        if rng.random() < noise:
            label = rng.randrange(4)
        records.append({"text": " ".join(words).capitalize(), "label": label})
    rng.shuffle(records)
    return pd.DataFrame(records)


def pretrained_tiny_model(seed: int = 0) -> RobertaForSequenceClassification:
    """A tiny RoBERTa whose encoder learnt the toy task (a few seconds of full training, without
    dropout: with it a 32-wide encoder learns little) and whose classification head is fresh again:
    like a pretrained checkpoint, its features are informative, so LoRA on top of it learns in a
    few dozen steps (a random encoder would not)."""
    model = tiny_model(seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    tokenizer = tiny_tokenizer()
    data = toy_news(360, seed=7)
    ids = tokenizer(list(data["text"]), padding=True, return_tensors="pt")
    labels = torch.tensor(data["label"].to_numpy())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(6):
        for start in range(0, len(labels), 32):
            rows = slice(start, start + 32)
            loss = model(
                input_ids=ids["input_ids"][rows], attention_mask=ids["attention_mask"][rows], labels=labels[rows]
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.classifier = tiny_model(seed + 1, hidden_dropout_prob=0.0).classifier
    return model.eval()


def random_adapter(
    model_dir,
    directory,
    labels=LABELS,
    targets=("query", "value"),
    r=4,
    alpha=8.0,
    seed=0,
    max_length=16,
    clean=False,
    **inject,
):
    """A hand-made adapter for the model in ``model_dir``, for what train.py cannot write:
    label sets other than AG News' four (train.py's data always has those), and B matrices,
    DoRA magnitudes, heads and other fully trained modules random enough that every layer
    matters. Its config is the producer's (``producer_config``). Consumers are tested on
    train.py's own folders (``trained_runs``) first; use this only for what those cannot show.
    ``inject``: more ``inject_lora`` arguments (``dora``,
    ``init="pissa"``, ``rslora``, ``trainable_modules``). Returns the folder."""
    from lora import inject_lora, lora_layers, save_adapter
    from lora.classifier import load_classifier_model

    torch.manual_seed(seed)
    model = load_classifier_model(str(model_dir), list(labels))
    inject_lora(model, targets, r=r, alpha=alpha, **inject)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.5)
            if hasattr(layer, "lora_magnitude"):
                layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))
        for parameter in model.classifier.parameters():
            parameter.normal_(std=0.5)
        for name, parameter in model.named_parameters():  # other modules trained in full, if any
            if parameter.requires_grad and "lora_" not in name and not name.startswith("classifier."):
                parameter.add_(0.2 * torch.randn_like(parameter))
    return save_adapter(directory, model, **producer_config(model_dir, labels, max_length=max_length, clean=clean))


def producer_config(model_dir, labels=LABELS, **settings) -> dict:
    """What train.py records beside the LoRA settings for a run of these ``settings`` (its own
    function, ``lora.train.loop.adapter_fields``): a hand-made adapter's config is the producer's,
    only its tensors are made by hand."""
    from lora.train.loop import adapter_fields

    return adapter_fields(TrainConfig(model=str(model_dir), **settings), list(labels))


# ----------------------------------------------------------------------------- the encoder families
def family_checkpoint(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random checkpoint of one encoder family as the hub holds it: the masked-LM or base
    model, without a classification head (roberta-base, DistilBERT and ModernBERT-base are
    masked-LM checkpoints, MiniLM a BERT base model with its pooler, DeBERTa-v3 a base model).
    32 wide, 2 layers, 4 heads, FFN 64, ``tiny_tokenizer``'s vocabulary and special tokens."""
    common = dict(
        vocab_size=tiny_config().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=1,
    )
    builders = {
        "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**common, bos_token_id=0, eos_token_id=2)),
        "bert": lambda: BertModel(BertConfig(**common)),
        "distilbert": lambda: DistilBertForMaskedLM(
            DistilBertConfig(
                vocab_size=common["vocab_size"],
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                max_position_embeddings=80,
                pad_token_id=1,
            )
        ),
        # DeBERTa-v3-base's attention: relative positions in log buckets, shared keys, no absolute positions.
        "deberta-v2": lambda: DebertaV2Model(
            DebertaV2Config(
                **common,
                type_vocab_size=0,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                share_att_key=True,
                position_buckets=16,
                max_relative_positions=-1,
                norm_rel_ebd="layer_norm",
                position_biased_input=False,
                hidden_act="gelu",
            )
        ),
        # A local window of 16 tokens (8 each side) in layer 1, global attention in layer 0.
        "modernbert": lambda: ModernBertForMaskedLM(
            ModernBertConfig(
                **common, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2, local_attention=16
            )
        ),
    }
    torch.manual_seed(seed)
    return builders[family]().eval()


FAMILY_NAMES = ("roberta", "bert", "distilbert", "deberta-v2", "modernbert")


# What the producer really writes. Every consumer of adapter folders (predict.py alone and with
# several adapters, lora-serve, lora-export, inspect_lora.py, a resumed run) is tested on run
# folders that train() wrote, not on imitations: an imitation repeats the test author's idea of
# the files, not the files. Name: the settings of that run (beyond config_for's).
TRAINED_RUNS = {
    "lora": dict(seed=1),
    # DoRA with cleaned text, a shorter max length and LayerNorms trained in full: every
    # setting a consumer must read back from the config differs from the LoRA run's.
    "dora": dict(seed=2, dora=True, clean=True, max_length=12, trainable_modules=("classifier", "output.LayerNorm")),
    "nf4": dict(seed=3, quantize_base="nf4"),
    "pissa": dict(seed=4, init="pissa", rslora=True),  # saved as the plain LoRA of rank 2r
}


# ----------------------------------------------------------------------------- comparing runs
def config_for(model_dir, data_dir, output_dir, **overrides) -> TrainConfig:
    """A short training run on the tiny model (10 steps, evaluations at 3, 6, 9 and 10)."""
    settings = dict(
        model=str(model_dir),
        data=str(data_dir),
        output_dir=str(output_dir),
        r=4,
        alpha=8.0,
        dropout=0.1,
        lr=2e-3,
        batch_size=16,
        grad_accum=2,
        epochs=3,
        max_steps=10,
        eval_steps=3,
        log_steps=1,
        max_length=32,
        val_size=0.1,
        warmup_ratio=0.0,
        patience=100,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def records(run) -> list[dict]:
    """metrics.jsonl without the wall-clock field (the only thing allowed to differ)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "examples_per_s"} for row in rows]


def assert_same_run(resumed, straight):
    """Two runs are the same run: records, final checkpoint, best adapter and summary, bit for bit
    (the very same computations ran: the only rule under which ``torch.equal`` is used)."""
    assert records(resumed) == records(straight)
    mine = torch.load(resumed / "checkpoint.pt", weights_only=True)
    theirs = torch.load(straight / "checkpoint.pt", weights_only=True)
    for key in ("adapter", "optimizer", "scheduler", "scaler"):
        assert json.dumps(mine[key], default=repr) == json.dumps(theirs[key], default=repr), key
    for name, tensor in theirs["adapter"].items():
        assert torch.equal(mine["adapter"][name], tensor), name
    for index, moments in theirs["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mine["optimizer"]["state"][index][key], moments[key]), (index, key)
    for a, b in zip(
        load_file(str(resumed / "adapter.safetensors")).values(),
        load_file(str(straight / "adapter.safetensors")).values(),
    ):
        assert torch.equal(a, b)
    summary, expected = (json.loads((run / "summary.json").read_text()) for run in (resumed, straight))
    timing = ("config", "train_seconds", "examples_per_second")
    assert {k: v for k, v in summary.items() if k not in timing} == {
        k: v for k, v in expected.items() if k not in timing
    }


def peft_key(name: str) -> str:
    """Our parameter name -> peft's: ``X.lora_A`` -> ``base_model.model.X.lora_A.default.weight``,
    ``X.lora_magnitude`` -> ``...X.lora_magnitude_vector.default.weight`` (DoRA),
    ``classifier.P`` -> ``base_model.model.classifier.modules_to_save.default.P``."""
    if name.startswith("classifier."):
        return "base_model.model.classifier.modules_to_save.default." + name.split(".", 1)[1]
    if name.endswith(".lora_magnitude"):
        return f"base_model.model.{name.removesuffix('.lora_magnitude')}.lora_magnitude_vector.default.weight"
    return f"base_model.model.{name}.default.weight"


def assert_gradients_match_peft(ours, theirs) -> None:
    """After a backward pass in both: every trainable gradient of ours equals peft's within
    ``GRADIENT_TOLERANCE``; frozen parameters have none."""
    peft_params = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, peft_params[peft_key(name)].grad, **GRADIENT_TOLERANCE, msg=name)
        else:
            assert parameter.grad is None, name


# ----------------------------------------------------------------------------- comparing floats
# The rule (tests/README.md says it at length): bit for bit (torch.equal) only where the very same
# kernels run on the very same inputs, in the same order: a resumed run against the uninterrupted
# one, unmerge restoring the kept weight, a zero-initialised LoRA layer against its base, a model
# against itself. Everything else compares two *different* float computations of one value (a bias
# fused or added after, one process or two, accumulation splits, peft's code or ours): their results
# differ in the last bits from one CPU (AVX-512, AVX2, thread count) to the next, so they are
# compared with a tolerance derived here, once.


def float_tolerance(dtype: torch.dtype = torch.float32, terms: int = 1) -> dict:
    """``rtol`` / ``atol`` for two computations of one value that sum ``terms`` products in a
    different order. Each reordered sum of n terms may differ by up to about n * eps relative to
    the sum of the terms' magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms",
    section 4.2); typical errors are sqrt(n) * eps. We allow 4 * sqrt(n) * eps, relative to the
    value and, for values that cancel to near zero, the same as an absolute bound on values of
    order one (the tensors compared here are activations, logits and weights of order one)."""
    eps = torch.finfo(dtype).eps
    bound = 4 * max(terms, 1) ** 0.5 * eps
    return {"rtol": bound, "atol": bound}


def assert_same_value(actual, expected, dtype: torch.dtype = torch.float32, terms: int = 1, msg=None) -> None:
    """``actual`` and ``expected`` are two float computations of one value (``float_tolerance``)."""
    torch.testing.assert_close(actual, expected, **float_tolerance(dtype, terms), msg=msg)


# The tiny models' longest chain of reductions from input to logits: 2 layers x (hidden 32 +
# intermediate 64) + the head's 32. Logits, merged weights and gradients of two computations of
# one tiny model (peft's and ours, merged and unmerged, with and without a quantized base's
# separate bias) are compared with this.
TINY_MODEL_TERMS = 2 * (32 + 64) + 32
MODEL_TOLERANCE = float_tolerance(torch.float32, TINY_MODEL_TERMS)
# Gradients: backward runs the model's reductions again (and sums over the batch): twice the terms.
GRADIENT_TOLERANCE = float_tolerance(torch.float32, 2 * TINY_MODEL_TERMS)


# Two training runs whose gradients differ only by reordered float32 sums (1 process vs 2, one
# batch vs accumulated micro-batches) drift apart step by step: AdamW divides each gradient by
# the root of its running square, so a rounding difference in a near-zero gradient element moves
# that element's update by a fraction of lr, not of the gradient. Measured: after 6 steps at
# lr 5e-3, at most 6.7e-6 apart (AMD EPYC, 2 threads) and 8.9e-4 relative. The bound: each step
# may move an element by up to lr * 1e-3 differently, atol = steps * lr * 1e-3; relative 2e-3.
# The sabotages this guards (a rank training on the whole batch, a lost micro-batch) change the
# weights by whole updates, i.e. by ~lr: 1000 times more than this.
def training_tolerance(steps: int, lr: float) -> dict:
    return {"rtol": 2e-3, "atol": steps * lr * 1e-3}


# ----------------------------------------------------------------------------- several processes
class WorkerFailed(AssertionError):
    """A worker process raised, exited without a result, or did not finish in time."""


def run_workers(function, args: tuple, nprocs: int, timeout: float, log_dir) -> None:
    """Run ``function(rank, *args)`` in ``nprocs`` spawned processes and wait at most ``timeout``
    seconds for all of them. Every worker dumps its Python stack into ``log_dir`` shortly before
    the deadline (``faulthandler``); a worker that raises, dies or hangs makes this raise
    ``WorkerFailed`` naming the rank, with its traceback or where it hung, and no worker is
    left behind."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + timeout
    context = mp.start_processes(
        _watched_worker, args=(function, args, deadline, str(log_dir)), nprocs=nprocs, start_method="spawn", join=False
    )
    stacks = ""
    try:
        while True:
            if not stacks and any(p.exitcode not in (None, 0) for p in context.processes):
                failed = next(r for r, p in enumerate(context.processes) if p.exitcode not in (None, 0))
                stacks = _stacks_of_the_others(context.processes, failed, log_dir)  # before join ends them
            if context.join(timeout=0.5):
                break
            if time.time() > deadline:
                time.sleep(1.5)  # the workers' stack dumps come due now
                stacks = "\n".join(
                    f"--- rank {rank}:\n" + _read(log_dir / f"stack-rank{rank}.txt")[-3000:] for rank in range(nprocs)
                )
                raise WorkerFailed(f"workers still running after {timeout:.0f} s; where each one was:\n{stacks}")
    except ProcessException as error:  # a worker raised (its traceback is in the message) or died
        raise WorkerFailed(f"rank {error.error_index} failed:\n{error}\nwhere the others were:\n{stacks}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    missing = [rank for rank in range(nprocs) if not (log_dir / f"done-rank{rank}").exists()]
    if missing:  # torch's spawn wrapper exits 0 on KeyboardInterrupt: a worker that ended early
        raise WorkerFailed(f"rank(s) {missing} exited without finishing (KeyboardInterrupt?)")


def _stacks_of_the_others(processes, failed: int, log_dir: Path) -> str:
    """Ask every other live worker for its Python stack (SIGUSR1, ``faulthandler``): where a
    rank waits when its partner has failed."""
    for rank, process in enumerate(processes):
        if rank != failed and process.is_alive():
            os.kill(process.pid, signal.SIGUSR1)
    time.sleep(1)
    return "\n".join(
        f"--- rank {rank}:\n" + _read(log_dir / f"stack-rank{rank}.txt")[-3000:]
        for rank in range(len(processes))
        if rank != failed
    )


def _read(path: Path) -> str:
    return path.read_text() if path.exists() and path.stat().st_size else "(no stack: still starting)"


def _watched_worker(rank: int, function, args: tuple, deadline: float, log_dir: str) -> None:
    import faulthandler

    stack_file = open(Path(log_dir) / f"stack-rank{rank}.txt", "w")
    faulthandler.dump_traceback_later(max(deadline - 1 - time.time(), 0.5), file=stack_file)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        function(rank, *args)
    finally:
        faulthandler.cancel_dump_traceback_later()
    (Path(log_dir) / f"done-rank{rank}").touch()


def run_process_group(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: on timeout the whole process group (a launcher
    and its workers) is killed, and the test fails saying so with the output so far."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(process.pid), process.pid]:  # torchrun's workers: sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise WorkerFailed(
            f"{' '.join(command[:6])} ... still running after {timeout:.0f} s:\n{output[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), read from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def processes_mentioning(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (to find stray workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
