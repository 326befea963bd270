"""DoRA, PiSSA and LoRA+ (lora/variants.py) against their definitions and against peft 0.21
with copied weights; adapters that rebuild the trained model; train.py, predict and inspect.

Float32 tolerances: logits 1e-6 absolute (peft sums the same terms in another order);
gradients 1e-4 relative + 1e-7 absolute; merged weights 1e-6; PiSSA products and residuals
1e-5 (a full SVD in float32 of 32 x 32 weights of norm about 1)."""

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn
from transformers import RobertaForSequenceClassification

import lora.train.loop as training
from helpers import (
    MODEL_TOLERANCE,
    TINY_MODEL_TERMS,
    assert_gradients_match_peft,
    assert_same_run,
    assert_same_value,
    config_for,
    peft_key,
    refused,
    roberta_base_config,
    tiny_model,
    tiny_tokenizer,
)
from lora import (
    DoRALinear,
    LoRALinear,
    apply_adapter,
    count_parameters,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_plus_groups,
    lora_state_dict,
    merge_lora,
    parameter_table,
    save_adapter,
    unmerge_lora,
)
from lora.classifier import load_classifier
from lora.cli.inspect_lora import main as inspect_main
from lora.cli.train import parse_args
from lora.inspection import update_stats
from lora.train.loop import TrainConfig, adamw, train

TEXTS = [
    "Stocks rally as bank profit beats the market",
    "Coach praises team after cup match",
    "New chip for online research",
]
LABELS = torch.tensor([2, 1, 3])
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch() -> dict[str, torch.Tensor]:
    return dict(tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt"))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def train_a_little(model: nn.Module, seed: int = 1) -> None:
    """Stand-in for training: seeded noise on A, B and the head, +-30% on DoRA's magnitude."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora_state_dict(model).items():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("lora_magnitude"):
                parameter.mul_(1 + 0.3 * noise)
            elif name.endswith(("lora_A", "lora_B")):
                parameter.add_(0.2 * noise)
            else:
                parameter.copy_(0.2 * noise)


def with_peft(model: nn.Module, r=4, alpha=8, dropout=0.0, **settings) -> nn.Module:
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        **settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def dora_pair(dropout=0.0, **overrides):
    """Our DoRA model and peft's ``use_dora=True`` on the same tiny base, same trained tensors."""
    ours = tiny_model(0, **overrides)
    inject_lora(ours, r=4, alpha=8, dropout=dropout, dora=True)
    train_a_little(ours)
    theirs = with_peft(tiny_model(0, **overrides), dropout=dropout, use_dora=True)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, tensor in lora_state_dict(ours).items():
            peft_params[peft_key(name)].copy_(tensor)
    assert {peft_key(n) for n in lora_state_dict(ours)} == {n for n, p in theirs.named_parameters() if p.requires_grad}
    return ours.eval(), theirs.eval()


# --- zero initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_zero_init_gives_the_base_model_bit_for_bit(dora):
    model = tiny_model(0)
    inject_lora(model, ("query", "key", "value"), r=4, alpha=8, dropout=0.1, dora=dora)
    assert torch.equal(logits(model), logits(tiny_model(0)))
    if dora:  # m starts at the row norms of W
        for _, layer in lora_layers(model):
            assert torch.equal(layer.lora_magnitude, layer.base.weight.norm(dim=1))


# --- DoRA ---------------------------------------------------------------------------------------


def test_dora_layer_computes_its_formula():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 5), r=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.5)
    x = torch.randn(3, 6)
    weight, bias = layer.base.weight, layer.base.bias
    adapted = weight + 2.0 * layer.lora_B @ layer.lora_A
    expected_weight = layer.lora_magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    # Our order of operations against the formula's: 6 input features a value.
    assert_same_value(layer(x), x @ expected_weight.T + bias, terms=6)
    assert_same_value(layer.delta_weight(), expected_weight - weight, terms=6)


def test_dora_logits_and_gradients_match_peft():
    ours, theirs = dora_pair(**NO_DROPOUT)
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(tiny_model(0, **NO_DROPOUT)), atol=1e-2)
    torch.testing.assert_close(logits(ours), expected, **MODEL_TOLERANCE)
    for model in (ours, theirs):
        model.train()
        model(**batch(), labels=LABELS).loss.backward()
    assert_gradients_match_peft(ours, theirs)


def test_dora_training_forward_with_dropout_matches_peft_under_the_same_seed():
    """With dropout, (W' - W) acts on dropout(x): peft's W @ dropout(x) path, same draws."""
    ours, theirs = dora_pair(dropout=0.3)
    evaluated = logits(ours)
    trained = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(5)
        with torch.no_grad():
            trained.append(model(**batch()).logits)
    assert not torch.allclose(trained[0], evaluated, atol=1e-2)  # dropout was active
    torch.testing.assert_close(trained[0], trained[1], **MODEL_TOLERANCE)


def test_dora_merge_matches_peft_and_unmerge_is_bit_exact():
    ours, theirs = dora_pair()
    pretrained = {name: layer.base.weight.clone() for name, layer in lora_layers(ours)}
    unmerged = logits(ours)
    merge_lora(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = theirs.merge_and_unload()
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.base.weight, merged.get_submodule(name).weight, **MODEL_TOLERANCE)
    torch.testing.assert_close(logits(ours), unmerged, **MODEL_TOLERANCE)
    unmerge_lora(ours)
    for name, layer in lora_layers(ours):
        assert torch.equal(layer.base.weight, pretrained[name]), name
    assert torch.equal(logits(ours), unmerged)


def test_dora_parameter_counts_match_peft_and_the_formula():
    """Per adapted layer r * (in + out) + out: roberta-base, r=10 on query and value:
    24 * (10 * (768 + 768) + 768) = 387,072, plus the 593,668 head = 980,740."""

    def roberta_base_shape():
        with torch.device("meta"):
            return RobertaForSequenceClassification(roberta_base_config())

    ours = roberta_base_shape()
    inject_lora(ours, r=10, alpha=64, dora=True)
    theirs = with_peft(roberta_base_shape(), r=10, alpha=64, use_dora=True)
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours)[0] == peft_trainable == 24 * (10 * (768 + 768) + 768) + 593_668 == 980_740
    row = next(line for line in parameter_table(ours).splitlines() if line.startswith("roberta"))
    assert row.split()[1:4] == ["10x768", "768x10", "16,128"]
    assert row.endswith("10 * (768 + 768) + 768")


# --- PiSSA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True], ids=["scaling", "rslora"])
def test_pissa_init_matches_peft(rslora):
    ours = tiny_model(0)
    inject_lora(ours, r=4, alpha=8, rslora=rslora, init="pissa")
    theirs = with_peft(tiny_model(0), use_rslora=rslora, init_lora_weights="pissa")
    pretrained = tiny_model(0)
    for name, layer in lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        # Compare products: the SVD fixes each singular vector only up to its sign. Two SVDs of a
        # 32 x 32 matrix agree to about n * eps * |W|: the tolerance of 32 * 32 reordered terms.
        assert_same_value(
            layer.lora_B @ layer.lora_A,
            peft_layer.get_delta_weight("default") / peft_layer.scaling["default"],
            terms=32 * 32,
        )
        assert_same_value(layer.base.weight, peft_layer.base_layer.weight, terms=32 * 32)
        # The definition: s B0 A0 is the best rank-r part of W, and W_res + s B0 A0 = W.
        weight = pretrained.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(weight)
        assert_same_value(layer.delta_weight(), u[:, :4] * s[:4] @ vh[:4], terms=32 * 32)
        assert_same_value(layer.base.weight + layer.delta_weight(), weight, terms=32 * 32)
    torch.testing.assert_close(logits(ours), logits(pretrained), **MODEL_TOLERANCE)


@pytest.mark.parametrize(
    "settings", [dict(), dict(rslora=True), dict(dora=True)], ids=["pissa", "pissa-rslora", "pissa-dora"]
)
def test_a_pissa_adapter_rebuilds_the_trained_model_from_the_pretrained_one(settings, tmp_path):
    model = tiny_model(0)
    inject_lora(model, r=4, alpha=8, init="pissa", **settings)
    train_a_little(model)
    expected = logits(model)
    save_adapter(tmp_path, model)
    state, config = load_adapter(tmp_path)
    # Saved as peft saves a converted PiSSA adapter: rank 2r, the same scaling.
    assert config.lora.r == 8 and config.lora.alpha == pytest.approx(
        8 * (math.sqrt(2) if settings.get("rslora") else 2)
    )
    assert config.lora.init == "lora"  # a plain LoRA on the pretrained weights
    assert state["roberta.encoder.layer.0.attention.self.query.lora_A"].shape == (8, 32)
    fresh = tiny_model(0)  # the untouched pretrained weights
    apply_adapter(fresh, state, config)
    assert all(type(layer) is (DoRALinear if settings.get("dora") else LoRALinear) for _, layer in lora_layers(fresh))
    torch.testing.assert_close(logits(fresh), expected, **MODEL_TOLERANCE)
    merge_lora(fresh)
    torch.testing.assert_close(logits(fresh), expected, **MODEL_TOLERANCE)
    # Back into the PiSSA model (train.py restores its best adapter so): bit for bit.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.zero_()
    load_lora_state_dict(model, state)
    assert torch.equal(logits(model), expected)


def test_a_pissa_adapter_with_another_start_is_refused():
    model = tiny_model(0)
    inject_lora(model, r=4, alpha=8, init="pissa")
    state = {name: tensor.clone() for name, tensor in lora_state_dict(model).items()}
    state["roberta.encoder.layer.1.attention.self.value.lora_A"][4:] *= -1  # another SVD sign
    with pytest.raises(ValueError, match="PiSSA start"):
        load_lora_state_dict(model, state)


# --- LoRA+ --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_plus_groups_match_peft_except_for_one_dimensional_tensors(dora):
    ours = tiny_model(0)
    inject_lora(ours, r=4, alpha=8, dora=dora)
    groups = lora_plus_groups(ours, [{"params": [p for p in ours.parameters() if p.requires_grad]}], lr=1e-3, ratio=16)
    our_lr = {id(p): group["lr"] for group in groups for p in group["params"]}
    theirs = with_peft(tiny_model(0), use_dora=dora)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    their_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    peft_params = dict(theirs.named_parameters())
    differ = set()
    for name, parameter in ours.named_parameters():
        if not parameter.requires_grad:
            continue
        expected = 1e-3 * 16 if name.endswith("lora_B") else 1e-3
        assert our_lr[id(parameter)] == pytest.approx(expected), name
        if their_lr[id(peft_params[peft_key(name)])] != pytest.approx(expected):
            differ.add(name)
            assert parameter.ndim == 1 and their_lr[id(peft_params[peft_key(name)])] == pytest.approx(16e-3)
    magnitudes = {n for n, _ in ours.named_parameters() if n.endswith("lora_magnitude")}
    # peft's rule "every 1-D tensor is fast" is the only difference: the head's biases (and m).
    assert differ == {"classifier.dense.bias", "classifier.out_proj.bias"} | magnitudes
    assert len(magnitudes) == (4 if dora else 0)


def test_adamw_with_lora_plus_keeps_weight_decay_rules():
    model = tiny_model(0)
    inject_lora(model, r=4, alpha=8)
    optimizer = adamw(model, TrainConfig(lr=2e-3, weight_decay=0.01, lora_plus_ratio=16))
    settings = {
        id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
    }
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            lr = 32e-3 if name.endswith("lora_B") else 2e-3
            decay = 0.0 if parameter.ndim < 2 else 0.01
            assert settings[id(parameter)] == pytest.approx((lr, decay)), name
    plain = adamw(model, TrainConfig(lr=2e-3))
    assert {group["lr"] for group in plain.param_groups} == {2e-3}


# --- train.py, predict, inspect -----------------------------------------------------------------


def test_train_flags_fill_the_config():
    config = parse_args(["--dora", "--init", "pissa", "--lora-plus-ratio", "16", "--rslora"])
    assert (config.dora, config.init, config.lora_plus_ratio, config.rslora) == (True, "pissa", 16.0, True)
    default = parse_args([])
    assert (default.dora, default.init, default.lora_plus_ratio, default.rslora) == (False, "lora", None, False)
    with refused("--lora-plus-ratio must be > 0"):
        TrainConfig(lora_plus_ratio=0.0).check()
    with refused("--init must be one of"):
        TrainConfig(init="olora").check()
    with refused("^DoRA needs the float base weight"):
        TrainConfig(dora=True, quantize_base="nf4").check()
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--init", "olora"])
    assert exit_info.value.code == 2


def test_dora_pissa_lora_plus_train_predict_and_inspect(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(
        TrainConfig(
            model=str(tiny_model_dir),
            data=str(toy_data_dir),
            output_dir=str(out),
            r=4,
            alpha=8.0,
            dropout=0.1,
            lr=5e-3,
            batch_size=16,
            grad_accum=2,
            epochs=1,
            eval_steps=100,
            max_length=32,
            val_size=0.1,
            warmup_ratio=0.0,
            dora=True,
            init="pissa",
            lora_plus_ratio=4.0,
        )
    )
    assert summary["trainable_parameters"] == 4 * (4 * (32 + 32) + 32) + (32 * 32 + 32) + (32 * 4 + 4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["dora"], config["r"], config["alpha"]) == (True, 8, 16.0)
    assert config["trainable_modules"] == ["classifier"]  # m is part of the LoRA layers, not a module
    classifier = load_classifier(out, device="cpu")  # merged
    assert all(layer.merged for _, layer in lora_layers(classifier.model))
    import pandas as pd

    test = pd.read_csv(toy_data_dir / "test.csv")
    accuracy = (classifier.predict_proba(test["text"].tolist()).argmax(axis=1) == test["label"]).mean()
    assert accuracy == pytest.approx(summary["test"]["accuracy"])
    capsys.readouterr()
    inspect_main(["--adapter", str(out), "--plot", str(tmp_path / "plot.png")])
    printed = capsys.readouterr().out
    assert "|dm|/|m|" in printed and "8 * (32 + 32) + 32" in printed


def test_inspection_reports_the_magnitude_change():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(12, 10), r=4, alpha=8.0)
    assert update_stats("q", layer).magnitude_change == 0.0
    with torch.no_grad():
        layer.lora_magnitude.mul_(1.1)
    assert update_stats("q", layer).magnitude_change == pytest.approx(0.1, rel=1e-5)
    assert update_stats("q", LoRALinear(nn.Linear(12, 10), r=4, alpha=8.0)).magnitude_change is None


def test_a_dora_pissa_lora_plus_run_resumes_bit_for_bit(tiny_model_dir, noisy_data_dir, tmp_path, monkeypatch):
    """Checkpoints hold PiSSA's adapter in its saved rank-2r form: resuming converts it back exactly."""
    variant = dict(dora=True, init="pissa", lora_plus_ratio=4.0, metric="loss", max_steps=6)
    straight = tmp_path / "straight"
    train(config_for(tiny_model_dir, noisy_data_dir, straight, **variant))
    real, calls = training.accumulate_gradients, {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # mid-step 5: back to the checkpoint of step 3
        return real(*args)

    monkeypatch.setattr(training, "accumulate_gradients", crashing)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(config_for(tiny_model_dir, noisy_data_dir, resumed, **variant))
    monkeypatch.setattr(training, "accumulate_gradients", real)
    train(TrainConfig(output_dir=str(resumed), resume=True))
    assert_same_run(resumed, straight)


def test_dora_with_pissa_starts_equal_to_the_pretrained_model():
    """PiSSA moves the top-r part of W into B0 A0 and DoRA's magnitude must then start at the row
    norms of W_res + s B0 A0, which are those of the pretrained W (not of the residual)."""
    pretrained = tiny_model(0, **NO_DROPOUT)
    ours = tiny_model(0, **NO_DROPOUT)
    inject_lora(ours, r=4, alpha=8, dora=True, init="pissa")
    for name, layer in lora_layers(ours):
        weight = pretrained.get_submodule(name).weight
        assert_same_value(layer.lora_magnitude, weight.norm(dim=1), terms=32 * 32, msg=name)  # through an SVD
        assert not torch.allclose(layer.base.weight.norm(dim=1), weight.norm(dim=1), atol=1e-2), name
    assert_same_value(logits(ours), logits(pretrained), terms=32 * 32 + TINY_MODEL_TERMS)
