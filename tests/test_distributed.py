"""Data parallelism on CPU with gloo: two processes train one model, exactly as one process with
the same effective batch would. One spawn of two workers runs every 2-process job of this file
(a process group per job, through its own file), the single-process references run here.
Everything has a time limit: the workers (``run_workers``), each process group, each test."""

import json
import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from transformers import RobertaForSequenceClassification
from transformers.models.roberta.modeling_roberta import RobertaPooler

import lora.train.loop as training
from helpers import WorkerFailed, refused, run_workers, tiny_config, tiny_tokenizer, training_tolerance
from lora import inject_lora, lora_state_dict
from lora.config import InputError
from lora.data import pad_batch, tokenize
from lora.train.distributed import World, shard
from lora.train.loop import TrainConfig, check_every_trainable_gets_a_gradient, train

pytestmark = pytest.mark.timeout(240)  # the module's 2-process fixture runs in the first test

RUN_FILES = {
    "adapter.safetensors",
    "adapter_config.json",
    "checkpoint.pt",
    "metrics.jsonl",
    "summary.json",
    "train_config.json",
    "loss.png",
    "val_accuracy.png",
    "val_precision_recall_f1.png",
    "confusion_matrix.png",
    "per_class_error.png",
    "misclassified.csv",
}


def interrupting(real_step, at: int | None, rank: int):
    """``real_step`` that sends SIGINT to rank 1 at its ``at``-th call: Ctrl-C reaching one rank only,
    both must stop together."""
    calls = 0

    def step(*args):
        nonlocal calls
        calls += 1
        if calls == at and rank == 1:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)

    return step


def settings(model_dir, data_dir, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "lr": 5e-3,
        "grad_accum": 1,
        "epochs": 1,
        "max_steps": 6,
        "eval_steps": 3,
        "log_steps": 1,
        "max_length": 32,
        "val_size": 0.1,
        "warmup_ratio": 0.0,
        "patience": 100,
        "metric": "loss",
        **overrides,
    }


# A job's collectives take milliseconds: a rank that waits this long for the other has lost it.
PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
# All 2-process jobs of this file, spawn and imports included (about 15 s on 2 idle cores).
WORKERS_TIMEOUT = 150


def trainable_state(output_dir) -> dict:
    return torch.load(output_dir / "checkpoint.pt", weights_only=True)["adapter"]


def worker(rank: int, jobs: list[dict], results: str) -> None:
    """Run each job as rank ``rank`` of 2; save its summary (or error) and the trainable
    parameters this rank ended the loop with, for the parent to compare.

    Each job joins its own process group through a file (no TCP port to pick, so none that a
    socket of an earlier job could hold) with a timeout: a rank whose partner is gone fails in
    a minute instead of waiting forever. ``train()`` then uses that group as it would use the
    one torchrun sets up."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    real_step, real_finish = training.accumulate_gradients, training.finish
    for job in jobs:
        prefix = f"{results}/{job['name']}-rank{rank}"

        def finish(*args, prefix=prefix):
            model = args[1].model  # finish(run, job, ...)
            torch.save({k: v.detach().cpu() for k, v in lora_state_dict(model).items()}, f"{prefix}-final.pt")
            return real_finish(*args)

        training.finish, training.accumulate_gradients = finish, interrupting(real_step, job.get("interrupt_at"), rank)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{results}/{job['name']}.store",
            rank=rank,
            world_size=2,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
        try:
            outcome = {k: v for k, v in train(TrainConfig(**job["config"])).items() if k != "config"}
        except KeyboardInterrupt:
            outcome = {"interrupted": True}
        except InputError as error:
            outcome = {"error": str(error)}
        finally:
            training.finish, training.accumulate_gradients = real_finish, real_step
        assert not dist.is_initialized(), "train() must leave no process group behind"
        torch.save(outcome, f"{prefix}.pt")


def final_state(root, name: str, rank: int) -> dict:
    return torch.load(root / "results" / f"{name}-rank{rank}-final.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_process_runs(tiny_model_dir, noisy_data_dir, tmp_path_factory):
    """The 2-process jobs, run once: ``root, {name: (output_dir, [rank 0 result, rank 1 result])}``."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [
        {"name": "batch8", "config": settings(tiny_model_dir, noisy_data_dir, batch_size=8)},
        {"name": "batch4x2", "config": settings(tiny_model_dir, noisy_data_dir, batch_size=4, grad_accum=2)},
        {
            "name": "interrupted",
            "interrupt_at": 4,
            "config": settings(tiny_model_dir, noisy_data_dir, batch_size=4, grad_accum=2),
        },
        {"name": "resumed", "config": {"resume": True}},
        {
            "name": "early",
            "config": settings(
                tiny_model_dir, noisy_data_dir, batch_size=8, lr=1e-12, eval_steps=1, patience=2, metric="accuracy"
            ),
        },
        {
            "name": "unused",
            "config": settings(
                tiny_model_dir, noisy_data_dir, batch_size=8, trainable_modules=("classifier", "pooler")
            ),
        },
    ]
    for job in jobs:
        folder = "interrupted" if job["name"] == "resumed" else job["name"]
        job["config"]["output_dir"] = str(root / folder)
    (root / "results").mkdir()
    run_workers(worker, (jobs, str(root / "results")), nprocs=2, timeout=WORKERS_TIMEOUT, log_dir=root / "logs")
    runs = {
        job["name"]: (
            root / ("interrupted" if job["name"] == "resumed" else job["name"]),
            [torch.load(root / "results" / f"{job['name']}-rank{r}.pt", weights_only=True) for r in (0, 1)],
        )
        for job in jobs
    }
    return root, runs


@pytest.mark.parametrize(
    "name, one_process", [("batch8", dict(batch_size=16)), ("batch4x2", dict(batch_size=8, grad_accum=2))]
)
def test_two_processes_train_the_adapter_one_process_trains_with_the_same_effective_batch(
    name, one_process, two_process_runs, tiny_model_dir, noisy_data_dir, tmp_path
):
    out, (rank0, rank1) = two_process_runs[1][name]
    train(TrainConfig(**settings(tiny_model_dir, noisy_data_dir, output_dir=str(tmp_path), **one_process)))
    # Two different float computations (two halves all-reduced): training_tolerance, not bit-equal.
    mine, theirs = trainable_state(out), trainable_state(tmp_path)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], **training_tolerance(steps=6, lr=5e-3), msg=key)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(expected, rel=training_tolerance(steps=6, lr=5e-3)["rtol"])
    assert rank0["steps"] == rank1["steps"] == 6 and rank0["processes"] == 2
    assert rank0["train_examples_seen"] == json.loads((tmp_path / "summary.json").read_text())["train_examples_seen"]
    assert rank0["test"] == rank1["test"]  # evaluation gathered: both ranks saw every row once


def test_only_rank_0_writes_and_both_ranks_end_with_the_same_parameters(two_process_runs):
    root, runs = two_process_runs
    out, (rank0, rank1) = runs["batch8"]
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["logs", "results", *(n for n in runs if n not in ("resumed", "unused"))]
    )
    for name in ("batch8", "batch4x2", "resumed"):
        mine, theirs = final_state(root, name, 0), final_state(root, name, 1)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    timing = ("train_seconds", "examples_per_second")  # each rank's own clock
    assert {k: v for k, v in rank0.items() if k not in timing} == {k: v for k, v in rank1.items() if k not in timing}
    assert json.loads((out / "summary.json").read_text())["test"] == rank0["test"]


def test_early_stopping_stops_both_ranks_at_the_same_step(two_process_runs):
    _, (rank0, rank1) = two_process_runs[1]["early"]
    assert rank0["stopped_early"] and rank1["stopped_early"]
    assert rank0["steps"] == rank1["steps"] == 3 and rank0["best_step"] == 1


def test_an_interrupted_two_process_run_resumes_to_the_same_result(two_process_runs):
    straight, _ = two_process_runs[1]["batch4x2"]
    interrupted, _ = two_process_runs[1]["interrupted"]
    resumed, (rank0, rank1) = two_process_runs[1]["resumed"]
    assert interrupted == resumed and two_process_runs[1]["interrupted"][1][0] == {"interrupted": True}
    assert rank0["steps"] == rank1["steps"] == 6
    for key, tensor in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[key], tensor), key

    def strip(path):
        return [
            {k: v for k, v in json.loads(line).items() if k != "examples_per_s"}
            for line in (path / "metrics.jsonl").read_text().splitlines()
        ]

    assert strip(resumed) == strip(straight)


def test_a_trainable_module_that_gets_no_gradient_is_a_one_line_error(two_process_runs):
    _, (rank0, rank1) = two_process_runs[1]["unused"]
    assert rank0 == rank1 and "no parameter lies in the trainable module(s) ['pooler']" in rank0["error"]
    model = RobertaForSequenceClassification(tiny_config())
    model.roberta.pooler = RobertaPooler(model.config)  # present, but classification never reads it
    inject_lora(model, r=2, alpha=4, trainable_modules=("classifier", "pooler"))
    tokenizer = tiny_tokenizer()
    batch = pad_batch(tokenize(["stocks rally", "team wins the cup"], tokenizer, 16), tokenizer.pad_token_id)
    with refused("roberta.pooler.dense.weight, roberta.pooler.dense.bias would train"):
        check_every_trainable_gets_a_gradient(model, batch)


def test_each_rank_takes_its_contiguous_share_and_nothing_twice():
    shares = [shard(list(range(5)), World(rank=r, size=2)) for r in (0, 1)]
    assert shares == [[0, 1, 2], [3, 4]]
    assert [shard([7], World(rank=r, size=2)) for r in (0, 1)] == [[7], []]
    three = [shard(list(range(10)), World(rank=r, size=3)) for r in (0, 1, 2)]
    assert sum(three, []) == list(range(10)) and [len(s) for s in three] == [4, 3, 3]


def sleeps_forever(rank: int) -> None:
    if rank == 1:
        time.sleep(3600)


def raises_on_rank_1(rank: int) -> None:
    if rank == 1:
        raise RuntimeError("planted failure")


@pytest.mark.parametrize(
    "function, expected",
    [
        (sleeps_forever, r"(?s)still running after 20 s.*rank 1.*in sleeps_forever"),
        (raises_on_rank_1, r"(?s)rank 1 failed.*RuntimeError: planted failure"),
    ],
)
def test_a_hung_or_failing_worker_fails_the_test_in_seconds_with_its_traceback(function, expected, tmp_path):
    started = time.monotonic()  # 20 s: a spawned worker imports torch and transformers first
    with pytest.raises(WorkerFailed, match=expected):
        run_workers(function, (), nprocs=2, timeout=20, log_dir=tmp_path)
    assert time.monotonic() - started < 30
