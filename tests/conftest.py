"""The suite's fixtures: a tiny "pretrained" RoBERTa folder, toy AG-News-like data, and run
folders that the real training job wrote. The helpers they are built from, and that test files
import, are in ``helpers.py``. Nothing is downloaded; nothing under ../shared is read."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never wait on the network

import contextlib  # noqa: E402
import io  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers import (  # noqa: E402
    FAMILY_NAMES,
    TRAINED_RUNS,
    config_for,
    family_checkpoint,
    pretrained_tiny_model,
    tiny_tokenizer,
    toy_news,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny "pretrained" RoBERTa classifier (``pretrained_tiny_model``) and its
    tokenizer, loadable with ``from_pretrained(folder)`` (and so with ``--model folder``)."""
    folder = tmp_path_factory.mktemp("tiny-roberta")
    pretrained_tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}``: a tiny random checkpoint of each encoder family (``family_checkpoint``:
    no classification head, as on the hub) and ``tiny_tokenizer``, loadable with ``--model folder``."""
    folders = {}
    for family in FAMILY_NAMES:
        folders[family] = tmp_path_factory.mktemp(f"tiny-{family}")
        family_checkpoint(family).save_pretrained(folders[family])
        tiny_tokenizer().save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    """``train.csv`` (400 rows) and ``test.csv`` (120 rows) with ``text,label`` columns."""
    folder = tmp_path_factory.mktemp("toy-news")
    toy_news(400, seed=1).to_csv(folder / "train.csv", index=False)
    toy_news(120, seed=2).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def noisy_data_dir(tmp_path_factory):
    """Like ``toy_data_dir`` with 40% random labels: validation metrics keep moving during a
    short run instead of sitting at accuracy 1.0, so runs that differ can be told apart."""
    folder = tmp_path_factory.mktemp("noisy-news")
    toy_news(400, seed=1, noise=0.4).to_csv(folder / "train.csv", index=False)
    toy_news(120, seed=2, noise=0.4).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def trained_runs(tiny_model_dir, noisy_data_dir, tmp_path_factory) -> dict[str, Path]:
    """``{name: run folder}`` for ``TRAINED_RUNS``: the real training job (``train()``, 6 steps
    at a high learning rate so that the adapters matter) on the tiny model and the noisy toy
    data (the test metrics do not saturate), with a float base (LoRA, DoRA, PiSSA) and an nf4
    base. Built once per test run (about 15 s); consumers copy a folder before changing anything in it."""
    from lora.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    with contextlib.redirect_stdout(io.StringIO()):
        for name, settings in TRAINED_RUNS.items():
            train(config_for(tiny_model_dir, noisy_data_dir, root / name, max_steps=6, lr=1e-2, **settings))
    return {name: root / name for name in TRAINED_RUNS}
