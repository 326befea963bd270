"""LoRALinear on its own: shapes, initialisation, the forward formula, precision, merge/unmerge
and bad arguments. No RoBERTa here; everything runs on small random ``nn.Linear`` layers."""

import math

import pytest
import torch
from torch import nn

from helpers import assert_same_value
from lora import LoRALinear

IN, OUT, R, ALPHA = 16, 12, 4, 8.0
HALF_DTYPES = [torch.float16, torch.bfloat16]


def make_layer(dtype=torch.float32, r=R, alpha=ALPHA, dropout=0.0, rslora=False, seed=0, random_b=True) -> LoRALinear:
    """A seeded eval-mode LoRALinear around a ``dtype`` Linear(IN, OUT); ``B`` random unless
    ``random_b`` is False (then it keeps its zero initialisation)."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(IN, OUT).to(dtype).eval(), r, alpha, dropout, rslora)
    if random_b:
        with torch.no_grad():
            layer.lora_B.normal_(0.0, 0.2)
    return layer


def reference(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T + b + scaling * x @ A^T @ B^T`` in float64, from the parameters directly."""
    W, b = layer.base.weight.double(), layer.base.bias.double()
    A, B = layer.lora_A.double(), layer.lora_B.double()
    x = x.double()
    return x @ W.T + b + layer.scaling * (x @ A.T @ B.T)


def test_initial_parameters():
    layer = LoRALinear(nn.Linear(IN, OUT), r=R, alpha=ALPHA)
    assert layer.lora_A.shape == (R, IN) and layer.lora_B.shape == (OUT, R)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0
    # A gets nn.Linear's own init: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(IN)
    assert layer.lora_A.std() > 0.5 / math.sqrt(3 * IN)
    assert layer.scaling == ALPHA / R == 2.0
    assert layer.merged is False
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


def test_wraps_the_given_linear_without_copying():
    base = nn.Linear(IN, OUT)
    layer = LoRALinear(base, r=R, alpha=ALPHA)
    assert layer.base is base
    assert "weight_before_merge" not in layer.state_dict()


@pytest.mark.parametrize("training", [False, True])
def test_zero_init_returns_the_base_output_bit_for_bit(training):
    layer = make_layer(dropout=0.5, random_b=False).train(training)
    x = torch.randn(4, 7, IN)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("training", [False, True])
def test_takes_the_training_mode_of_the_wrapped_layer(training):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(IN, OUT).train(training), r=R, alpha=ALPHA, dropout=0.5)
    assert layer.training is training and layer.dropout.training is training
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, IN)
    # Dropout on the LoRA branch is active exactly when the wrapper trains.
    assert torch.equal(layer(x), layer(x)) is not training


@pytest.mark.parametrize("rslora, scaling", [(False, 8.0 / 16), (True, 8.0 / 4)])
def test_scaling(rslora, scaling):
    layer = LoRALinear(nn.Linear(IN, OUT), r=16, alpha=8.0, rslora=rslora)
    assert layer.scaling == scaling
    assert layer.rslora is rslora


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_weight_is_scaled_b_times_a(rslora):
    layer = make_layer(rslora=rslora)
    delta = layer.delta_weight()
    assert delta.shape == (OUT, IN) and delta.dtype == torch.float32
    assert torch.equal(delta, layer.scaling * (layer.lora_B @ layer.lora_A))
    assert torch.linalg.matrix_rank(delta.detach()) == R
    expected = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert_same_value(delta.double(), expected, terms=R)  # float32 against float64


@pytest.mark.parametrize("leading", [(), (5,), (3, 5), (2, 3, 5)], ids=["1d", "2d", "3d", "4d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_formula_for_any_leading_shape(leading, rslora):
    layer = make_layer(rslora=rslora)
    x = torch.randn(*leading, IN)
    y = layer(x)
    assert y.shape == (*leading, OUT) and y.dtype == torch.float32
    assert_same_value(y.double(), reference(layer, x), terms=IN)  # float32 against float64
    # The LoRA branch really contributes: the output is not the base output.
    assert (y - layer.base(x)).abs().max() > 1e-2


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_base(dtype, atol):
    layer = make_layer(dtype)
    assert layer.base.weight.dtype == dtype
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(2, 3, 5, IN).to(dtype)
    y = layer(x)
    assert y.dtype == layer.base(x).dtype == dtype
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=0, atol=atol)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert layer.base.weight.grad is None


def test_autocast_bfloat16_on_cpu():
    layer = make_layer()
    x = torch.randn(3, 5, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base_dtype = layer.base(x).dtype
    assert base_dtype == torch.bfloat16 and y.dtype == base_dtype
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=0, atol=6e-2)
    y.float().sum().backward()
    assert layer.lora_A.dtype == layer.lora_A.grad.dtype == torch.float32
    assert layer.lora_B.grad.dtype == torch.float32


def test_gradients_reach_only_a_and_b_and_a_starts_at_zero_gradient():
    layer = make_layer(random_b=False)
    layer(torch.randn(6, IN)).pow(2).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    # With B = 0 the gradient of A is exactly zero; only B moves at the first step.
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


def test_merge_then_unmerge_float32():
    layer = make_layer()
    weight, bias = layer.base.weight.clone(), layer.base.bias.clone()
    x = torch.randn(4, 5, IN)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    assert (merged - unmerged).abs().max() < 1e-5
    torch.testing.assert_close(layer.base.weight, weight + layer.delta_weight(), rtol=0, atol=0)
    assert torch.equal(layer.base.bias, bias)
    layer.unmerge()
    assert not layer.merged and layer.weight_before_merge is None
    assert torch.equal(layer.base.weight, weight)
    assert torch.equal(layer(x), unmerged)


# Measured max |merged - unmerged| for this layer and input: float16 0.00098, bfloat16 0.0078,
# i.e. half a unit in the last place of outputs of magnitude ~2 (one rounding of W + delta_W).
# Asserted with 2x margin.
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_merge_in_half_precision(dtype, atol):
    layer = make_layer(dtype)
    weight = layer.base.weight.clone()
    x = torch.randn(3, 5, IN).to(dtype)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    assert merged.dtype == dtype and layer.base.weight.dtype == dtype
    assert (merged.float() - unmerged.float()).abs().max() <= atol
    layer.unmerge()
    assert torch.equal(layer.base.weight, weight)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_many_merge_unmerge_cycles_restore_the_weight_bit_for_bit(dtype):
    layer = make_layer(dtype)
    weight = layer.base.weight.clone()
    x = torch.randn(4, IN).to(dtype)
    before = layer(x)
    for _ in range(50):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base.weight, weight)
    assert torch.equal(layer(x), before)


def test_merge_twice_and_unmerge_unmerged_are_no_ops():
    layer = make_layer()
    weight = layer.base.weight.clone()
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.base.weight, weight)
    layer.merge()
    once = layer.base.weight.clone()
    layer.merge()
    assert layer.merged and torch.equal(layer.base.weight, once)
    layer.unmerge()
    assert torch.equal(layer.base.weight, weight)


def test_training_while_merged_raises():
    layer = make_layer()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()
    layer.eval()  # eval mode is allowed while merged
    layer.unmerge()
    layer.train()
    # A layer merged while in training mode refuses a training forward.
    layer.merge()
    assert layer.training
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, IN))


@pytest.mark.parametrize("dtype, value", [(torch.float16, 1e3), (torch.float32, float("nan"))])
def test_merge_refuses_non_finite_weights(dtype, value):
    layer = make_layer(dtype)
    with torch.no_grad():
        layer.lora_A.fill_(value)
        layer.lora_B.fill_(value)
    weight = layer.base.weight.clone()
    # float16: 1e6 * scaling overflows to inf only once cast back to the base dtype.
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, weight)


def test_extra_repr():
    layer = LoRALinear(nn.Linear(IN, OUT), r=4, alpha=8.0).eval()
    assert layer.extra_repr() == "r=4, alpha=8, scaling=2, merged=False"
    layer.merge()
    assert "merged=True" in repr(layer)
    assert "scaling=2.828" in repr(LoRALinear(nn.Linear(IN, OUT), r=8, alpha=8.0, rslora=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "rank r"),
        (dict(r=-1), "rank r"),
        (dict(r=2.5), "rank r"),
        (dict(r=True), "rank r"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    settings = dict(r=R, alpha=ALPHA, dropout=0.0) | kwargs
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(IN, OUT), **settings)


@pytest.mark.parametrize(
    "module", [nn.Conv1d(IN, OUT, 1), nn.Embedding(IN, OUT), nn.Identity()], ids=["conv", "embedding", "identity"]
)
def test_non_linear_raises_type_error(module):
    with pytest.raises(TypeError, match=type(module).__name__):
        LoRALinear(module, r=R, alpha=ALPHA)
