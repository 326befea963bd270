"""Benchmarks: not part of the test suite or CI. Run from the repo root as ``python -m bench.speed``
or ``python -m bench.scaling``; each writes its own section of ``BENCHMARKS.md``."""
