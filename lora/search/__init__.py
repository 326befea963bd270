"""The hyper-parameter search under a budget of trainable parameters (``search.py``): the space
and its exact parameter counts (``space.py``), the Optuna study that trains one trial after
another (``study.py``), and what a search leaves behind (``report.py``)."""
