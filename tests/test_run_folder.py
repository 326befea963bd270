"""The pieces the training job is built from, tested directly: the settings' checks, the progress
counters, the checkpoint round trip, and what --resume accepts."""

import json

import pytest
import torch

from helpers import config_for, refused, tiny_model
from lora import inject_lora, quantize_base
from lora.cli import one_line
from lora.cli.train import explicit_fields
from lora.cli.train import main as train_main
from lora.quantize import quantized_linear
from lora.train import TrainConfig
from lora.train.distributed import World
from lora.train.loop import make_optimisation, train
from lora.train.run_folder import Progress, load_checkpoint, restore_training_state, resumed_config, save_training_state
from lora.variants import DORA_NEEDS_FLOAT_BASE, DoRALinear


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(grad_accum=0), "--grad-accum must be at least 1, got 0"),
        (dict(max_steps=0), "--max-steps must be at least 1, got 0"),
        (dict(lr=0.0), "--lr must be > 0, got 0.0"),
        (dict(warmup_ratio=1.0), "--warmup-ratio must be in [0, 1), got 1.0"),
        (dict(weight_decay=-1.0), "--weight-decay must be >= 0, got -1.0"),
        (dict(init="svd"), "--init must be one of ['lora', 'pissa'], got 'svd'"),
        (dict(lora_plus_ratio=0.0), "--lora-plus-ratio must be > 0, got 0.0"),
        (dict(quantize_base="int4"), "--quantize-base must be one of ['int8', 'nf4'], got 'int4'"),
        (dict(quantize_base="nf4", dora=True), DORA_NEEDS_FLOAT_BASE),
        (dict(double_quant=True), "--double-quant applies to --quantize-base nf4 only"),
        (dict(resume=True, overwrite=True), "--resume continues a run and --overwrite replaces it: pass one of them"),
        (dict(resume="auto"), "--resume auto needs --output-dir: the folder to continue, or to start in"),
        (dict(resume="later"), "--resume takes no value or 'auto', got 'later'"),
    ],
)
def test_each_impossible_setting_is_refused_by_check_with_one_line(settings, message):
    with refused() as caught:
        TrainConfig(**settings).check()
    assert one_line(caught.value) == message  # as the command line says it


def test_progress_counts_windows_steps_skips_and_keeps_the_best_evaluation():
    progress = Progress()
    progress.consumed_window(examples=8, seconds=0.5)
    progress.skipped(loss=float("inf"), scale=2.0**15)
    assert (progress.window, progress.step, progress.skipped_steps, progress.skips_in_a_row) == (1, 0, 1, 1)
    progress.consumed_window(examples=8, seconds=0.5)
    progress.stepped()
    assert (progress.window, progress.step, progress.skips_in_a_row, progress.throughput) == (2, 1, 0, 16.0)
    assert progress.evaluated({"loss": 0.9, "accuracy": 0.5}, "accuracy", patience=2) is True
    progress.stepped()
    assert progress.evaluated({"loss": 0.8, "accuracy": 0.4}, "accuracy", patience=2) is False
    assert not progress.stopped_early and progress.bad_evals == 1
    progress.stepped()
    assert progress.evaluated({"loss": 0.7, "accuracy": 0.5}, "accuracy", patience=2) is False  # equal: no gain
    assert progress.stopped_early and progress.best_step == 1 and progress.best == 0.5
    assert progress.best_evaluation() == {"loss": 0.9, "accuracy": 0.5}
    assert [r["kind"] for r in progress.records] == ["skip", "eval", "eval", "eval"]
    assert Progress(**json.loads(json.dumps(progress.state_dict()))) == progress


def test_a_checkpoint_restores_adapter_optimizer_schedule_scaler_progress_and_generators(tmp_path):
    world = World(device=torch.device("cpu"))
    config = TrainConfig(r=2, alpha=4.0, lr=1e-2, max_steps=5, precision="fp16")

    def fresh():
        model = tiny_model(0)
        inject_lora(model, r=config.r, alpha=config.alpha, trainable_modules=("classifier",))
        return model, make_optimisation(model, config, "fp16", world, train_rows=100)

    model, optimisation = fresh()
    ids = torch.randint(5, 40, (4, 6))
    for _ in range(2):
        optimisation.scaler.scale(model(input_ids=ids).logits.sum()).backward()
        optimisation.scaler.step(optimisation.optimizer)
        optimisation.scaler.update()
        optimisation.scheduler.step()
        optimisation.optimizer.zero_grad()
    progress = Progress(window=2, step=2, records=[{"kind": "train", "step": 2, "loss": 1.0}])
    torch.manual_seed(7)
    save_training_state(tmp_path, model, optimisation, progress, world)
    expected_draw = torch.rand(3)

    other, restored = fresh()
    torch.manual_seed(99)
    assert restore_training_state(load_checkpoint(tmp_path), other, restored, world) == progress
    assert torch.equal(torch.rand(3), expected_draw)  # the generators continue where they were saved
    for (name, mine), theirs in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(mine, theirs), name
    assert json.dumps(restored.optimizer.state_dict(), default=repr) == json.dumps(
        optimisation.optimizer.state_dict(), default=repr
    )
    assert restored.scheduler.state_dict() == optimisation.scheduler.state_dict()
    assert restored.scaler.state_dict() == optimisation.scaler.state_dict()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "train", "step": 2, "loss": 1.0}\n'


def test_the_command_line_knows_which_flags_were_given_even_at_their_default_value():
    assert explicit_fields(["--lr", "3.99e-4", "--resume", "--output-dir", "x"]) == {"lr", "resume", "output_dir"}
    assert explicit_fields(["--no-amp", "--grad-acc", "4"]) == {
        "precision",
        "grad_accum",
    }  # prefixes as argparse (--grad: also --gradient-checkpointing)
    assert explicit_fields([]) == set()


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, toy_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    train(config_for(tiny_model_dir, toy_data_dir, out, lr=2e-3, max_steps=3, evaluate_test=False))
    return out


def test_resume_refuses_a_flag_given_at_its_default_value_that_differs_from_the_saved_run(saved_run, capsys):
    assert TrainConfig.lr == 3.99e-4  # the default, which the saved run (2e-3) did not use
    with refused(r"^--resume continues .*; --lr would change them \(start a new run instead\)$"):
        train_main(["--resume", "--output-dir", str(saved_run), "--lr", "3.99e-4"])
    # The same flag with the saved value, or no flag at all, is no change.
    assert resumed_config(TrainConfig(output_dir=str(saved_run), resume=True, lr=2e-3), saved_run, {"lr"}).lr == 2e-3
    assert resumed_config(TrainConfig(output_dir=str(saved_run), resume=True), saved_run, set()).lr == 2e-3
    with refused("--fp16/--bf16/--no-amp would change"):
        resumed_config(TrainConfig(precision="fp16"), saved_run, {"precision"})


def test_dora_on_a_quantized_base_is_refused_by_the_core_in_one_line():
    model = tiny_model(0)
    inject_lora(model, r=2, alpha=4.0, dora=True)
    with pytest.raises(ValueError) as refused:
        quantize_base(model, "nf4")
    assert str(refused.value) == DORA_NEEDS_FLOAT_BASE and "\n" not in DORA_NEEDS_FLOAT_BASE
    with pytest.raises(ValueError, match="^DoRA needs the float base weight"):
        DoRALinear(quantized_linear(torch.nn.Linear(64, 32), "int8"), r=2, alpha=4.0)
