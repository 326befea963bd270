"""The base fingerprint: an adapter records a hash of the pretrained weights it was added to,
and every loader refuses it on other weights in one line naming both bases (unless forced)."""

import dataclasses
import json

import pytest
import torch

from helpers import LABELS, producer_config, refused, tiny_model, tiny_tokenizer
from lora import apply_adapter, inject_lora, load_adapter, lora_layers, quantize_base, save_adapter
from lora.adapter import BaseMismatch
from lora.classifier import load_classifier, load_classifier_model
from lora.cli import one_line, run_command
from lora.cli.inspect_lora import main as inspect_main
from lora.cli.predict import main as predict_main
from lora.model import base_fingerprint
from lora.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    """A base of the same shape as ``tiny_model_dir`` with other weights."""
    folder = tmp_path_factory.mktemp("other-roberta")
    tiny_model(5).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def make_run(model_dir, directory) -> str:
    """An adapter of the model in ``model_dir`` whose B is random, so that another base's weights
    would change its predictions (hand-made tensors; the config is train.py's)."""
    torch.manual_seed(0)
    model = load_classifier_model(str(model_dir), LABELS)
    inject_lora(model, ("query", "value"), r=4, alpha=8.0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.3)
    save_adapter(directory, model, **producer_config(model_dir, max_length=16))
    return str(directory)


def test_the_fingerprint_is_of_the_adapted_pretrained_weights_before_pissa_and_quantization():
    fingerprints = {}
    for init in ("lora", "pissa"):
        model = tiny_model(0)
        inject_lora(model, ("query", "value"), r=4, alpha=8, init=init)
        fingerprints[init] = model.lora.base_fingerprint
    quantized = tiny_model(0)
    inject_lora(quantized, ("query", "value"), r=4, alpha=8)
    quantize_base(quantized, "nf4")
    assert len(fingerprints["lora"]) == 16
    assert fingerprints["pissa"] == quantized.lora.base_fingerprint == fingerprints["lora"]
    assert base_fingerprint(tiny_model(0), ["roberta.encoder.layer.0.attention.self.query"]) != fingerprints["lora"]

    touched = tiny_model(0)
    with torch.no_grad():
        weight = touched.roberta.encoder.layer[1].attention.self.value.weight
        weight[3, 4] = torch.nextafter(weight[3, 4], torch.tensor(2.0))  # one float32 step
        touched.roberta.encoder.layer[1].attention.self.key.weight.zero_()  # not adapted: not hashed
    names = [name for name, _ in lora_layers(quantized)]
    assert base_fingerprint(touched, names) != fingerprints["lora"]
    with torch.no_grad():
        touched.roberta.encoder.layer[1].attention.self.value.weight[3, 4] = (
            tiny_model(0).roberta.encoder.layer[1].attention.self.value.weight[3, 4]
        )
    assert base_fingerprint(touched, names) == fingerprints["lora"]


def test_apply_adapter_refuses_other_weights_unless_forced(tmp_path):
    model = tiny_model(0)
    inject_lora(model, ("query", "value"), r=4, alpha=8)
    save_adapter(tmp_path, model)
    state, config = load_adapter(tmp_path)
    assert config.base_fingerprint == model.lora.base_fingerprint
    apply_adapter(tiny_model(0), state, config)
    with pytest.raises(BaseMismatch, match=f"fingerprint {model.lora.base_fingerprint}, these have "):
        apply_adapter(tiny_model(1), state, config)
    apply_adapter(tiny_model(1), state, config, force=True)
    apply_adapter(tiny_model(1), state, dataclasses.replace(config, base_fingerprint=None))  # old


@pytest.mark.timeout(60)
def test_every_loader_refuses_another_base_in_one_line_naming_both(tiny_model_dir, other_base_dir, tmp_path, capsys):
    run = make_run(tiny_model_dir, tmp_path / "run")
    expected = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_fingerprint"]
    with refused() as caught:
        load_classifier(run, "cpu", base_model=str(other_base_dir))
    message = one_line(caught.value)
    assert message.startswith(
        f"adapter {run} was trained on base '{tiny_model_dir}' (fingerprint {expected}), "
        f"not on base '{other_base_dir}' (fingerprint "
    )
    assert "--force" in message and "\n" not in message
    load_classifier(run, "cpu", base_model=str(other_base_dir), force=True)

    for command in (
        lambda: predict_main(["--adapter", run, "--base", str(other_base_dir), "--text", "a"]),
        lambda: inspect_main(["--adapter", run, "--base", str(other_base_dir), "--plot", str(tmp_path / "plot.png")]),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as caught:
            run_command(command)
        assert caught.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    predict_main(["--adapter", run, "--base", str(other_base_dir), "--text", "a", "--force"])
    inspect_main(["--adapter", run, "--base", str(other_base_dir), "--plot", str(tmp_path / "plot.png"), "--force"])
    assert "merged vs unmerged logits" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_an_adapter_from_before_fingerprints_still_loads(tiny_model_dir, other_base_dir, tmp_path):
    run = make_run(tiny_model_dir, tmp_path / "run")
    config_path = tmp_path / "run" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["base_fingerprint"]
    config_path.write_text(json.dumps(config))
    assert load_classifier(run, "cpu", base_model=str(other_base_dir)).labels == LABELS


@pytest.mark.timeout(60)
def test_a_trained_run_records_the_fingerprint_of_its_base(tiny_model_dir, toy_data_dir, tmp_path):
    train(
        TrainConfig(
            model=str(tiny_model_dir),
            data=str(toy_data_dir),
            output_dir=str(tmp_path / "run"),
            r=2,
            alpha=4.0,
            batch_size=16,
            grad_accum=1,
            max_steps=2,
            eval_steps=2,
            max_length=16,
            quantize_base="int8",
            evaluate_test=False,
        )
    )
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    base = load_classifier_model(str(tiny_model_dir), LABELS)
    names = [f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert config["base_fingerprint"] == base_fingerprint(base, names)
    assert config["quantize_base"] == "int8"  # the float weights' hash, and the scheme
    load_classifier(tmp_path / "run", "cpu")  # its own base passes the check
