"""inject_lora and friends on RoBERTa: what gets wrapped and frozen, exact parameter counts,
zero initialisation, gradients, merge/unmerge of a whole model, adapter state and bad input."""

import dataclasses

import pytest
import torch
from torch import nn
from transformers import RobertaForSequenceClassification

from helpers import roberta_base_config, tiny_model, tiny_tokenizer
from lora import (
    LoRAConfig,
    LoRALinear,
    count_parameters,
    inject_lora,
    layer_index,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    parameter_table,
    unmerge_lora,
)
from lora.model import head_parameters, saved_lora_config

TEXTS = [
    "Stocks rally as bank profit beats the market",
    "Coach praises team after cup match",
    "New chip for online research",
]


def batch() -> dict[str, torch.Tensor]:
    """Three padded texts of different lengths, so the attention mask matters."""
    return dict(tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt"))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Fill every trainable tensor (LoRA A and B, the head) with seeded noise, so that the
    adapter actually changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_tensors(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(now[name], tensor), name


def roberta_base_shape(device: str = "cpu") -> RobertaForSequenceClassification:
    """roberta-base's architecture with random weights (nothing downloaded); on the ``meta``
    device it costs no memory and no time, which is all that parameter counting needs."""
    torch.manual_seed(0)
    with torch.device(device):
        return RobertaForSequenceClassification(roberta_base_config()).eval()


@pytest.fixture(scope="module")
def roberta_base_r10():
    """A real (CPU, random-weight) roberta-base-shaped model with r=10, alpha=64 on query and
    value; built once for this module (~125M parameters)."""
    model = roberta_base_shape()
    base_total = count_parameters(model)[1]
    names = inject_lora(model, ("query", "value"), r=10, alpha=64)
    return model, names, base_total


# --- exact parameter counts ------------------------------------------------------------------


def test_roberta_base_r10_query_value_count(roberta_base_r10):
    model, names, base_total = roberta_base_r10
    assert base_total == 124_648_708
    assert len(names) == 24
    # 24 * 10 * (768 + 768) = 368,640 LoRA + head 768*768+768 + 768*4+4 = 593,668.
    assert count_parameters(model) == (962_308, base_total + 368_640)
    assert sum(p.numel() for p in lora_state_dict(model).values()) == 962_308


def test_roberta_base_parameter_table(roberta_base_r10):
    model, names, _ = roberta_base_r10
    table = parameter_table(model).splitlines()
    assert table[0].split() == ["module", "A", "B", "trainable", "formula"]
    assert len(table) == 1 + 24 + 1 + 4 + 1 + 1  # LoRA rows, their subtotal, the head's rows, its subtotal, total
    assert table[25].split() == ["encoder", "layers", "368,640", "38.3%", "of", "trainable"]
    assert table[30].split()[-4:] == ["593,668", "61.7%", "of", "trainable"]  # the head: 62% of the budget
    assert table[1].split() == [
        "roberta.encoder.layer.0.attention.self.query",
        "10x768",
        "768x10",
        "15,360",
        "10",
        "*",
        "(768",
        "+",
        "768)",
    ]
    assert "classifier.dense.weight" in table[26] and "589,824" in table[26]
    assert table[-1].split() == ["total", "962,308", "0.770%", "of", "125,017,348"]


@pytest.mark.parametrize(
    "head, trainable, in_the_head",
    [
        ("full", 962_308, 593_668),  # classifier.dense 768x768 + 768, out_proj 4x768 + 4: 62% of the budget
        ("lora", 387_076, 18_436),  # LoRA r=10 on classifier.dense: 10 * (768 + 768), out_proj in full
        ("linear", 371_716, 3_076),  # out_proj alone
    ],
)
def test_roberta_base_r10_query_value_count_with_each_head(head, trainable, in_the_head):
    model = roberta_base_shape("meta")
    inject_lora(model, ("query", "value"), r=10, alpha=64, head=head)
    assert count_parameters(model)[0] == trainable == 368_640 + in_the_head
    assert head_parameters(model) == in_the_head


def test_roberta_base_r8_query_count():
    model = roberta_base_shape("meta")
    inject_lora(model, ("query",), r=8, alpha=16)
    # 12 * 8 * (768 + 768) = 147,456 LoRA + 593,668 head.
    assert count_parameters(model) == (741_124, 124_648_708 + 147_456)


def test_count_parameters_tiny():
    model = tiny_model(0)
    assert count_parameters(model)[0] == count_parameters(model)[1]
    total = count_parameters(model)[1]
    inject_lora(model, r=4, alpha=8)
    lora = 2 * 2 * 4 * (32 + 32)
    head = 32 * 32 + 32 + 32 * 4 + 4
    assert count_parameters(model) == (lora + head, total + lora)


# --- what inject_lora does -----------------------------------------------------------------------


def test_inject_wraps_targets_in_place_and_freezes_the_rest():
    model = tiny_model(0)
    originals = {name: module for name, module in model.named_modules()}
    names = inject_lora(model, ("query", "value"), r=4, alpha=8)
    expected = [f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert names == expected
    assert [name for name, _ in lora_layers(model)] == expected
    for name in expected:
        module = model.get_submodule(name)
        assert isinstance(module, LoRALinear) and module.r == 4 and module.scaling == 2.0
        assert module.base is originals[name]  # wrapped, not copied
    assert isinstance(model.get_submodule("roberta.encoder.layer.0.attention.self.key"), nn.Linear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == (
        {f"{n}.lora_{m}" for n in expected for m in "AB"}
        | {f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    )
    assert lora_state_dict(model).keys() == trainable


def test_injection_keeps_an_eval_model_in_eval_mode():
    model = tiny_model(0)
    inject_lora(model, ("query", "key", "value"), r=4, alpha=8, dropout=0.5)
    assert not any(module.training for module in model.modules())
    randomize(model)
    assert torch.equal(logits(model), logits(model))  # no dropout on the LoRA branch


def test_zero_init_outputs_equal_the_original_bit_for_bit():
    model = tiny_model(0)
    before = logits(model)
    inject_lora(model, ("query", "key", "value", "dense"), r=8, alpha=16, dropout=0.1)
    model.eval()
    after = logits(model)
    assert torch.equal(after, before)
    randomize(model, std=0.01)  # the check above compares something that can change
    assert not torch.equal(logits(model), before)


def test_layers_restricts_injection_and_settings_report_it():
    model = tiny_model(0)
    names = inject_lora(model, ("query",), r=4, alpha=8, layers=[0])
    assert names == ["roberta.encoder.layer.0.attention.self.query"]
    assert isinstance(model.roberta.encoder.layer[1].attention.self.query, nn.Linear)
    assert model.lora.config.layers == (0,)


def test_the_model_records_the_config_it_was_given():
    model = tiny_model(0)
    names = inject_lora(model, ("value", "query"), r=4, alpha=8.0, dropout=0.1, rslora=True)
    assert model.lora.config == LoRAConfig(r=4, alpha=8.0, dropout=0.1, rslora=True, target_modules=("value", "query"))
    assert model.lora.modules == tuple(names) and len(model.lora.base_fingerprint) == 16
    # plain LoRA is saved as it was given, with the modules it trained in full (by default the head) spelled out
    assert saved_lora_config(model) == dataclasses.replace(model.lora.config, trainable_modules=("classifier",))
    with pytest.raises(ValueError, match="no LoRA layers"):
        saved_lora_config(tiny_model(0))
    config = LoRAConfig(r=2, alpha=4.0, target_modules=["query"], layers=[1])  # lists become tuples
    assert (config.target_modules, config.layers) == (("query",), (1,)) and hash(config)
    again = tiny_model(0)
    assert (
        inject_lora(again, config) == ["roberta.encoder.layer.1.attention.self.query"] and again.lora.config is config
    )
    with pytest.raises(TypeError, match="not both"):
        inject_lora(tiny_model(0), config, r=4)
    with pytest.raises(ValueError, match="rank r must be an integer >= 1"):
        LoRAConfig(r=0, alpha=1.0)


def test_the_recorded_config_reproduces_the_same_trainable_parameters():
    """Trainable modules below the top level (LayerNorm) must survive a read-back."""
    model = tiny_model(0)
    inject_lora(model, r=8, alpha=16, trainable_modules=("classifier", "LayerNorm"))
    again = tiny_model(0)
    inject_lora(again, saved_lora_config(model))
    assert lora_state_dict(again).keys() == lora_state_dict(model).keys()
    assert any("LayerNorm" in name for name in lora_state_dict(again))


def test_layer_index():
    assert layer_index("roberta.encoder.layer.3.attention.self.query") == 3
    assert layer_index("roberta.encoder.layer.11.output.dense") == 11
    assert layer_index("classifier.dense") is None


# --- gradients and optimizer ---------------------------------------------------------------------


def is_adapter(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name or name.startswith("classifier.")


def test_gradients_reach_only_lora_and_the_head():
    model = tiny_model(0)
    inject_lora(model, ("query", "key", "value"), r=4, alpha=8)
    randomize(model)  # non-zero B, so that A gets a gradient too
    model.train()
    model(**batch(), labels=torch.tensor([2, 1, 3])).loss.backward()
    for name, parameter in model.named_parameters():
        if is_adapter(name):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_adamw_step_leaves_every_base_weight_unchanged():
    model = tiny_model(0)
    inject_lora(model, ("query", "value"), r=4, alpha=8, dropout=0.1)
    randomize(model)
    before = snapshot(model)
    # Every parameter goes to the optimizer, frozen ones too: weight decay must not touch them.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch(), labels=torch.tensor([2, 1, 3])).loss.backward()
        optimizer.step()
    after = model.state_dict()
    for name, tensor in before.items():
        if is_adapter(name):
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name


# --- merge / unmerge a whole model ---------------------------------------------------------------


def test_merge_unmerge_model():
    model = tiny_model(0)
    inject_lora(model, ("query", "key", "value"), r=4, alpha=8, dropout=0.1)
    randomize(model)
    unmerged = logits(model)
    base = snapshot(model)
    merge_lora(model)
    assert all(module.merged for _, module in lora_layers(model))
    merged = logits(model)
    assert (merged - unmerged).abs().max() < 1e-5
    assert not torch.equal(
        model.roberta.encoder.layer[0].attention.self.query.base.weight,
        base["roberta.encoder.layer.0.attention.self.query.base.weight"],
    )
    merged_weights = snapshot(model)
    merge_lora(model)  # no-op
    assert_same_tensors(model, merged_weights)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.train()
    model.eval()
    unmerge_lora(model)
    assert not any(module.merged for _, module in lora_layers(model))
    assert_same_tensors(model, base)
    assert torch.equal(logits(model), unmerged)
    unmerge_lora(model)  # no-op
    assert_same_tensors(model, base)
    for _ in range(20):
        merge_lora(model)
        unmerge_lora(model)
    assert_same_tensors(model, base)
    model.train()  # allowed again


# Measured max |merged - unmerged| logits (magnitude ~1.1): float16 0.00098, bfloat16 0.0039,
# about one unit in the last place (float32: 2.1e-7). Asserted with 2x margin.
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 8e-3)])
def test_merge_model_in_half_precision(dtype, atol):
    model = tiny_model(0).to(dtype)
    inject_lora(model, ("query", "key", "value"), r=4, alpha=8)
    randomize(model)
    base = snapshot(model)
    unmerged = logits(model)
    merge_lora(model)
    merged = logits(model)
    assert merged.dtype == dtype
    assert (merged.float() - unmerged.float()).abs().max() <= atol
    unmerge_lora(model)
    assert_same_tensors(model, base)


# --- bad input -----------------------------------------------------------------------------------


def assert_untouched(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    assert not any(True for _ in lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    assert_same_tensors(model, saved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "rank r"),
        (dict(r=-1), "rank r"),
        (dict(r=2.5), "rank r"),
        (dict(r=True), "rank r"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=-2.0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_bad_hyperparameters_raise_and_leave_the_model_untouched(kwargs, match):
    model = tiny_model(0)
    saved = snapshot(model)
    with pytest.raises(ValueError, match=match):
        inject_lora(model, **{"r": 8, "alpha": 16, **kwargs})
    assert_untouched(model, saved)


@pytest.mark.parametrize(
    "kwargs, where",
    [(dict(target_modules=("q", "v")), ""), (dict(target_modules="query"), ""), (dict(layers=[99]), "in layers [99]")],
)
def test_targets_that_match_nothing_list_the_real_names(kwargs, where):
    model = tiny_model(0)
    saved = snapshot(model)
    with pytest.raises(ValueError) as error:
        inject_lora(model, **{"r": 8, "alpha": 16, **kwargs})
    message = str(error.value)
    for real in ("'query'", "'key'", "'value'", "'dense'", "'out_proj'"):
        assert real in message
    assert where in message
    assert_untouched(model, saved)


def test_injecting_twice_raises_and_changes_nothing():
    model = tiny_model(0)
    inject_lora(model, ("query",), r=4, alpha=8)
    trainable = set(lora_state_dict(model))
    saved = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, ("key",), r=4, alpha=8)
    assert set(lora_state_dict(model)) == trainable
    assert len(list(lora_layers(model))) == 2
    assert_same_tensors(model, saved)


# --- adapter state -------------------------------------------------------------------------------


def adapted(seed: int = 0) -> nn.Module:
    model = tiny_model(0)
    inject_lora(model, ("query", "value"), r=4, alpha=8)
    randomize(model, seed)
    return model


def test_load_lora_state_dict_copies_values():
    source, target = adapted(seed=1), adapted(seed=2)
    state = {name: tensor.clone() for name, tensor in lora_state_dict(source).items()}
    load_lora_state_dict(target, state)
    assert torch.equal(logits(target), logits(source))
    key = next(iter(state))
    state[key].add_(1.0)  # the model holds copies, not the given tensors
    assert not torch.equal(lora_state_dict(target)[key], state[key])


KEY = "roberta.encoder.layer.1.attention.self.value.lora_B"
EXTRA = "roberta.encoder.layer.0.attention.self.key.lora_A"


@pytest.mark.parametrize("kind, key", [("missing", KEY), ("unexpected", EXTRA), ("mis-shaped", KEY)])
def test_load_lora_state_dict_rejects_bad_states_naming_the_key(kind, key):
    source, target = adapted(seed=1), adapted(seed=2)
    state = {name: tensor.clone() for name, tensor in lora_state_dict(source).items()}
    bad = {
        "missing": {k: v for k, v in state.items() if k != KEY},
        "unexpected": state | {EXTRA: state[KEY]},
        "mis-shaped": state | {KEY: torch.zeros(32, 5)},
    }[kind]
    saved = snapshot(target)
    with pytest.raises(ValueError, match=kind) as error:
        load_lora_state_dict(target, bad)
    assert key in str(error.value)
    assert_same_tensors(target, saved)  # nothing copied


def test_targets_never_reach_modules_trained_in_full():
    model = tiny_model(0)
    names = inject_lora(model, ("dense",), r=2, alpha=4, trainable_modules=("classifier",))
    assert names == [
        f"roberta.encoder.layer.{i}.{m}.dense" for i in (0, 1) for m in ("attention.output", "intermediate", "output")
    ]
    assert isinstance(model.classifier.dense, nn.Linear) and model.classifier.dense.weight.requires_grad
    with pytest.raises(ValueError, match="dense is both a LoRA target and a module trained in full"):
        inject_lora(tiny_model(0), ("dense",), r=2, alpha=4, trainable_modules=("dense",))
    with pytest.raises(ValueError, match="outside the trainable modules"):
        inject_lora(tiny_model(0), ("out_proj",), r=2, alpha=4, trainable_modules=("classifier",))


def test_an_adapter_never_holds_a_base_weight():
    model = tiny_model(0)
    inject_lora(model, ("query",), r=2, alpha=4)
    model.roberta.encoder.layer[0].attention.self.query.base.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trains inside a LoRA layer"):
        lora_state_dict(model)


def test_dotted_targets_tell_the_three_dense_layers_apart_and_read_back():
    model = tiny_model(0)
    names = inject_lora(model, ("attention.output.dense", "output.dense"), r=2, alpha=4)
    assert names == [
        f"roberta.encoder.layer.{i}.{path}" for i in (0, 1) for path in ("attention.output.dense", "output.dense")
    ]
    assert isinstance(model.roberta.encoder.layer[0].intermediate.dense, nn.Linear)
    assert isinstance(model.classifier.dense, nn.Linear)
    again = tiny_model(0)
    assert inject_lora(again, saved_lora_config(model)) == names
