"""The outside reference: the same LoRA in Hugging Face peft gives the same parameter counts,
logits, delta weights, merged weights and gradients."""

import warnings

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import RobertaForSequenceClassification

from helpers import (
    MODEL_TOLERANCE,
    assert_gradients_match_peft,
    peft_key,
    roberta_base_config,
    tiny_model,
    tiny_tokenizer,
)
from lora import count_parameters, inject_lora, lora_layers, lora_state_dict, merge_lora

TEXTS = [
    "Stocks rally as bank profit beats the market",
    "Coach praises team after cup match",
    "New chip for online research",
]
LABELS = torch.tensor([2, 1, 3])


def batch() -> dict[str, torch.Tensor]:
    return dict(tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt"))


def with_peft(model: nn.Module, targets, r, alpha, dropout=0.0, rslora=False, layers=None):
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        modules_to_save=["classifier"],
        use_rslora=rslora,
        layers_to_transform=layers,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers deprecation notices from inside peft
        return get_peft_model(model, config)


def pair(targets=("query", "value"), r=4, alpha=8, dropout=0.0, rslora=False, layers=None, **overrides):
    """Our model and a peft model on the same tiny base, holding the same random A, B and head."""
    ours = tiny_model(0, **overrides)
    inject_lora(ours, targets, r=r, alpha=alpha, dropout=dropout, rslora=rslora, layers=layers)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in lora_state_dict(ours).values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    theirs = with_peft(tiny_model(0, **overrides), targets, r, alpha, dropout, rslora, layers)
    peft_params = dict(theirs.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, tensor in lora_state_dict(ours).items():
            # Same layouts: lora_A (r, in), lora_B (out, r).
            assert peft_params[peft_key(name)].shape == tensor.shape, name
            peft_params[peft_key(name)].copy_(tensor)
            copied.add(peft_key(name))
    # Every trainable peft tensor has its counterpart here, and the other way round.
    assert copied == {name for name, p in theirs.named_parameters() if p.requires_grad}
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize(
    "targets, r, alpha, expected", [(("query", "value"), 10, 64, 962_308), (("query",), 8, 16, 741_124)]
)
def test_trainable_counts_match_peft_on_roberta_base(targets, r, alpha, expected):
    def roberta_base_shape():
        # Parameter counts need shapes only: on the meta device a 125M model costs nothing.
        with torch.device("meta"):
            return RobertaForSequenceClassification(roberta_base_config())

    ours = roberta_base_shape()
    inject_lora(ours, targets, r=r, alpha=alpha)
    theirs = with_peft(roberta_base_shape(), targets, r, alpha)
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours)[0] == peft_trainable == expected


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(targets=("query", "key", "value"), r=8, alpha=16, dropout=0.1),
        dict(r=4, alpha=8, dropout=0.1, rslora=True, layers=[1]),
    ],
    ids=["plain", "qkv-dropout", "rslora-layer1"],
)
def test_logits_match_peft(settings):
    ours, theirs = pair(**settings)
    with torch.no_grad():
        expected = theirs(**batch()).logits
        got = ours(**batch()).logits
        base = tiny_model(0)(**batch()).logits
    assert not torch.allclose(expected, base, atol=1e-2)  # the adapters matter
    torch.testing.assert_close(got, expected, **MODEL_TOLERANCE)


def test_delta_weights_match_peft():
    ours, theirs = pair(rslora=True, r=8, alpha=4)
    for name, module in lora_layers(ours):
        peft_module = theirs.base_model.model.get_submodule(name)
        assert module.scaling == peft_module.scaling["default"]
        torch.testing.assert_close(module.delta_weight(), peft_module.get_delta_weight("default"), **MODEL_TOLERANCE)


def test_merged_weights_and_logits_match_peft_merge_and_unload():
    ours, theirs = pair(targets=("query", "key", "value"))
    merge_lora(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = theirs.merge_and_unload()
    for name, module in lora_layers(ours):
        torch.testing.assert_close(module.base.weight, merged.get_submodule(name).weight, **MODEL_TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch()).logits, merged(**batch()).logits, **MODEL_TOLERANCE)


def test_gradients_match_peft():
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours, theirs = pair(targets=("query", "value"), **no_dropout)
    for model in (ours, theirs):
        model.train()
        model(**batch(), labels=LABELS).loss.backward()
    assert_gradients_match_peft(ours, theirs)


def test_training_forward_with_dropout_matches_peft_under_the_same_seed():
    """Dropout sits at the same place (on the LoRA branch input) and draws the same numbers."""
    ours, theirs = pair(targets=("query", "key", "value"), r=8, alpha=16, dropout=0.3)
    with torch.no_grad():
        evaluated = ours(**batch()).logits
        trained = []
        for model in (ours, theirs):
            model.train()
            torch.manual_seed(5)
            trained.append(model(**batch()).logits)
    assert not torch.allclose(trained[0], evaluated, atol=1e-2)  # dropout was active
    torch.testing.assert_close(trained[0], trained[1], **MODEL_TOLERANCE)
