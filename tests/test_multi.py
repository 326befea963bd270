"""Many adapters on one base (lora/serve/multi.py, lora/serve/adapters.py): a mixed batch gives every
row what its adapter gives loaded alone and merged, for mixed ranks, targets, variants and label
counts; rows without an adapter get the base; bad adapters are refused in one line."""

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import LABELS, random_adapter, refused, tiny_model
from lora import inject_lora, lora_layers, lora_state_dict
from lora.classifier import load_classifier
from lora.cli import run_command
from lora.cli.predict import main
from lora.serve.adapters import adapter_folders, load_adapters
from lora.serve.multi import AdapterWeights, MultiAdapterModel, MultiLoRALinear

# A row of a mixed batch adds s * (x A^T) B^T to x W^T; the reference folds s * B A into W
# first (merged). Both are float32 sums in another order: they agree to ~1e-6 in probability.
PARITY_TOLERANCE = dict(rtol=0, atol=1e-5)
TEXTS = [
    "Team wins the cup after a late goal",
    "",
    "Stocks rally as bank profit beats forecasts",
    "<b>Scientists</b> unveil a new chip &lt;online&gt;",
    " ".join(["war election minister"] * 40),
    "match",
    "software internet research",
    "the market said shares fell today",
]
# name: labels, rank, targets, variant; together: ranks 2..8, four target sets, 2/3/4/5 labels.
# "four" is train.py's DoRA run (cleaned text, max length 12, LayerNorms trained in full too); the
# others are hand-made: train.py writes AG News' four labels only.
ADAPTERS = {
    "two": dict(labels=["no", "yes"], r=2, targets=("query", "value")),
    "four": dict(labels=LABELS),
    "five": dict(
        labels=["a", "b", "c", "d", "e"], r=8, targets=("query", "key", "value", "intermediate.dense"), dora=True
    ),
    "pissa": dict(labels=["p", "q", "r"], r=3, targets=("value", "attention.output.dense"), init="pissa", rslora=True),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, trained_runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: shutil.copytree(trained_runs["dora"], root / name)
        if name == "four"
        else random_adapter(tiny_model_dir, root / name, seed=seed, **settings)
        for seed, (name, settings) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def alone(adapter_dirs):
    """Each adapter loaded by itself and merged, as predict.py would."""
    return {name: load_classifier(directory, device="cpu") for name, directory in adapter_dirs.items()}


def expected(alone, texts, names) -> list[np.ndarray]:
    return [alone[name].predict_proba([text])[0] for text, name in zip(texts, names)]


@pytest.mark.timeout(120)
def test_a_mixed_batch_gives_each_row_its_adapter_alone_and_merged(adapter_dirs, alone):
    adapters = load_adapters(adapter_dirs, device="cpu")
    names = [list(ADAPTERS)[i % len(ADAPTERS)] for i in range(3 * len(TEXTS))]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    rows = adapters.predict_proba(texts, names, batch_size=16)  # 24 rows: two mixed batches
    for row, want, name in zip(rows, expected(alone, texts, names), names):
        assert row.shape == (len(ADAPTERS[name]["labels"]),)
        torch.testing.assert_close(torch.from_numpy(row), torch.from_numpy(want), **PARITY_TOLERANCE)
    assert adapters.classify(texts[:4], names[:4]) == [
        ADAPTERS[name]["labels"][int(row.argmax())] for row, name in zip(rows[:4], names[:4])
    ]


@pytest.mark.timeout(60)
def test_three_adapters_with_two_four_and_five_labels_in_one_batch(adapter_dirs, alone):
    chosen = {name: adapter_dirs[name] for name in ("two", "four", "five")}
    adapters = load_adapters(list(chosen.values()), device="cpu")  # named by their folders
    names = ["five", "two", "four", "two", "five"]
    rows = adapters.predict_proba(TEXTS[:5], names)
    assert [len(row) for row in rows] == [5, 2, 4, 2, 5]
    for row, want in zip(rows, expected(alone, TEXTS[:5], names)):
        torch.testing.assert_close(torch.from_numpy(row), torch.from_numpy(want), **PARITY_TOLERANCE)
        assert row.sum() == pytest.approx(1.0, abs=1e-5)


def random_weights(model, seed: int, labels: int, targets=("query", "value")) -> AdapterWeights:
    """An adapter for a tiny in-memory model, and that model with it merged (for reference)."""
    torch.manual_seed(seed)
    adapted = copy.deepcopy(model)
    adapted.classifier.out_proj = torch.nn.Linear(adapted.config.hidden_size, labels)
    inject_lora(adapted, targets, r=2 + seed, alpha=4.0)
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            layer.lora_B.normal_(std=0.5)
    config = adapted.lora.config
    weights = AdapterWeights.from_state(
        lora_state_dict(adapted), config.r, config.alpha, trainable_modules=adapted.lora.trainable_modules
    )
    return weights, adapted


@pytest.mark.timeout(30)
def test_rows_without_an_adapter_get_the_base_model_and_the_base_comes_back_unchanged():
    base = tiny_model(hidden_dropout_prob=0.0)
    original = copy.deepcopy(base.state_dict())
    weights_a, adapted_a = random_weights(base, seed=1, labels=3)
    weights_b, adapted_b = random_weights(base, seed=2, labels=6, targets=("key",))
    multi = MultiAdapterModel(copy.deepcopy(base))
    multi.set_adapters([weights_a, weights_b])
    ids = torch.randint(5, 40, (4, 7))
    with torch.inference_mode():
        logits = multi(torch.tensor([-1, 0, 1, -1]), input_ids=ids).logits
        base_logits, a_logits, b_logits = (model(input_ids=ids).logits for model in (base, adapted_a, adapted_b))
    assert logits.shape == (4, 6)
    # The same layers on fewer rows: equal up to float32 rounding.
    torch.testing.assert_close(logits[[0, 3], :4], base_logits[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[1, :3], a_logits[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[2], b_logits[2], rtol=0, atol=1e-5)
    assert torch.isinf(logits[[0, 1, 3], 4:]).all() and torch.isinf(logits[1, 3:]).all()
    assert sum(isinstance(m, MultiLoRALinear) for m in multi.modules()) == 6  # q, v, k in 2 layers

    multi.set_adapters([])
    assert not any(isinstance(m, MultiLoRALinear) for m in multi.modules())
    for key, tensor in multi.model.state_dict().items():
        assert torch.equal(tensor, original[key]), key  # never written to: bit for bit


@pytest.mark.timeout(30)
def test_misfits_are_refused_and_leave_nothing_served():
    base = tiny_model()
    weights, _ = random_weights(base, seed=1, labels=3)
    multi = MultiAdapterModel(base)
    wrong = copy.deepcopy(weights)
    update = wrong.layers["roberta.encoder.layer.0.attention.self.query"]
    update.lora_A = torch.zeros(update.lora_A.shape[0], 5)
    with pytest.raises(ValueError, match=r"layer\.0\.attention\.self\.query: A \(3, 5\).*do not fit a Linear 32 -> 32"):
        multi.set_adapters([weights, wrong])
    assert multi.adapter_count == 0 and not any(isinstance(m, MultiLoRALinear) for m in multi.modules())
    with pytest.raises(ValueError, match="adapter indices run from -1"):
        multi(torch.tensor([0]), input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside LoRA layers and trainable modules"):
        AdapterWeights.from_state({"roberta.pooler.weight": torch.zeros(1)}, r=2, alpha=4.0)


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.timeout(60)
def test_bad_adapters_are_one_line_usage_errors(tiny_model_dir, adapter_dirs, tmp_path):
    other = random_adapter(tiny_model_dir, tmp_path / "other")
    edit_config(other, base_model="roberta-large")
    with refused(r"trained on base 'roberta-large', not on '.*tiny-roberta"):
        load_adapters([adapter_dirs["two"], other], device="cpu")
    quantized = random_adapter(tiny_model_dir, tmp_path / "quantized")
    edit_config(quantized, quantize_base="nf4")
    with refused("trained on a nf4 base"):
        load_adapters([quantized], device="cpu")
    with refused("two adapter folders are named two"):
        load_adapters([adapter_dirs["two"], adapter_dirs["two"]], device="cpu")
    adapters = load_adapters({"two": adapter_dirs["two"]}, device="cpu")
    with refused("unknown adapter\\(s\\) 'nope'; served: two"):
        adapters.predict_proba(["goal"], ["nope"])


@pytest.mark.timeout(120)
def test_predict_py_with_several_adapters_answers_each_row_with_its_own_in_input_order(
    adapter_dirs, alone, tmp_path, capsys
):
    names = ["five", "two", "four", "five", "pissa", "two"]
    truth = [ADAPTERS[name]["labels"][i % len(ADAPTERS[name]["labels"])] for i, name in enumerate(names)]
    source = tmp_path / "mixed.csv"
    pd.DataFrame({"text": TEXTS[:6], "Adapter": names, "label": truth}).to_csv(source, index=False)
    flags = [f"{name}={adapter_dirs[name]}" for name in ("two", "four", "five", "pissa")]
    main(["--adapter", *flags, "--input", str(source), "--output", str(tmp_path / "out.csv"), "--probs"])
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert table["ID"].tolist() == list(range(6)) and table["Adapter"].tolist() == names
    for (_, row), name, want in zip(table.iterrows(), names, expected(alone, TEXTS[:6], names)):
        labels = ADAPTERS[name]["labels"]
        assert row["Label"] == want.argmax() and row["LabelName"] == labels[want.argmax()]
        np.testing.assert_allclose(row[labels].astype(float), want, **PARITY_TOLERANCE)
        others = [label for label in table.columns[4:] if label not in labels]
        assert (row[others] == "").all()  # labels of the other adapters: empty
    out = capsys.readouterr().out
    for name in ("five", "four", "pissa", "two"):
        rows = [i for i, n in enumerate(names) if n == name]
        hits = sum(table["LabelName"][i] == truth[i] for i in rows)
        assert f"{name}: accuracy {hits / len(rows):.4f}, macro F1 " in out


@pytest.mark.timeout(60)
def test_predict_py_with_several_adapters_refuses_what_it_cannot_do_in_one_line(adapter_dirs, tmp_path, capsys):
    source = tmp_path / "mixed.csv"
    pd.DataFrame({"text": ["goal", "chip"], "adapter": ["two", "seven"]}).to_csv(source, index=False)
    two_four = [str(adapter_dirs["two"]), str(adapter_dirs["four"])]
    for argv, message in [
        ([*two_four, "--text", "goal"], "name each row's adapter in an --input column ('adapter'); --text has none"),
        ([*two_four, "--input", str(source)], "names adapter(s) 'seven' in column 'adapter'; given: two, four"),
        ([*two_four, "--input", str(source), "--adapter-column", "group"], "has no 'group' column"),
        (
            [f"x={adapter_dirs['two']}", f"x={adapter_dirs['four']}", "--input", str(source)],
            "two adapters are named 'x'",
        ),
    ]:
        with pytest.raises(SystemExit) as caught:
            run_command(lambda argv=argv: main(["--adapter", *argv, "--output", str(tmp_path / "out.csv")]))
        err = capsys.readouterr().err
        assert caught.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out.csv").exists()


def test_adapter_folders_serve_sub_folders_by_name_and_refuse_what_lies_outside(tmp_path):
    root, elsewhere = tmp_path / "adapters", tmp_path / "elsewhere"
    for folder in (root / "news", root / "bad name", root / ".hidden", elsewhere / "outside"):
        folder.mkdir(parents=True)
        (folder / "adapter.safetensors").write_bytes(b"")
        (folder / "adapter_config.json").write_text("{}")
    (root / "notes").mkdir()  # no adapter files: not an adapter
    (root / "linked").symlink_to(elsewhere / "outside", target_is_directory=True)
    (root / "inside_link").symlink_to(root / "news", target_is_directory=True)
    found, refused = adapter_folders(root)
    assert found == {"inside_link": root / "inside_link", "news": root / "news"}
    assert sorted(refused) == ["bad name", "linked"]
    assert "lies outside the adapters directory" in refused["linked"]
    assert "use letters, digits" in refused["bad name"]
