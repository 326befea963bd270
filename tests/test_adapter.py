"""Adapters on disk: save_adapter / load_adapter / apply_adapter round trips, what the files
hold (only adapter tensors, safetensors not pickle, a JSON config) and the errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import RobertaForSequenceClassification

from helpers import LABELS, roberta_base_config, tiny_model, tiny_tokenizer
from lora import (
    AdapterConfig,
    LoRAConfig,
    apply_adapter,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from lora.adapter import CONFIG_NAME, WEIGHTS_NAME
from lora.config import InputError
from lora.model import saved_lora_config

TEXTS = [
    "Stocks rally as bank profit beats the market",
    "Coach praises team after cup match",
    "New chip for online research",
]
CALLER = {"base_model": "tiny-roberta", "labels": LABELS, "max_length": 64}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt")).logits


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Seeded noise in every trainable tensor, so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def trained(**inject) -> nn.Module:
    """tiny_model(0) with LoRA injected as ``inject`` says and random adapter values."""
    model = tiny_model(0)
    inject_lora(model, **inject)
    randomize(model)
    return model


def round_trip(model: nn.Module, directory) -> nn.Module:
    """Save ``model``'s adapter, load it back and apply it to a fresh same-seed base."""
    save_adapter(directory, model, **CALLER)
    state, config = load_adapter(directory)
    fresh = tiny_model(0)
    assert apply_adapter(fresh, state, config) == [name for name, _ in lora_layers(model)]
    return fresh


@pytest.mark.parametrize(
    "inject",
    [
        dict(target_modules=("query", "value"), r=4, alpha=8, dropout=0.1),
        dict(target_modules=("query", "key", "value", "dense"), r=2, alpha=3, rslora=True),
        dict(target_modules=("value",), r=4, alpha=8, layers=[1]),
        dict(target_modules=("query",), r=4, alpha=8, trainable_modules=("classifier", "LayerNorm")),
    ],
    ids=["dropout", "rslora-dense", "layers", "layernorm"],
)
def test_round_trip_gives_identical_logits(tmp_path, inject):
    model = trained(**inject)
    expected = logits(model)
    assert not torch.equal(expected, logits(tiny_model(0)))  # the adapter matters
    fresh = round_trip(model, tmp_path / "nested" / "adapter")
    assert not fresh.training and not any(m.training for m in fresh.modules())
    assert torch.equal(logits(fresh), expected)
    assert lora_state_dict(fresh).keys() == lora_state_dict(model).keys()
    assert fresh.lora.config == saved_lora_config(model)  # as given, the modules trained in full spelled out


def test_saving_a_merged_model_saves_the_same_adapter(tmp_path):
    model = trained(r=4, alpha=8)
    expected = logits(model)
    merge_lora(model)
    fresh = round_trip(model, tmp_path)
    assert torch.equal(logits(fresh), expected)


def test_config_contents(tmp_path):
    model = trained(target_modules=("value", "query"), r=4, alpha=8, dropout=0.1, layers=[0])
    save_adapter(tmp_path, model, **CALLER)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config == {
        "r": 4,
        "alpha": 8,
        "dropout": 0.1,
        "target_modules": ["value", "query"],
        "layers": [0],
        "rslora": False,
        "dora": False,
        "trainable_modules": ["classifier"],
        "head": "full",
        **CALLER,
        "clean": False,
        "quantize_base": None,
        "double_quant": False,
        "base_fingerprint": model.lora.base_fingerprint,
        "provenance": {},
    }
    assert len(config["base_fingerprint"]) == 16
    assert load_adapter(tmp_path)[1] == AdapterConfig(
        lora=LoRAConfig(
            r=4, alpha=8, dropout=0.1, target_modules=("value", "query"), layers=(0,), trainable_modules=("classifier",)
        ),
        base_model="tiny-roberta",
        labels=LABELS,
        max_length=64,
        base_fingerprint=model.lora.base_fingerprint,
    )


def test_files_hold_only_adapter_tensors_as_safetensors(tmp_path):
    model = trained(r=4, alpha=8)
    assert save_adapter(tmp_path, model) == tmp_path
    # Written atomically through temporary files: none is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert data[:1] != b"\x80"  # not a pickle (protocol 2+ starts with 0x80)
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    state = load_file(tmp_path / WEIGHTS_NAME)
    assert set(header) - {"__metadata__"} == state.keys() == lora_state_dict(model).keys()
    assert all("lora_A" in key or "lora_B" in key or key.startswith("classifier.") for key in state)
    for key, tensor in lora_state_dict(model).items():
        assert torch.equal(state[key], tensor), key


def test_saving_again_replaces_the_files(tmp_path):
    save_adapter(tmp_path, trained(r=4, alpha=8), **CALLER)
    second = trained(r=2, alpha=8)
    randomize(second, seed=5)
    save_adapter(tmp_path, second)
    state, config = load_adapter(tmp_path)
    assert config.lora.r == 2 and config.labels is None
    assert state["classifier.out_proj.bias"].equal(second.classifier.out_proj.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


@pytest.fixture(scope="module")
def roberta_base_adapter(tmp_path_factory):
    """The adapter of a real roberta-base-shaped model (random weights, nothing downloaded)
    with r=10, alpha=64 on query and value; the model is built once for this module."""
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(roberta_base_config()).eval()
    inject_lora(model, ("query", "value"), r=10, alpha=64)
    assert count_parameters(model)[0] == 962_308
    return save_adapter(tmp_path_factory.mktemp("roberta-base-adapter"), model)


def test_roberta_base_adapter_is_a_few_megabytes(roberta_base_adapter):
    size = (roberta_base_adapter / WEIGHTS_NAME).stat().st_size
    # 962,308 float32 numbers = 3,849,232 bytes plus a small header; the full model is ~500 MB.
    assert 3_849_232 < size < 5_000_000
    state = load_file(roberta_base_adapter / WEIGHTS_NAME)
    assert len(state) == 12 * 2 * 2 + 4
    assert sum(tensor.numel() for tensor in state.values()) == 962_308
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


def test_apply_adapter_to_a_different_base_names_the_misfit(tmp_path):
    save_adapter(tmp_path, trained(r=4, alpha=8))
    state, config = load_adapter(tmp_path)
    wider = tiny_model(0, hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError, match="mis-shaped: .*lora_A"):
        apply_adapter(wider, state, config)


def test_load_adapter_missing_directory_or_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    save_adapter(tmp_path, trained(r=4, alpha=8))
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        moved = (tmp_path / name).rename(tmp_path / f"{name}.away")
        with pytest.raises(FileNotFoundError, match=name):
            load_adapter(tmp_path)
        moved.rename(tmp_path / name)
    load_adapter(tmp_path)


def test_load_adapter_bad_json(tmp_path):
    save_adapter(tmp_path, trained(r=4, alpha=8))
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_adapter(tmp_path)
