"""search.py: the budget, the search space, pruning, shared storage, interruption, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from transformers import AutoModelForSequenceClassification

import lora.search.study as search_study
from lora.cli.search import command_line, main, run
from lora.cli.train import explicit_fields
from lora.config import HEADS
from lora.model import count_parameters, inject_lora
from lora.search.space import LAYERS, TARGETS, OverBudget, ParameterCounter, build_space, layer_indices, suggest
from lora.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def train_flags(model_dir, data_dir, *more):
    return [
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--max-steps",
        "4",
        "--eval-steps",
        "2",
        "--max-length",
        "32",
        *more,
    ]


def load_study(search_dir):
    return optuna.load_study(study_name="lora", storage=f"sqlite:///{search_dir / 'study.db'}")


# --- the budget: exact counts before training, never a trained trial over it -------------------


def test_counts_from_shapes_equal_count_parameters_of_the_built_model(tiny_model_dir):
    counter = ParameterCounter(str(tiny_model_dir), LABELS)
    for targets in TARGETS.values():
        for layers in LAYERS:
            for trainable, head in [(("classifier",), "full"), (("classifier", "LayerNorm"), "full")] + [
                (None, head) for head in HEADS
            ]:
                model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
                chosen = layer_indices(layers, 2)
                inject_lora(model, targets, r=3, alpha=8.0, trainable_modules=trainable, layers=chosen, head=head)
                fixed, per_rank = counter.cost(targets, chosen, trainable, head)
                assert fixed + 3 * per_rank == count_parameters(model)[0]
    # by hand: the head (32*32 + 32 + 32*4 + 4) and query, value of both layers at r = 3
    assert counter.cost(("query", "value"), None, ("classifier",)) == (1188, 2 * 2 * 64)
    # the head's hidden layer as LoRA of the same rank (32 + 32 a rank), or frozen: its output layer alone
    assert counter.cost(("query", "value"), None, None, "lora") == (32 * 4 + 4, 2 * 2 * 64 + 64)
    assert counter.cost(("query", "value"), None, None, "linear") == (32 * 4 + 4, 2 * 2 * 64)


def test_the_rank_is_bounded_by_what_the_budget_leaves_and_misfits_are_over_budget(tiny_model_dir):
    base = TrainConfig(model=str(tiny_model_dir), r=20)
    counter = ParameterCounter(str(tiny_model_dir), LABELS)
    space = build_space(base, {"r", "head"}, counter, max_params=7000)
    # r = 20 costs 1188 + 20 * (q v in both layers: 256) = 6308; with key added 8868 > 7000
    assert space.targets == ("qv", "qkv", "qkvo", "ffn") and space.layers == LAYERS
    fixed = {"alpha_over_r": 2.0, "dropout": 0.0, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 16, "grad_accum": 1}
    config, count = suggest(optuna.trial.FixedTrial({"target_modules": "qv", "layers": "all", **fixed}), space)
    assert (config.target_modules, config.layers, config.r, config.alpha, count) == (
        ("query", "value"),
        None,
        20,
        40.0,
        6308,
    )
    with pytest.raises(OverBudget) as over:
        suggest(optuna.trial.FixedTrial({"target_modules": "qkv", "layers": "all", **fixed}), space)
    assert over.value.count == 8868
    # searched, r goes up to what the budget leaves: for q, v in all layers (7000 - 1188) // 256 = 22
    free = build_space(base, set(), counter, max_params=7000)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    over_budget = 0
    for _ in range(30):
        trial = study.ask()
        try:
            config, count = suggest(trial, free)
        except OverBudget as over:
            assert over.count > 7000
            over_budget += 1
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        fixed_cost, per_rank = counter.cost(config.target_modules, config.layers, config.trainable_modules, config.head)
        assert count == fixed_cost + config.r * per_rank <= 7000
        assert trial.distributions["r"].high == min(64, (7000 - fixed_cost) // per_rank)
        study.tell(trial, 0.0)
    assert over_budget < 5  # targets and layers first, the rank bounded: misfits are rare


def test_the_head_is_searched_under_the_budget(tiny_model_dir):
    """A budget below the full head (1,188) leaves the cheaper heads, and the rank they allow."""
    counter = ParameterCounter(str(tiny_model_dir), LABELS)
    space = build_space(TrainConfig(model=str(tiny_model_dir)), set(), counter, max_params=1000)
    assert space.heads == ("lora", "linear")
    fixed = {"alpha_over_r": 2.0, "dropout": 0.0, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 16, "grad_accum": 1}
    for head, per_rank in (("lora", 2 * 2 * 64 + 64), ("linear", 2 * 2 * 64)):
        trial = optuna.trial.FixedTrial({"target_modules": "qv", "layers": "all", "head": head, "r": 2, **fixed})
        config, count = suggest(trial, space)
        assert (config.head, count) == (head, 132 + 2 * per_rank)
        assert f" --head {head} " in command_line(config)
    with pytest.raises(ValueError):  # not drawn: the full head alone is over the budget
        suggest(optuna.trial.FixedTrial({"target_modules": "qv", "layers": "all", "head": "full", **fixed}), space)


def test_flags_on_the_command_line_fix_their_settings():
    assert explicit_fields(["--model", "x", "--lr=1e-3", "--batch", "8", "--bf16", "--r", "4"]) == {
        "model",
        "lr",
        "batch_size",
        "precision",
        "r",
    }
    assert command_line(
        TrainConfig(
            r=4,
            alpha=16.0,
            target_modules=("query", "key"),
            clean=True,
            precision="bf16",
            output_dir="x",
            evaluate_test=False,
        )
    ) == ("python train.py --r 4 --alpha 16.0 --target-modules query key --bf16 --clean")


# --- end to end: budget, results, pruning, interruption, several workers ------------------------


def test_search_under_a_budget_survives_ctrl_c_and_writes_its_results(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, capsys
):
    search_dir = tmp_path / "search"
    argv = [
        "--trials",
        "2",
        "--max-params",
        "6000",
        "--pruner",
        "none",
        "--search-dir",
        str(search_dir),
        "--",
        *train_flags(tiny_model_dir, toy_data_dir),
    ]
    real_train = search_study.train

    def interrupted_in_the_second_trial(config, on_evaluation):
        if config.output_dir.endswith("trial-1"):
            raise KeyboardInterrupt
        return real_train(config, on_evaluation)

    monkeypatch.setattr(search_study, "train", interrupted_in_the_second_trial)
    with pytest.raises(SystemExit) as stopped:
        run_argv(monkeypatch, argv)
    assert stopped.value.code == 130
    assert [t.state.name for t in load_study(search_dir).trials] == ["COMPLETE", "FAIL"]
    assert pd.read_csv(search_dir / "trials.csv").state.tolist() == ["complete", "failed"]

    monkeypatch.setattr(search_study, "train", real_train)
    main(argv)  # the same command goes on to two trained trials
    assert [t.state.name for t in load_study(search_dir).trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    table = pd.read_csv(search_dir / "trials.csv")
    trained = table[table.state == "complete"]
    assert trained.trial.tolist() == [0, 2]
    for row in trained.itertuples():
        summary = json.loads((search_dir / f"trial-{row.trial}" / "summary.json").read_text())
        assert row.trainable_parameters == summary["trainable_parameters"] <= 6000
        assert row.value == summary["val"]["accuracy"] and summary["test"] is None
        assert row.command == command_line(
            TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
        )
    best = json.loads((search_dir / "best.json").read_text())
    assert best["value"] == trained.value.max() and best["trial"] == trained.loc[trained.value.idxmax(), "trial"]
    assert "--max-steps 4" in best["command"] and f"--r {best['params']['r']}" in best["command"]
    for plot in ("history.png", "importances.png", "accuracy_vs_parameters.png"):
        assert (search_dir / plot).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "2 complete, 0 pruned, 0 over the budget (not trained), 1 failed" in out
    assert f"retrain it (and test it once): {best['command']}" in out


def test_pruning_stops_a_trial_that_is_made_to_be_bad(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    study = optuna.create_study(study_name="lora", storage=f"sqlite:///{search_dir / 'study.db'}", direction="maximize")
    study.enqueue_trial({"lr": 5e-3})
    study.enqueue_trial({"lr": 5e-5})  # at lr 5e-5 the fresh head stays where it started
    main(
        [
            "--trials",
            "2",
            "--search-dir",
            str(search_dir),
            "--pruner",
            "halving",
            "--",
            *train_flags(
                tiny_model_dir,
                toy_data_dir,
                "--target-modules",
                "query",
                "value",
                "--layers",
                "0",
                "1",
                "--r",
                "4",
                "--batch-size",
                "16",
                "--grad-accum",
                "1",
            ),
        ]
    )
    good, bad = load_study(search_dir).trials
    assert good.state.name == "COMPLETE" and list(good.intermediate_values) == [2, 4]
    assert bad.state.name == "PRUNED" and list(bad.intermediate_values) == [2] and bad.user_attrs["steps"] == 2
    assert bad.intermediate_values[2] < good.intermediate_values[2]
    assert "pruning: 1 trials stopped after 2 of 4 steps on average: 2 of 8 steps not run (25%)" in (
        capsys.readouterr().out
    )


# Two workers forked from one process that has imported everything but not yet run torch: they
# reach the study within moments of each other, so both take trials (and the test pays one import).
TWO_WORKERS = """
import os, sys, traceback
from lora.cli.search import main
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        try:
            main(sys.argv[1:])
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    workers.append(pid)
print("workers", *workers)
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in workers))
"""


def test_two_processes_share_one_sqlite_study(tiny_model_dir, toy_data_dir, tmp_path):
    search_dir = tmp_path / "search"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TWO_WORKERS,
            "--trials",
            "4",
            "--search-dir",
            str(search_dir),
            "--pruner",
            "none",
            "--",
            *train_flags(tiny_model_dir, toy_data_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pids = next(line for line in done.stdout.splitlines() if line.startswith("workers")).split()[1:]
    trials = load_study(search_dir).trials
    assert len(trials) >= 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["worker"].split(":")[1] for t in trials} == set(pids)
    for trial in trials:  # each trial trained once, in its own folder, with its own settings
        summary = json.loads((search_dir / f"trial-{trial.number}" / "summary.json").read_text())
        assert summary["config"]["lr"] == trial.params["lr"] and summary["steps"] == 4


# --- bad input: one line, exit 2 --------------------------------------------------------------


def run_argv(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["search.py", *argv])
    run()


@pytest.mark.parametrize(
    "search_flags, more_train_flags, message",
    [
        (["--trials", "0"], [], "error: --trials must be at least 1, got 0"),
        (["--max-params", "200"], [], "error: no configuration fits --max-params 200: the smallest has 260"),
        (["--storage", "not-a-database-url"], [], "error: --storage not-a-database-url: not a database Optuna can use"),
        (
            [],
            [
                "--target-modules",
                "query",
                "--layers",
                "0",
                "--r",
                "4",
                "--alpha",
                "8",
                "--dropout",
                "0",
                "--lr",
                "1e-3",
                "--weight-decay",
                "0",
                "--batch-size",
                "8",
                "--grad-accum",
                "1",
                "--head",
                "full",
            ],
            "error: every searched setting is fixed: nothing to search (leave one of --target-modules,",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, capsys, search_flags, more_train_flags, message
):
    with pytest.raises(SystemExit) as stopped:
        run_argv(
            monkeypatch,
            [
                "--search-dir",
                str(tmp_path / "s"),
                *search_flags,
                "--",
                *train_flags(tiny_model_dir, toy_data_dir),
                *more_train_flags,
            ],
        )
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_a_storage_that_is_not_a_database_or_holds_another_search_is_refused(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, capsys
):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n" * 100)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="lora", storage=other, direction="maximize").set_user_attr(
        "search", {"model": "someone else's", "max_params": None}
    )
    for storage, message in (
        (f"sqlite:///{text_file}", "not a database Optuna can use"),
        (other, "holds a study 'lora' of a different search (it differs in alpha, batch_size, clean, compile, data"),
    ):
        with pytest.raises(SystemExit) as stopped:
            run_argv(
                monkeypatch,
                ["--storage", storage, "--search-dir", str(tmp_path / "s"), *train_flags(tiny_model_dir, toy_data_dir)],
            )
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_postgresql_study(tiny_model_dir, toy_data_dir, tmp_path):
    """The storage several machines share; skipped without pgserver (requirements-dev.txt)."""
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg2")
    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop")
    try:
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
        search_dir = tmp_path / "search"
        main(
            [
                "--trials",
                "1",
                "--storage",
                url,
                "--search-dir",
                str(search_dir),
                "--",
                *train_flags(tiny_model_dir, toy_data_dir),
            ]
        )
        (trial,) = optuna.load_study(study_name="lora", storage=url).trials
    finally:
        server.cleanup()
    assert (
        trial.state.name == "COMPLETE"
        and trial.user_attrs["trainable_parameters"]
        == json.loads((search_dir / "trial-0" / "summary.json").read_text())["trainable_parameters"]
    )
    assert not (search_dir / "study.db").exists()
