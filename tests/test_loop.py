"""The training loop's hardest promises, each with a test that fails when the promise breaks
(``python tests/sabotage.py`` breaks the product code on purpose and checks that these go red):
fp16 + GradScaler, skipped steps, exact resume, accumulation, clipping, schedule, best restore."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

import lora.train.loop as training
from helpers import (
    GRADIENT_TOLERANCE,
    assert_same_run,
    config_for,
    records,
    refused,
    tiny_model,
    tiny_tokenizer,
    toy_news,
)
from lora import inject_lora
from lora.data import pad_batch, tokenize
from lora.train.loop import TrainConfig, TrainingStopped, accumulate_gradients, adamw, optimizer_step, train


def plant(monkeypatch, windows: set[int], value: float):
    """Make the gradients of the given windows (1-based) non-finite, as an fp16 overflow or a
    NaN loss would."""
    real, calls = training.accumulate_gradients, {"n": 0}

    def planted(model, *args):
        loss = real(model, *args)
        calls["n"] += 1
        if calls["n"] in windows:
            next(p for n, p in model.named_parameters() if "lora_B" in n).grad.fill_(value)
        return loss

    monkeypatch.setattr(training, "accumulate_gradients", planted)


# ---------------------------------------------------------------- fp16 + GradScaler on CPU


def test_fp16_on_cpu_trains_and_a_planted_overflow_skips_exactly_one_step(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, capsys
):
    plant(monkeypatch, windows={4}, value=float("inf"))
    out = tmp_path / "fp16"
    summary = train(config_for(tiny_model_dir, toy_data_dir, out, precision="fp16", lr=5e-3, max_steps=12))
    assert "fp16 on CPU is slow and meant for CUDA" in capsys.readouterr().out
    assert summary["precision"] == "fp16" and summary["steps"] == 12 and summary["skipped_steps"] == 1
    rows = records(out)
    skips = [r for r in rows if r["kind"] == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 3 and skips[0]["window"] == 4
    assert skips[0]["scale"] == 2.0**15  # backed off from 2 ** 16
    # The scheduler did not move on the skipped step: the 12 applied steps have exactly the
    # learning rates of a 12-step linear decay, with nothing missing or repeated.
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert lrs == pytest.approx([5e-3 * (12 - step) / 12 for step in range(1, 13)], rel=1e-12)
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["window"] == 13 and checkpoint["scheduler"]["last_epoch"] == 12
    assert checkpoint["precision"] == "fp16" and checkpoint["scaler"]["scale"] == 2.0**15
    assert {t.dtype for t in checkpoint["adapter"].values()} == {torch.float32}
    assert {t.dtype for t in load_file(str(out / "adapter.safetensors")).values()} == {torch.float32}


def test_non_finite_gradients_in_fp32_stop_at_once_with_a_resumable_checkpoint(
    tiny_model_dir, noisy_data_dir, tmp_path, monkeypatch
):
    out = tmp_path / "nan"
    plant(monkeypatch, windows={5}, value=float("nan"))
    with pytest.raises(TrainingStopped) as stopped:
        train(config_for(tiny_model_dir, noisy_data_dir, out))
    message = str(stopped.value)
    assert "\n" not in message and "not finite in 1 window(s) in a row at step 4" in message
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["step"] == 4 and checkpoint["progress"]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["adapter"].values())
    monkeypatch.setattr(training, "accumulate_gradients", accumulate_gradients)
    summary = train(TrainConfig(output_dir=str(out), resume=True))
    assert summary["steps"] == 10 and summary["skipped_steps"] == 1


def test_fp16_stops_after_too_many_skipped_steps_in_a_row(tiny_model_dir, noisy_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "MAX_CONSECUTIVE_SKIPS", 3)
    plant(monkeypatch, windows={2, 3, 4, 5}, value=float("nan"))
    with pytest.raises(TrainingStopped, match="not finite in 3 window"):
        train(config_for(tiny_model_dir, noisy_data_dir, tmp_path / "run", precision="fp16"))
    progress = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["progress"]
    assert (progress["step"], progress["window"], progress["skipped_steps"]) == (1, 4, 3)


# ---------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, noisy_data_dir, tmp_path_factory):
    """The uninterrupted run every resume is compared with. The metric is the validation loss,
    which keeps improving here, so the best adapter is written after every interruption point."""
    out = tmp_path_factory.mktemp("straight")
    train(config_for(tiny_model_dir, noisy_data_dir, out, metric="loss"))
    return out


@pytest.mark.parametrize("how", ["ctrl-c at step 5", "sigterm at step 5", "crash inside step 8"])
def test_resume_is_bit_identical_to_the_uninterrupted_run(
    how, straight_run, tiny_model_dir, noisy_data_dir, tmp_path, monkeypatch
):
    losses = [r["loss"] for r in records(straight_run) if r["kind"] == "eval"]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == len(losses)  # still moving
    assert json.loads((straight_run / "summary.json").read_text())["best_step"] == 10

    real, calls = training.accumulate_gradients, {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if how.startswith("ctrl-c") and calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)  # the loop finishes step 5 and checkpoints it
        if how.startswith("sigterm") and calls["n"] == 5:
            signal.raise_signal(signal.SIGTERM)  # kill, scancel, preemption: handled as Ctrl-C
        if how.startswith("crash") and calls["n"] == 8:
            raise KeyboardInterrupt  # mid-step: the run goes back to its last checkpoint (step 6)
        return real(*args)

    monkeypatch.setattr(training, "accumulate_gradients", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(config_for(tiny_model_dir, noisy_data_dir, out, metric="loss"))
    saved_step = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert saved_step == (6 if how.startswith("crash") else 5)

    monkeypatch.setattr(training, "accumulate_gradients", real)
    torch.manual_seed(1234)  # whatever state the process is in: the checkpoint restores it
    train(TrainConfig(output_dir=str(out), resume=True))
    assert_same_run(out, straight_run)


def test_resume_refuses_settings_that_would_change_the_run(straight_run, tmp_path):
    with refused("--lr would change"):
        train(TrainConfig(output_dir=str(straight_run), resume=True, lr=1.0))
    with refused("--fp16/--bf16/--no-amp would change"):
        train(TrainConfig(output_dir=str(straight_run), resume=True, precision="fp16"))


# ---------------------------------------------------------------- one step, exactly


def random_lora_model(seed: int = 0):
    model = tiny_model(seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inject_lora(model, r=4, alpha=8.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.train()


def test_accumulating_8_8_5_gives_the_gradient_of_one_batch_of_21():
    tokenizer = tiny_tokenizer()
    data = toy_news(21, seed=3)
    ids, labels = tokenize(data["text"], tokenizer, 32), data["label"].tolist()
    no_autocast, no_scaler = torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    gradients = []
    for bounds in ([(0, 21)], [(0, 8), (8, 16), (16, 21)]):
        model = random_lora_model()
        batches = [pad_batch(ids[a:b], tokenizer.pad_token_id, labels[a:b]) for a, b in bounds]
        accumulate_gradients(model, batches, no_autocast, no_scaler)
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    whole, split = gradients
    assert whole.keys() == split.keys() and len(whole) == 2 * 2 * 2 + 4
    for name, expected in whole.items():
        assert expected.norm() > 0, name  # every gradient compared is a real one
        torch.testing.assert_close(split[name], expected, **GRADIENT_TOLERANCE, msg=name)  # sums split 8+8+5


def sgd_model_with_gradients(scaler):
    """Two parameters with known true gradients [3, 4] (norm 5) and [0], scaled by the scaler."""
    weight = torch.nn.Parameter(torch.zeros(2))
    other = torch.nn.Parameter(torch.zeros(1))
    scaler.scale((weight * torch.tensor([3.0, 4.0])).sum() + 0 * other.sum()).backward()
    return weight, torch.optim.SGD([weight, other], lr=1.0)


@pytest.mark.parametrize("fp16", [False, True])
def test_clipping_acts_on_the_true_gradients(fp16):
    scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=2.0**10)
    weight, optimizer = sgd_model_with_gradients(scaler)
    assert weight.grad[0] == (3 * 2.0**10 if fp16 else 3)
    assert optimizer_step(optimizer, scaler, max_grad_norm=1.0) is True
    # SGD with lr 1 moves by minus the clipped true gradient: [3, 4] / 5.
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, -0.8]), rtol=1e-6, atol=0)


def test_the_loss_scale_backs_off_on_overflow_and_grows_after_good_steps():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for expected_scale in (2.0**10, 2.0**11):
        weight, optimizer = sgd_model_with_gradients(scaler)
        assert optimizer_step(optimizer, scaler, max_grad_norm=100.0) is True
        assert scaler.get_scale() == expected_scale
    weight, optimizer = sgd_model_with_gradients(scaler)
    weight.grad[0] = float("inf")
    assert optimizer_step(optimizer, scaler, max_grad_norm=100.0) is False
    assert torch.equal(weight.detach(), torch.zeros(2)) and scaler.get_scale() == 2.0**10


def test_without_a_scaler_a_non_finite_gradient_is_never_applied():
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    weight, optimizer = sgd_model_with_gradients(no_scaler)
    weight.grad[1] = float("nan")
    assert optimizer_step(optimizer, no_scaler, 1.0) is False
    assert torch.equal(weight.detach(), torch.zeros(2))


def test_weight_decay_skips_biases_and_layernorm():
    model = tiny_model()
    inject_lora(model, r=4, alpha=8.0, trainable_modules=("classifier", "LayerNorm"))
    decay, no_decay = adamw(model, TrainConfig(weight_decay=0.01)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]) == sorted(
        ["lora_A", "lora_B"] * 4 + ["weight", "weight"]
    )
    assert {names[id(p)] for p in decay["params"] if "lora" not in names[id(p)]} == {
        "classifier.dense.weight",
        "classifier.out_proj.weight",
    }
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert sum("LayerNorm" in names[id(p)] for p in no_decay["params"]) == 2 * 2 * 2 + 2


def test_warmup_then_linear_decay(tiny_model_dir, noisy_data_dir, tmp_path):
    train(config_for(tiny_model_dir, noisy_data_dir, tmp_path / "run", max_steps=8, warmup_ratio=0.25, lr=1e-3))
    lrs = [r["lr"] for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert lrs == pytest.approx([1e-3 * f for f in (0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0)], rel=1e-12)


# ---------------------------------------------------------------- the best adapter is what is tested


@pytest.mark.parametrize(
    "metric, scripted, best_step",
    [
        ("accuracy", [0.5, 0.9, 0.7, 0.6], 6),
        ("loss", [1.0, 0.4, 0.7, 0.5], 6),
    ],
)
def test_the_best_evaluation_not_the_last_decides_the_tested_adapter(
    metric, scripted, best_step, tiny_model_dir, noisy_data_dir, tmp_path, monkeypatch
):
    real, seen = training.evaluate, []

    def scripted_evaluate(model, *args):
        metrics, probabilities = real(model, *args)
        seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        if len(seen) <= len(scripted):
            metrics[metric] = scripted[len(seen) - 1]
        return metrics, probabilities

    monkeypatch.setattr(training, "evaluate", scripted_evaluate)
    summary = train(
        config_for(tiny_model_dir, noisy_data_dir, tmp_path / "run", metric=metric, max_steps=12, eval_steps=3)
    )
    assert summary["best_step"] == best_step and summary["val"][metric] == scripted[1]
    at_best, at_end, tested = seen[1], seen[3], seen[4]
    assert all(torch.equal(tested[n], at_best[n]) for n in at_best)
    assert not all(torch.equal(at_end[n], at_best[n]) for n in at_best)


def test_each_optimizer_step_consumes_grad_accum_micro_batches(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    real, windows = training.accumulate_gradients, []

    def counted(model, micro_batches, *args):
        windows.append([len(batch["labels"]) for batch in micro_batches])
        return real(model, micro_batches, *args)

    monkeypatch.setattr(training, "accumulate_gradients", counted)
    summary = train(
        config_for(
            tiny_model_dir, toy_data_dir, tmp_path / "run", batch_size=8, grad_accum=3, max_steps=4, eval_steps=4
        )
    )
    assert windows == [[8, 8, 8]] * 4  # 360 training rows: no window is short in the first epoch
    assert summary["steps"] == 4 and summary["train_examples_seen"] == 4 * 3 * 8
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["progress"]["window"] == 4


def test_train_called_from_python_refuses_an_invalid_setting_before_anything_happens(
    tiny_model_dir, toy_data_dir, tmp_path
):
    with refused("^--grad-accum must be at least 1, got 0$"):
        train(config_for(tiny_model_dir, toy_data_dir, tmp_path / "run", grad_accum=0))
    assert not (tmp_path / "run").exists()


def test_evaluation_runs_with_dropout_off_whatever_mode_the_model_is_in():
    """Validation and test metrics come from the model in eval mode: with dropout on, early
    stopping and the best checkpoint would follow dropout's noise. The model's mode comes back."""
    torch.manual_seed(0)
    model = tiny_model(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    inject_lora(model, ("query", "value"), r=4, alpha=8.0, dropout=0.3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # so that the LoRA branch and its dropout matter
    tokenizer = tiny_tokenizer()
    data = toy_news(24, seed=3)
    ids, labels = tokenize(data["text"], tokenizer, 32), data["label"].tolist()
    model.eval()
    expected = training.evaluate(model, ids, labels, 8, tokenizer.pad_token_id)
    model.train()
    for _ in range(2):
        metrics, probabilities = training.evaluate(model, ids, labels, 8, tokenizer.pad_token_id)
        assert model.training  # back in the mode it was in
        assert metrics == expected[0]
        assert torch.equal(probabilities, expected[1])  # the very same computation: bit for bit
