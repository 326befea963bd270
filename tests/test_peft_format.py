"""Our adapters in Hugging Face peft's format and back: an exported adapter gives in peft the
logits predict.py gives; a peft-trained adapter gives in our loader the logits peft gives; what
cannot be mapped is refused in one line."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from helpers import LABELS, producer_config, refused, tiny_model, tiny_tokenizer
from lora import AdapterConfig, LoRAConfig, inject_lora, lora_layers, save_adapter
from lora.classifier import load_classifier, load_classifier_model
from lora.cli import run_command
from lora.cli.export import main as export_main
from lora.cli.inspect_lora import main as inspect_main
from lora.cli.predict import main as predict_main
from lora.peft_format import NotMappable, from_peft
from lora.train.loop import TrainConfig, train

TEXTS = [
    "Stocks rally as bank profit beats the market",
    "Coach praises team after cup match",
    "New chip for online research",
    "",
]
# Ours runs merged (as predict.py does), peft unmerged: W x + s B (A x) and (W + s B A) x differ
# in the last float32 bits of sums over 32 to 64 terms; 1e-5 is a hundred times that.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def token_batch() -> dict[str, torch.Tensor]:
    return dict(tiny_tokenizer()(TEXTS, padding=True, return_tensors="pt"))


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers / peft notices
        return function(*args, **kwargs)


def our_logits(adapter_dir, **options) -> torch.Tensor:
    model = load_classifier(adapter_dir, "cpu", **options).model
    with torch.no_grad():
        return model(**token_batch()).logits


def make_run(model_dir, directory, targets=("query", "value"), layers=None, seed=0, **variant):
    """A run folder whose adapter is random (B, DoRA's magnitude, the head), so that it matters in
    every layer (hand-made tensors; the config is train.py's, ``producer_config``)."""
    torch.manual_seed(seed)
    model = load_classifier_model(str(model_dir), LABELS)
    inject_lora(model, targets, r=4, alpha=8.0, layers=layers, **variant)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.3)
            if hasattr(layer, "lora_magnitude"):
                layer.lora_magnitude.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude))
        for parameter in model.classifier.parameters():
            parameter.normal_(std=0.5)
    return save_adapter(directory, model, **producer_config(model_dir))


def peft_classifier(exported) -> torch.nn.Module:
    """The README's recipe: the base with the exported label names, then PeftModel."""
    base_name = PeftConfig.from_pretrained(str(exported)).base_model_name_or_path
    base = quiet(
        AutoModelForSequenceClassification.from_pretrained, base_name, config=AutoConfig.from_pretrained(str(exported))
    )
    return quiet(PeftModel.from_pretrained, base, str(exported)).eval()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "targets, layers, variant",
    [
        (("query", "value"), None, {}),
        (("query", "value"), [1], {"rslora": True}),
        (("query", "key", "value"), None, {"dora": True}),
        (("query", "value"), None, {"init": "pissa"}),
        (("dense",), None, {}),  # the head has a `dense` too: exported as full module names
    ],
    ids=["lora", "rslora-layer1", "dora", "pissa", "dense"],
)
def test_an_exported_adapter_gives_in_peft_the_logits_of_predict(
    targets, layers, variant, tiny_model_dir, tmp_path, capsys
):
    run = make_run(tiny_model_dir, tmp_path / "run", targets, layers, **variant)
    export_main([str(run), str(tmp_path / "peft")])
    assert "wrote a peft LoRA adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    pissa = variant.get("init") == "pissa"
    assert (config["peft_type"], config["task_type"], config["modules_to_save"]) == ("LORA", "SEQ_CLS", ["classifier"])
    assert (config["r"], config["lora_alpha"]) == ((8, 16.0) if pissa else (4, 8.0))  # PiSSA: rank-2r LoRA
    assert (config["use_rslora"], config["use_dora"]) == (variant.get("rslora", False), variant.get("dora", False))
    assert config["layers_to_transform"] == layers
    if targets == ("dense",):
        assert config["target_modules"] == [
            f"roberta.encoder.layer.{i}.{path}"
            for i in (0, 1)
            for path in ("attention.output.dense", "intermediate.dense", "output.dense")
        ]
    else:
        assert config["target_modules"] == list(targets)  # as the adapter was made

    theirs = peft_classifier(tmp_path / "peft")
    assert theirs.config.id2label == dict(enumerate(LABELS))
    trained = {name for name, p in theirs.named_parameters() if p.requires_grad}
    assert trained == set()  # inference mode: loaded, not training
    with torch.no_grad():
        expected = theirs(**token_batch()).logits
        base = quiet(AutoModelForSequenceClassification.from_pretrained, str(tiny_model_dir))(**token_batch()).logits
    assert not torch.allclose(expected, base, atol=1e-2)  # the adapter was applied
    torch.testing.assert_close(our_logits(run), expected, **TOLERANCE)
    # And back: the exported folder reads as the adapter it came from, fingerprint included.
    torch.testing.assert_close(our_logits(tmp_path / "peft"), expected, **TOLERANCE)


@pytest.mark.timeout(120)
def test_a_trained_run_exports_and_peft_gives_its_logits(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(
        TrainConfig(
            model=str(tiny_model_dir),
            data=str(toy_data_dir),
            output_dir=str(run),
            r=4,
            alpha=8.0,
            rslora=True,
            target_modules=("query", "key", "value"),
            lr=5e-3,
            batch_size=16,
            grad_accum=1,
            max_steps=6,
            eval_steps=3,
            max_length=32,
            evaluate_test=False,
        )
    )
    export_main([str(run), str(tmp_path / "peft")])
    with torch.no_grad():
        expected = peft_classifier(tmp_path / "peft")(**token_batch()).logits
    torch.testing.assert_close(our_logits(run), expected, **TOLERANCE)
    extras = json.loads((tmp_path / "peft" / "lora_extras.json").read_text())
    assert extras["labels"] == LABELS and extras["max_length"] == 32 and len(extras["base_fingerprint"]) == 16

    other = tmp_path / "other-base"  # the same shape, other weights: refused with the exported fingerprint
    tiny_model(5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with refused(f"\\(fingerprint {extras['base_fingerprint']}\\), not on base '{other}'"):
        load_classifier(tmp_path / "peft", "cpu", base_model=str(other))


def peft_trained_folder(model_dir, directory, dora=False) -> tuple[torch.nn.Module, str]:
    """An adapter made with peft itself (random B, magnitude and head), saved with save_pretrained."""
    torch.manual_seed(3)
    base = quiet(AutoModelForSequenceClassification.from_pretrained, str(model_dir))
    model = quiet(
        get_peft_model,
        base,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=4,
            lora_alpha=16,
            target_modules=["query", "key"],
            use_dora=dora,
            layers_to_transform=[0, 1],
        ),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ("lora_B" in name or "classifier" in name):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(str(directory))
    return model.eval(), str(directory)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_peft_trained_adapter_gives_in_our_loader_the_logits_of_peft(dora, tiny_model_dir, tmp_path, capsys):
    theirs, folder = peft_trained_folder(tiny_model_dir, tmp_path / "peft", dora)
    with torch.no_grad():
        expected = theirs(**token_batch()).logits
    torch.testing.assert_close(our_logits(folder, merge=False), expected, **TOLERANCE)
    torch.testing.assert_close(our_logits(folder), expected, **TOLERANCE)

    inspect_main(["--adapter", folder, "--plot", str(tmp_path / "updates.png")])
    table = capsys.readouterr().out
    for layer in (0, 1):
        for module in ("query", "key"):
            assert f"roberta.encoder.layer.{layer}.attention.self.{module} " in table
    assert "merged vs unmerged logits on 4 texts" in table and (tmp_path / "updates.png").is_file()

    predict_main(["--adapter", folder, "--text", TEXTS[0]])
    index, name, confidence = capsys.readouterr().out.split()
    assert int(index) == expected[0].argmax() and name == LABELS[int(index)]  # the base's id2label
    assert float(confidence) == pytest.approx(expected[0].softmax(-1).max().item(), abs=1e-4)


GOOD = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "modules_to_save": ["classifier"]}
PREFIX = "base_model.model.roberta.encoder.layer.0.attention.self.query."
TENSORS = {
    PREFIX + "lora_A.weight": torch.zeros(2, 8),
    PREFIX + "lora_B.weight": torch.zeros(8, 2),
    "base_model.model.classifier.out_proj.weight": torch.zeros(4, 8),
}


def test_a_good_peft_config_maps_to_our_settings():
    state, config = from_peft(TENSORS, GOOD)
    assert set(state) == {
        "roberta.encoder.layer.0.attention.self.query.lora_A",
        "roberta.encoder.layer.0.attention.self.query.lora_B",
        "classifier.out_proj.weight",
    }
    assert config == AdapterConfig(
        lora=LoRAConfig(
            r=2, alpha=4, target_modules=("attention.self.query",), layers=(0,), trainable_modules=("classifier",)
        )
    )


@pytest.mark.parametrize(
    "change, tensors, message",
    [
        ({"peft_type": "IA3"}, TENSORS, "peft_type IA3: only LoRA adapters"),
        ({"task_type": "CAUSAL_LM"}, TENSORS, "task_type CAUSAL_LM: only sequence-classification"),
        ({"rank_pattern": {"query": 8}}, TENSORS, "unsupported peft option(s): rank_pattern={'query': 8}"),
        ({"bias": "all"}, TENSORS, "unsupported peft option(s): bias='all'"),
        ({"init_lora_weights": "pissa"}, TENSORS, "init_lora_weights='pissa' (saved against the changed base"),
        ({"modules_to_save": None}, TENSORS, "neither LoRA A/B/magnitude nor in modules_to_save"),
        ({}, {k: v for k, v in TENSORS.items() if "classifier" not in k}, "saves no classification head"),
        (
            {},
            {
                **TENSORS,
                PREFIX.replace("layer.0.", "layer.1.").replace("query", "value") + "lora_A.weight": torch.zeros(2, 8),
            },
            "adapts different modules in different layers",
        ),
    ],
    ids=["ia3", "causal-lm", "rank-pattern", "bias", "pissa-unconverted", "no-modules-to-save", "no-head", "no-grid"],
)
def test_what_cannot_be_mapped_is_refused_saying_what(change, tensors, message):
    with pytest.raises(NotMappable) as refused:
        from_peft(tensors, {**GOOD, **change})
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.timeout(60)
def test_predict_refuses_an_unmappable_peft_folder_in_one_line(tiny_model_dir, tmp_path, capsys):
    _, folder = peft_trained_folder(tiny_model_dir, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        run_command(lambda: predict_main(["--adapter", folder, "--text", "a"]))
    assert caught.value.code == 2
    assert (
        capsys.readouterr().err == f"error: {folder}: peft_type LOHA: only LoRA adapters (peft_type LORA) can be read\n"
    )
