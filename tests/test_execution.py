"""--gradient-checkpointing and --compile change how the step runs, not what it computes: the same
loss and gradients as the plain step on the tiny model (within a tolerance from helpers.py), and
a run with either flag is the run without it."""

import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import GRADIENT_TOLERANCE, MODEL_TOLERANCE, config_for, records, refused, tiny_model, training_tolerance
from lora import inject_lora, quantize_base
from lora.cli.train import main as train_main
from lora.train import execution
from lora.train.execution import checkpoint_activations
from lora.train.loop import train


def lora_tiny_model(dropout: float, quantize: str | None = None) -> torch.nn.Module:
    """The tiny model with LoRA on query and value, ``dropout`` everywhere (hidden, attention,
    LoRA input), its base optionally quantized, in training mode; every ``lora_B`` non-zero so
    that every adapter weight gets a gradient (with B = 0, A's gradient is 0)."""
    model = tiny_model(0, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    inject_lora(model, ("query", "value"), r=4, alpha=8.0, dropout=dropout, trainable_modules=("classifier",))
    if quantize is not None:
        quantize_base(model, quantize)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(parameter, std=0.1)
    return model.train()


def loss_and_gradients(model: torch.nn.Module, seed: int = 7) -> tuple[torch.Tensor, dict]:
    """One forward and backward of a fixed batch, the random generators seeded first (the
    dropout masks); the gradients by parameter name (a compiled model's ``_orig_mod.`` removed)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (4, 12), generator=generator)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2, 3])).loss
    loss.backward()
    return loss.detach(), {
        name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters() if p.requires_grad
    }


def assert_same_loss_and_gradients(actual, expected) -> None:
    (loss, gradients), (expected_loss, expected_gradients) = actual, expected
    torch.testing.assert_close(loss, expected_loss, **MODEL_TOLERANCE)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in expected_gradients.items():
        assert gradient is not None and gradient.abs().sum() > 0, name  # it reaches every trainable weight
        torch.testing.assert_close(gradients[name], gradient, **GRADIENT_TOLERANCE, msg=name)


@pytest.mark.parametrize(
    "dropout, quantize", [(0.0, None), (0.1, None), (0.1, "nf4")], ids=["no dropout", "dropout", "dropout, nf4 base"]
)
def test_checkpointing_recomputes_the_layers_and_gives_the_same_loss_and_gradients(dropout, quantize):
    # Two float computations of one value (the recompute's kernels run in another autograd
    # graph): GRADIENT_TOLERANCE. With dropout the recompute must draw the forward's masks again
    # (the generators' state replayed): a mask drawn afresh changes the gradients by far more.
    # The nf4 base: its own autograd Function (no saved weight) inside the checkpointed layer.
    plain, checkpointed = lora_tiny_model(dropout, quantize), lora_tiny_model(dropout, quantize)
    checkpoint_activations(checkpointed)
    query = checkpointed.roberta.encoder.layer[0].attention.self.query
    calls = []
    query.register_forward_hook(lambda *_: calls.append(1))
    result = loss_and_gradients(checkpointed)
    assert len(calls) == 2  # the forward, and its recompute in backward
    assert_same_loss_and_gradients(result, loss_and_gradients(plain))
    if dropout:  # the masks matter: another seed is another loss
        assert not torch.allclose(loss_and_gradients(lora_tiny_model(dropout, quantize), seed=8)[0], result[0])


def test_a_run_with_checkpointing_is_the_run_without(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    # config_for trains with LoRA dropout 0.1: the recompute replays its masks. Two float
    # computations of the same gradients, through AdamW for 4 steps: training_tolerance.
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train(config_for(tiny_model_dir, toy_data_dir, plain, max_steps=4, evaluate_test=False))
    checkpointing = execution.checkpoint_activations
    checkpointed_models = []
    monkeypatch.setattr(
        execution, "checkpoint_activations", lambda model: checkpointed_models.append(model) or checkpointing(model)
    )
    train(
        config_for(
            tiny_model_dir, toy_data_dir, checkpointed, max_steps=4, evaluate_test=False, gradient_checkpointing=True
        )
    )
    assert len(checkpointed_models) == 1  # the run did checkpoint its model
    assert_same_runs(checkpointed, plain, training_tolerance(4, 2e-3))
    with refused("--gradient-checkpointing would change them"):
        train_main(["--resume", "--output-dir", str(plain), "--gradient-checkpointing"])


def assert_same_runs(run, expected_run, tolerance: dict) -> None:
    """Two runs of one config but for how the step ran: the same records (losses within
    ``tolerance``), and adapters with the same plain names and values within it."""
    mine, theirs = records(run), records(expected_run)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in mine]), torch.tensor([r["loss"] for r in theirs]), **tolerance
    )
    adapter, expected = (
        load_file(str(run / "adapter.safetensors")),
        load_file(str(expected_run / "adapter.safetensors")),
    )
    assert adapter.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(adapter[name], tensor, **tolerance, msg=name)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["adapter"]
    assert not [name for name in saved if "_orig_mod" in name]


@pytest.mark.timeout(180)  # two compiles of the tiny model on CPU: about 10-40 s, more on a loaded machine
@pytest.mark.skipif(
    "ATEN_CPU_CAPABILITY" in os.environ,
    reason="inductor's C++ code for the CPU it runs on does not build (or aborts the process) "
    "when ATEN_CPU_CAPABILITY forces another one (make test-portable sets it)",
)
def test_compile_gives_the_same_loss_and_gradients_and_a_run_saves_plain_names(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch
):
    # The compiled graph fuses kernels and reorders float sums (as another CPU's kernels would):
    # two float computations of one value, GRADIENT_TOLERANCE (measured: 8e-9 apart).
    compile = torch.compile
    compiled = compile(lora_tiny_model(0.0))
    assert_same_loss_and_gradients(loss_and_gradients(compiled), loss_and_gradients(lora_tiny_model(0.0)))

    plain, fast = tmp_path / "plain", tmp_path / "compiled"
    train(config_for(tiny_model_dir, toy_data_dir, plain, max_steps=1, dropout=0.0, evaluate_test=False))
    compiled_modules = []
    monkeypatch.setattr(execution.torch, "compile", lambda module: compiled_modules.append(module) or compile(module))
    train(config_for(tiny_model_dir, toy_data_dir, fast, max_steps=1, dropout=0.0, evaluate_test=False, compile=True))
    assert len(compiled_modules) == 1  # the run did compile its model
    assert_same_runs(fast, plain, training_tolerance(1, 2e-3))
    with refused("--compile would change them"):
        train_main(["--resume", "--output-dir", str(plain), "--compile"])
