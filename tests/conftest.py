"""Shared fixtures: tiny random RoBERTa models, a word-level tokenizer and a learnable toy
AG-News-like dataset. Nothing is downloaded; nothing under ../shared is read."""
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never wait on the network

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
CLASS_WORDS = [
    "war election minister president troops peace government nations".split(),
    "match goal team season coach league cup player".split(),
    "stocks profit shares market company earnings bank investors".split(),
    "software internet computer space research chip scientists online".split(),
]
COMMON_WORDS = "the a of to in on and said new after for with by today report week".split()
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def tiny_config(**overrides) -> RobertaConfig:
    """A 2-layer, 32-wide RoBERTa for 4 labels whose vocabulary fits ``tiny_tokenizer``."""
    settings = dict(vocab_size=len(SPECIAL_TOKENS) + len(COMMON_WORDS) + 32, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=80, num_labels=4, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2,
                    id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    settings.update(overrides)
    return RobertaConfig(**settings)


def roberta_base_config(**overrides) -> RobertaConfig:
    """roberta-base's real shape (random weights): 514 positions and one token type, as in its
    published config; ``RobertaConfig()``'s defaults (512 / 2) would be a slightly different model."""
    return RobertaConfig(**{"max_position_embeddings": 514, "type_vocab_size": 1, "num_labels": 4, **overrides})


def tiny_model(seed: int = 0, **overrides) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_config(**overrides)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-cased, ``<s> words </s>``, RoBERTa's special-token ids."""
    words = COMMON_WORDS + [w for words in CLASS_WORDS for w in words]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=64)


def toy_news(rows: int, seed: int = 0, noise: float = 0.0) -> pd.DataFrame:
    """A learnable 4-class ``text,label`` table: each text mixes words of its class with
    common words; lengths vary from 3 to 20 words. Balanced, shuffled, seeded. With ``noise``,
    that share of the rows gets a random label instead (accuracy can then not saturate)."""
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        label = i % 4
        length = rng.randint(3, 20)
        words = [rng.choice(CLASS_WORDS[label]) if rng.random() < 0.4 else rng.choice(COMMON_WORDS)
                 for _ in range(length)]
        words[rng.randrange(length)] = rng.choice(CLASS_WORDS[label])
        if rng.random() < noise:
            label = rng.randrange(4)
        records.append({"text": " ".join(words).capitalize(), "label": label})
    rng.shuffle(records)
    return pd.DataFrame(records)


def pretrained_tiny_model(seed: int = 0) -> RobertaForSequenceClassification:
    """A tiny RoBERTa whose encoder learnt the toy task (a few seconds of full training, without dropout: with it a 32-wide encoder learns little) and
    whose classification head is fresh again: like a pretrained checkpoint, its features are
    informative, so LoRA on top of it learns in a few dozen steps (a random encoder would not)."""
    model = tiny_model(seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    tokenizer = tiny_tokenizer()
    data = toy_news(360, seed=7)
    ids = tokenizer(list(data["text"]), padding=True, return_tensors="pt")
    labels = torch.tensor(data["label"].to_numpy())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(6):
        for start in range(0, len(labels), 32):
            rows = slice(start, start + 32)
            loss = model(input_ids=ids["input_ids"][rows], attention_mask=ids["attention_mask"][rows],
                         labels=labels[rows]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.classifier = tiny_model(seed + 1, hidden_dropout_prob=0.0).classifier
    return model.eval()


def random_adapter(model_dir, directory, labels=LABELS, targets=("query", "value"), r=4, alpha=8.0,
                   seed=0, max_length=16, clean=False, **inject):
    """Save a LoRA adapter for the model in ``model_dir`` whose B matrices, DoRA magnitudes, head
    over ``labels`` and other fully trained modules are random (so that they matter), as
    ``train.py`` would write it; ``inject``: more ``inject_lora`` arguments (``dora``,
    ``init="pissa"``, ``rslora``, ``trainable_modules``). Returns the folder."""
    from lora import inject_lora, lora_layers, save_adapter
    from lora.backbone import load_classifier_model
    torch.manual_seed(seed)
    model = load_classifier_model(str(model_dir), list(labels))
    inject_lora(model, targets, r=r, alpha=alpha, **inject)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.5)
            if hasattr(layer, "lora_magnitude"):
                layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))
        for parameter in model.classifier.parameters():
            parameter.normal_(std=0.5)
        for name, parameter in model.named_parameters():  # other modules trained in full, if any
            if parameter.requires_grad and "lora_" not in name and not name.startswith("classifier."):
                parameter.add_(0.2 * torch.randn_like(parameter))
    return save_adapter(directory, model, {"base_model": str(model_dir), "labels": list(labels),
                                           "max_length": max_length, "clean": clean})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder with a tiny "pretrained" RoBERTa classifier (``pretrained_tiny_model``) and its
    tokenizer, loadable with ``from_pretrained(folder)`` (and so with ``--model folder``)."""
    folder = tmp_path_factory.mktemp("tiny-roberta")
    pretrained_tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


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


def peft_key(name: str) -> str:
    """Our parameter name -> peft's: ``X.lora_A`` -> ``base_model.model.X.lora_A.default.weight``,
    ``X.lora_magnitude`` -> ``...X.lora_magnitude_vector.default.weight`` (DoRA),
    ``classifier.P`` -> ``base_model.model.classifier.modules_to_save.default.P``."""
    if name.startswith("classifier."):
        return "base_model.model.classifier.modules_to_save.default." + name.split(".", 1)[1]
    if name.endswith(".lora_magnitude"):
        return f"base_model.model.{name.removesuffix('.lora_magnitude')}.lora_magnitude_vector.default.weight"
    return f"base_model.model.{name}.default.weight"


def assert_gradients_match_peft(ours, theirs) -> None:
    """After a backward pass in both: every trainable gradient of ours equals peft's (float32
    tolerance rtol 1e-4, atol 1e-7); frozen parameters have none."""
    peft_params = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, peft_params[peft_key(name)].grad,
                                       rtol=1e-4, atol=1e-7, msg=name)
        else:
            assert parameter.grad is None, name
