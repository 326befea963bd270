"""Five encoder families on tiny random checkpoints saved as the hub holds them (RoBERTa, BERT as
MiniLM is, DistilBERT, DeBERTa-v3, ModernBERT): BERT's target names mean each family's own modules,
ModernBERT's fused Wqkv is adapted slice by slice, the modules the checkpoint lacks train and are
saved, and every family trains, saves, reloads, merges and exports to peft with the same logits."""

import json
import math
import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from helpers import (
    FAMILY_NAMES,
    LABELS,
    MODEL_TOLERANCE,
    assert_same_value,
    producer_config,
    refused,
    tiny_tokenizer,
)
from lora import LoRAConfig, LoRALinear, count_parameters, inject_lora, lora_layers, merge_lora, save_adapter
from lora.classifier import load_classifier, load_classifier_model
from lora.cli.export import main as export_main
from lora.cli.predict import main as predict_main
from lora.cli.train import main as train_main
from lora.model import parameter_table
from lora.serve.adapters import read_served_adapter
from lora.train import TrainConfig
from lora.variants import FusedQKVLoRALinear, stack_slices

TEXTS = [
    "Stocks rally as bank profit beats the market",
    "Coach praises team after cup match",
    "New chip for online research",
    "",
]
# What each family's classifier lacks in its checkpoint (the loading report), the head trained in
# full by default, and what BERT's names "query" and "value" adapt in layer 0.
FAMILIES = {
    "roberta": (
        {"classifier.dense", "classifier.out_proj"},
        ("classifier",),
        ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"],
    ),
    "bert": (  # MiniLM's checkpoint holds BERT's pooler: pretrained, and part of the head
        {"classifier"},
        ("bert.pooler", "classifier"),
        ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"],
    ),
    "distilbert": (
        {"pre_classifier", "classifier"},
        ("pre_classifier", "classifier"),
        ["distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.0.attention.v_lin"],
    ),
    "deberta-v2": (
        {"pooler.dense", "classifier"},
        ("pooler", "classifier"),
        ["deberta.encoder.layer.0.attention.self.query_proj", "deberta.encoder.layer.0.attention.self.value_proj"],
    ),
    "modernbert": ({"classifier"}, ("head", "classifier"), ["model.layers.0.attn.Wqkv"]),
}
# LoRA r=2 on query and value in 2 layers of width 32: 2 * 2 * 2 * (32 + 32), for ModernBERT's
# slices of Wqkv too; the head: a 32x32 hidden layer (ModernBERT: no bias, a 32-wide norm) and 4x32 + 4.
QUERY_VALUE_R2 = 512
HEAD = 32 * 32 + 32 + 32 * 4 + 4


def token_batch() -> dict[str, torch.Tensor]:
    encoded = tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}  # DistilBERT: no types


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**token_batch()).logits


def train_a_few_steps(model: nn.Module, steps: int = 3) -> None:
    """AdamW at a high learning rate on the four texts: every trainable tensor moves."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        model(**token_batch(), labels=torch.tensor([2, 1, 3, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def peft_logits(base_dir, peft_dir) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and peft's notices
        base = AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), config=AutoConfig.from_pretrained(str(peft_dir))
        )
        return logits(PeftModel.from_pretrained(base, str(peft_dir)).eval())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_family_trains_saves_reloads_merges_and_exports_with_the_same_logits(family, family_dirs, tmp_path):
    fresh, head, adapted = FAMILIES[family]
    model = load_classifier_model(str(family_dirs[family]), LABELS)
    assert {name.rsplit(".", 1)[0] for name in model.fresh_parameters} == fresh
    names = inject_lora(model, LoRAConfig(r=2, alpha=4.0, target_modules=("query", "value")))
    assert names[: len(adapted)] == adapted and len(names) == 2 * len(adapted)
    assert model.lora.trainable_modules == head
    assert count_parameters(model)[0] == QUERY_VALUE_R2 + HEAD
    train_a_few_steps(model)
    expected = logits(model)

    run = save_adapter(tmp_path / "run", model, **producer_config(family_dirs[family]))
    loaded = load_classifier(run, "cpu", merge=False).model
    # The very same computation on the very same weights: bit for bit. A head module that came
    # back random (not saved, or not trained) changes every logit.
    assert torch.equal(logits(loaded), expected)
    trained = dict(model.named_parameters())
    for name in model.fresh_parameters:
        assert torch.equal(loaded.get_parameter(name), trained[name]), name
    merge_lora(loaded)
    torch.testing.assert_close(logits(loaded), expected, **MODEL_TOLERANCE)

    export_main([str(run), str(tmp_path / "peft")])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(head)
    if family == "modernbert":  # one LoRA of rank 2r on Wqkv, the same scaling: alpha doubled
        assert (config["r"], config["lora_alpha"]) == (4, 8.0)
        assert config["target_modules"] == ["model.layers.0.attn.Wqkv", "model.layers.1.attn.Wqkv"]
    torch.testing.assert_close(peft_logits(family_dirs[family], tmp_path / "peft"), expected, **MODEL_TOLERANCE)
    # and back: the peft folder reads as the same adapter (ModernBERT's as the plain rank-2r LoRA on Wqkv)
    from_peft = load_classifier(tmp_path / "peft", "cpu", merge=False).model
    torch.testing.assert_close(logits(from_peft), expected, **MODEL_TOLERANCE)


# ---------------------------------------------------------------- ModernBERT's fused Wqkv


def trained_looking(layer: FusedQKVLoRALinear, seed: int = 0) -> FusedQKVLoRALinear:
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed)))
    return layer.eval()


def test_lora_on_the_query_and_value_slices_leaves_the_keys_bit_for_bit():
    torch.manual_seed(0)
    base, x = nn.Linear(32, 96), torch.randn(5, 7, 32)
    layer = trained_looking(FusedQKVLoRALinear(base, r=4, alpha=8.0, slices=("value", "query")))
    assert layer.slices == ("query", "value")
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 2 * 4 * (32 + 32)  # k r (in + h)
    output = layer(x)
    keys = slice(32, 64)
    assert torch.equal(output[..., keys], base(x)[..., keys])  # rows 32..64 of Wqkv: the keys, untouched
    # Each adapted slice is LoRALinear on a Linear holding that slice's rows, with A_i and B_i.
    for i, rows in enumerate((slice(0, 32), slice(64, 96))):
        part = nn.Linear(32, 32)
        with torch.no_grad():
            part.weight.copy_(base.weight[rows])
            part.bias.copy_(base.bias[rows])
        reference = LoRALinear(part, r=4, alpha=8.0).eval()
        with torch.no_grad():
            reference.lora_A.copy_(layer.lora_A[4 * i : 4 * (i + 1)])
            reference.lora_B.copy_(layer.lora_B[i])
        assert_same_value(output[..., rows], reference(x), terms=32 + 8)
    # B' of the rank-2r LoRA on the whole Wqkv: B_q and B_v in their blocks, zero rows for the keys.
    stacked = stack_slices(layer.lora_B.detach(), layer.slices)
    assert stacked.shape == (96, 8) and not stacked[keys].any()
    assert torch.equal(stacked[:32, :4], layer.lora_B[0]) and not stacked[:32, 4:].any()
    assert torch.equal(stacked[64:, 4:], layer.lora_B[1]) and not stacked[64:, :4].any()

    pretrained = base.weight.detach().clone()
    layer.merge()
    assert torch.equal(base.weight[keys], pretrained[keys])  # merging adds exact zeros to the key rows
    assert_same_value(layer(x), output, terms=32 + 8)
    layer.unmerge()
    assert torch.equal(base.weight, pretrained)


def test_in_a_trained_modernbert_every_wqkv_leaves_the_keys_as_the_base_computes_them(family_dirs):
    model = load_classifier_model(str(family_dirs["modernbert"]), LABELS)
    inject_lora(model, ("query", "value"), r=2, alpha=4.0, dropout=0.1)
    train_a_few_steps(model)
    x = torch.randn(3, 5, 32)
    for _, layer in lora_layers(model):
        assert isinstance(layer, FusedQKVLoRALinear) and layer.lora_B.abs().sum() > 0
        with torch.no_grad():
            assert torch.equal(layer(x)[..., 32:64], layer.base(x)[..., 32:64])
            assert not torch.allclose(layer(x)[..., :32], layer.base(x)[..., :32])


@pytest.mark.timeout(60)
def test_slices_beside_other_targets_export_with_peft_rank_and_alpha_patterns(family_dirs, tmp_path):
    """rsLoRA: scaling alpha / sqrt(r), so the rank-2r form needs alpha * sqrt(2); attn.Wo keeps r."""
    folder = family_dirs["modernbert"]
    model = load_classifier_model(str(folder), LABELS)
    inject_lora(model, ("query", "value", "attention.output.dense"), r=2, alpha=4.0, rslora=True)
    train_a_few_steps(model)
    run = save_adapter(tmp_path / "run", model, **producer_config(folder))
    export_main([str(run), str(tmp_path / "peft")])
    with refused("holds LoRA on slices of a fused q/k/v Linear, which is not served with other adapters yet"):
        read_served_adapter("modernbert", run, str(folder))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    wqkv = ["model.layers.0.attn.Wqkv", "model.layers.1.attn.Wqkv"]
    assert (config["r"], config["lora_alpha"]) == (2, 4.0)
    assert config["rank_pattern"] == dict.fromkeys(wqkv, 4)
    assert config["alpha_pattern"] == dict.fromkeys(wqkv, 4.0 * math.sqrt(2))
    torch.testing.assert_close(peft_logits(folder, tmp_path / "peft"), logits(model), **MODEL_TOLERANCE)


@pytest.mark.parametrize("variant, message", [({"dora": True}, "DoRA"), ({"init": "pissa"}, "PiSSA")])
def test_dora_or_pissa_on_slices_is_refused_in_one_line(variant, message, family_dirs):
    model = load_classifier_model(str(family_dirs["modernbert"]), LABELS)
    with pytest.raises(ValueError) as refusal:
        inject_lora(model, ("query", "value"), r=2, alpha=4.0, **variant)
    text = str(refusal.value)
    assert text.startswith(f"{message} on slices of the fused attn.Wqkv is not supported") and "\n" not in text
    assert "adapt the whole layer (target_modules Wqkv)" in text
    inject_lora(load_classifier_model(str(family_dirs["modernbert"]), LABELS), ("Wqkv",), r=2, alpha=4.0, **variant)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "family, own, linear_names",
    [
        ("deberta-v2", ("query_proj", "value_proj"), ["classifier", "dense", "key_proj", "query_proj", "value_proj"]),
        (
            "distilbert",
            ("q_lin", "v_lin"),
            ["classifier", "k_lin", "lin1", "lin2", "out_lin", "pre_classifier", "q_lin", "v_lin"],
        ),
        ("modernbert", ("attn.Wqkv",), ["Wi", "Wo", "Wqkv", "classifier", "dense"]),
    ],
)
def test_a_familys_own_names_still_work_and_a_wrong_one_lists_the_real_ones(family, own, linear_names, family_dirs):
    mine = load_classifier_model(str(family_dirs[family]), LABELS)
    names = inject_lora(mine, own, r=2, alpha=4.0)
    layers = {type(layer) for _, layer in lora_layers(mine)}
    assert layers == {LoRALinear}  # Wqkv named whole: one plain LoRA on all of it
    if family != "modernbert":
        generic = load_classifier_model(str(family_dirs[family]), LABELS)
        assert inject_lora(generic, ("query", "value"), r=2, alpha=4.0) == names
    with pytest.raises(ValueError) as refusal:
        inject_lora(load_classifier_model(str(family_dirs[family]), LABELS), ("q",), r=2, alpha=4.0)
    assert str(refusal.value).endswith(f"this model's Linear modules are named {linear_names}")


def test_bert_names_for_attention_output_and_ffn_mean_each_familys_own(family_dirs):
    targets = ("attention.output.dense", "intermediate.dense", "output.dense")
    own = {
        "roberta": ["attention.output.dense", "intermediate.dense", "output.dense"],
        "bert": ["attention.output.dense", "intermediate.dense", "output.dense"],
        "distilbert": ["attention.out_lin", "ffn.lin1", "ffn.lin2"],
        "deberta-v2": ["attention.output.dense", "intermediate.dense", "output.dense"],
        "modernbert": ["attn.Wo", "mlp.Wi", "mlp.Wo"],
    }
    for family in FAMILY_NAMES:
        names = inject_lora(load_classifier_model(str(family_dirs[family]), LABELS), targets, r=2, alpha=4.0)
        assert [name.split(".0.", 1)[1] for name in names if ".0." in name] == own[family], family


# ---------------------------------------------------------------- the head


def test_the_head_choices_on_deberta_whose_pooler_the_checkpoint_lacks(family_dirs, tmp_path):
    folder = family_dirs["deberta-v2"]
    with refused("--head linear needs the head's hidden layer pooler.dense at the identity"):
        inject_lora(load_classifier_model(str(folder), LABELS), ("query", "value"), r=2, alpha=4.0, head="linear")
    with refused(
        r"pooler.dense.bias, pooler.dense.weight are not in the checkpoint .* none of the --trainable-modules"
    ):
        inject_lora(
            load_classifier_model(str(folder), LABELS), ("query",), r=2, alpha=4.0, trainable_modules=["classifier"]
        )

    model = load_classifier_model(str(folder), LABELS)
    names = inject_lora(model, ("query", "value"), r=2, alpha=4.0, head="lora")
    assert names[-1] == "pooler.dense" and model.lora.trainable_modules == ("classifier",)
    assert torch.equal(model.pooler.dense.base.weight, torch.eye(32)) and not model.pooler.dense.base.bias.any()
    assert count_parameters(model)[0] == QUERY_VALUE_R2 + 2 * (32 + 32) + 32 * 4 + 4
    table = parameter_table(model).splitlines()
    assert table[-2].split()[:5] == ["head", "(outside", "the", "encoder", "layers)"] and "260" in table[-2]
    train_a_few_steps(model)
    run = save_adapter(tmp_path / "run", model, **producer_config(folder))
    assert json.loads((run / "adapter_config.json").read_text())["head"] == "lora"
    assert torch.equal(logits(load_classifier(run, "cpu", merge=False).model), logits(model))
    # The identity is this package's: peft's base, and the base several adapters are served on, lack it.
    with refused("keeps the head's hidden layer frozen"):
        export_main([str(run), str(tmp_path / "peft")])
    with refused("keeps the head's hidden layer frozen \\(head lora\\), which the served base does not rebuild"):
        read_served_adapter("deberta", run, str(folder))


def test_a_linear_head_on_roberta_is_its_output_layer_on_tanh_of_the_pooled_token(family_dirs, tmp_path):
    folder = family_dirs["roberta"]
    model = load_classifier_model(str(folder), LABELS)
    inject_lora(model, ("query", "value"), r=2, alpha=4.0, head="linear")
    assert model.lora.trainable_modules == ("classifier.out_proj",)
    assert count_parameters(model)[0] == QUERY_VALUE_R2 + 32 * 4 + 4
    hidden = torch.randn(2, 3, 32)
    with torch.no_grad():
        assert_same_value(model.classifier(hidden), model.classifier.out_proj(torch.tanh(hidden[:, 0])))
    train_a_few_steps(model)
    run = save_adapter(tmp_path / "run", model, **producer_config(folder))
    assert torch.equal(logits(load_classifier(run, "cpu", merge=False).model), logits(model))


def test_a_head_that_is_none_of_the_three_is_refused_naming_the_flag():
    with refused(r"--head must be one of \['full', 'lora', 'linear'\], got 'tiny'"):
        TrainConfig(head="tiny").check()


# ---------------------------------------------------------------- the command lines


@pytest.mark.timeout(90)
@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_train_py_on_a_tiny_folder_trains_predicts_and_exports(family, family_dirs, toy_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train_main(
        ["--model", str(family_dirs[family]), "--data", str(toy_data_dir), "--output-dir", str(run)]
        + ["--r", "4", "--alpha", "8", "--max-steps", "4", "--eval-steps", "2", "--batch-size", "16"]
        + ["--grad-accum", "1", "--max-length", "32", "--lr", "5e-3"]
    )
    out = capsys.readouterr().out
    assert "trained in full: " + ", ".join(FAMILIES[family][1]) in out and "test: accuracy" in out
    predict_main(["--adapter", str(run), "--text", TEXTS[0]])
    index, name, _ = capsys.readouterr().out.split()
    assert name == LABELS[int(index)]
    export_main([str(run), str(tmp_path / "peft")])
    assert "wrote a peft LoRA adapter" in capsys.readouterr().out
