"""Many adapters on one base: the batched math (``multi.py``: every row of a batch through its own
adapter, in one forward pass), the adapters served and their folders (``adapters.py``), dynamic
batching across requests (``batching.py``) and the HTTP layer of ``lora-serve`` (``http.py``)."""

from .adapters import AdapterSet, load_adapters
from .multi import AdapterWeights, MultiAdapterModel

__all__ = ["load_adapters", "AdapterSet", "MultiAdapterModel", "AdapterWeights"]
