"""ONNX exports (lora/serve/onnx.py, lora-export --format onnx) of adapters that train.py wrote:
ONNX Runtime gives PyTorch's logits within float32 rounding, for LoRA, DoRA and PiSSA adapters
and an nf4 base; int8 gives the same labels on the toy task; the gate refuses what it must and
then writes nothing; predict.py and the library read an export as they read an adapter."""

import contextlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from helpers import LABELS, MODEL_TOLERANCE, TRAINED_RUNS, refused, tiny_model, tiny_tokenizer  # noqa: E402
from lora.classifier import load_classifier  # noqa: E402
from lora.cli import run_command  # noqa: E402
from lora.cli.export import main as export_main  # noqa: E402
from lora.cli.predict import main as predict_main  # noqa: E402
from lora.serve.onnx import (  # noqa: E402
    CONFIG_NAME,
    MODEL_NAME,
    PARITY_NAME,
    OnnxClassifier,
    is_onnx_export,
    load_onnx_classifier,
)

TEXTS = [
    "Team wins the cup after a late goal",
    "",
    "stocks profit shares market bank",
    "new chip for online research and space scientists",
    "war election minister troops peace",
]


@pytest.fixture(scope="module")
def exports(trained_runs, tmp_path_factory):
    """Every train.py run exported in float32 (``lora-export RUN OUT --format onnx``), and the
    LoRA run in int8 too, with and without ``--float-ffn-output``; what each export printed is in
    ``printed.json``."""
    root = tmp_path_factory.mktemp("exports")
    printed = {}
    jobs = {name: [str(run), str(root / name), "--format", "onnx"] for name, run in trained_runs.items()}
    jobs["lora-int8"] = [str(trained_runs["lora"]), str(root / "lora-int8"), "--format", "onnx", "--int8"]
    jobs["lora-int8-ffn"] = [*jobs["lora-int8"][:1], str(root / "lora-int8-ffn"), *jobs["lora-int8"][2:]]
    jobs["lora-int8-ffn"].append("--float-ffn-output")
    for name, argv in jobs.items():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            export_main(argv)
        printed[name] = out.getvalue()
    (root / "printed.json").write_text(json.dumps(printed))
    return root


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", TRAINED_RUNS)
def test_onnx_runtime_gives_the_logits_of_the_merged_pytorch_model(name, trained_runs, exports):
    folder = exports / name
    assert is_onnx_export(folder)
    assert {p.name for p in folder.iterdir()} == {
        CONFIG_NAME,
        MODEL_NAME,
        PARITY_NAME,
        "tokenizer.json",
        "tokenizer_config.json",
    }
    exported, original = load_onnx_classifier(folder), load_classifier(trained_runs[name], "cpu")
    assert isinstance(exported, OnnxClassifier) and exported.labels == original.labels == LABELS
    # Two runtimes summing the same merged weights in other orders: the tiny model's tolerance.
    np.testing.assert_allclose(exported.predict_proba(TEXTS), original.predict_proba(TEXTS), **MODEL_TOLERANCE)
    parity = json.loads((folder / PARITY_NAME).read_text())
    assert parity["label_agreement"] == 1.0 and parity["max_abs_logit_difference"] <= parity["logit_tolerance"]
    assert parity["int8"] is False and parity["file_sizes"][MODEL_NAME] == (folder / MODEL_NAME).stat().st_size


@pytest.mark.timeout(120)
def test_int8_gives_the_float32_labels_on_the_toy_task(exports, noisy_data_dir):
    texts = pd.read_csv(noisy_data_dir / "test.csv")["text"].tolist()
    float32, int8 = load_onnx_classifier(exports / "lora"), load_onnx_classifier(exports / "lora-int8")
    assert int8.int8 and not float32.int8
    assert (int8.predict_proba(texts).argmax(1) == float32.predict_proba(texts).argmax(1)).all()
    assert (exports / "lora-int8" / MODEL_NAME).stat().st_size < (exports / "lora" / MODEL_NAME).stat().st_size


@pytest.mark.timeout(300)
def test_the_gate_refuses_an_int8_model_that_loses_accuracy_and_writes_nothing(
    trained_runs, noisy_data_dir, tmp_path, capsys
):
    out = tmp_path / "int8"
    argv = [
        str(trained_runs["lora"]),
        str(out),
        "--format",
        "onnx",
        "--int8",
        "--check-data",
        str(noisy_data_dir / "test.csv"),
        "--max-accuracy-drop",
        "-1",
    ]  # even no loss is too much
    with pytest.raises(SystemExit) as caught:
        run_command(lambda: export_main(argv))
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1, err
    assert (
        "changes by +0.00 points" in err and "a loss of more than --max-accuracy-drop -1; not written (--force" in err
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []
    export_main([*argv, "--force"])  # written anyway, with its measurements
    parity = json.loads((out / PARITY_NAME).read_text())
    assert parity["check_rows"] == 120 and parity["accuracy_change_points"] is not None
    printed = capsys.readouterr().out
    assert "accuracy on 120 rows" in printed and "largest |logit difference|" in printed


def test_float_ffn_output_keeps_exactly_the_feed_forward_output_projections_in_float32(exports, capsys):
    import onnx

    def matmul_weights(name):
        """``(float MatMul weight shapes, int8 MatMulInteger count)`` of the export ``name``."""
        graph = onnx.load(str(exports / name / MODEL_NAME)).graph
        shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
        floats = sorted(
            shapes[node.input[1]] for node in graph.node if node.op_type == "MatMul" and node.input[1] in shapes
        )
        return floats, sum(node.op_type == "MatMulInteger" for node in graph.node)

    config = tiny_model().config  # what trained_runs trained: 32 wide, FFN 64, 2 layers
    ffn_output = (config.intermediate_size, config.hidden_size)
    all_float, _ = matmul_weights("lora")
    int8_floats, int8_quantized = matmul_weights("lora-int8")
    kept_floats, kept_quantized = matmul_weights("lora-int8-ffn")
    assert all_float.count(ffn_output) == config.num_hidden_layers and int8_floats == []
    assert kept_floats == [ffn_output] * config.num_hidden_layers
    assert kept_quantized == int8_quantized - config.num_hidden_layers
    assert json.loads((exports / "lora-int8-ffn" / CONFIG_NAME).read_text())["float_ffn_output"] is True
    assert "parity (int8, FFN output float32" in json.loads((exports / "printed.json").read_text())["lora-int8-ffn"]
    with pytest.raises(SystemExit) as caught:
        run_command(lambda: export_main([str(exports / "lora"), str(exports / "x"), "--format", "onnx",
                                         "--float-ffn-output"]))  # fmt: skip
    assert caught.value.code == 2 and "--float-ffn-output keeps part of an --int8 model" in capsys.readouterr().err
    assert not (exports / "x").exists()


@pytest.mark.timeout(120)
def test_an_export_says_what_it_measured_and_int8_without_check_data_says_accuracy_was_not_checked(exports):
    printed = json.loads((exports / "printed.json").read_text())
    assert all("largest |logit difference|" in out and "files: model.onnx" in out for out in printed.values())
    assert "accuracy not checked: give --check-data FILE" in printed["lora-int8"]
    assert not any("accuracy not checked" in out for name, out in printed.items() if not name.startswith("lora-int8"))
    assert "note: the nf4 base is dequantized, then the adapter merged into it" in printed["nf4"]


@pytest.mark.timeout(120)
def test_predict_py_reads_an_export_as_it_reads_the_adapter(exports, trained_runs, noisy_data_dir, tmp_path, capsys):
    test_csv = str(noisy_data_dir / "test.csv")
    for folder, output in ((trained_runs["lora"], "adapter.csv"), (exports / "lora", "onnx.csv")):
        predict_main(["--adapter", str(folder), "--input", test_csv, "--output", str(tmp_path / output), "--probs"])
    printed = capsys.readouterr().out
    accuracies = [line for line in printed.splitlines() if line.startswith("accuracy")]
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1]
    adapter, onnx = (pd.read_csv(tmp_path / name) for name in ("adapter.csv", "onnx.csv"))
    assert adapter["Label"].tolist() == onnx["Label"].tolist()  # 100% the same labels
    np.testing.assert_allclose(onnx[LABELS].to_numpy(), adapter[LABELS].to_numpy(), **MODEL_TOLERANCE)
    predict_main(["--adapter", str(exports / "lora"), "--text", TEXTS[0]])
    assert capsys.readouterr().out.count("\t") == 2


@pytest.mark.timeout(120)
def test_an_export_of_another_base_or_format_and_a_folder_of_neither_kind_are_refused(exports, tmp_path, capsys):
    other = tmp_path / "other-base"
    tiny_model(5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with refused(r"was made from base .* not from base .*; --force loads it anyway"):
        load_onnx_classifier(exports / "lora", base_model=str(other))
    load_onnx_classifier(exports / "lora", base_model=str(other), force=True)

    newer = shutil.copytree(exports / "lora", tmp_path / "newer")
    config = json.loads((newer / CONFIG_NAME).read_text())
    (newer / CONFIG_NAME).write_text(json.dumps({**config, "format": 99}))
    with refused("an ONNX export of format 99; this version reads format 1"):
        load_onnx_classifier(newer)

    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "model.onnx").write_bytes(b"")
    capsys.readouterr()
    for argv in (["--adapter", str(tmp_path / "neither"), "--text", "goal"],):
        with pytest.raises(SystemExit) as caught:
            run_command(lambda argv=argv: predict_main(argv))
        err = capsys.readouterr().err
        assert caught.value.code == 2 and err.count("\n") == 1 and "has no adapter.safetensors" in err, err
