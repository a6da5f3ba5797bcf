"""The evidence harness: each method trained as its paper ran it, on one pretrained base, with its tables.

Run from the repository root: ``python -m experiments.base`` builds (and caches) the pretrained base,
``python -m experiments.evidence <part>`` runs a method's protocol (``experiments/protocols/<part>.py``). The
results are in ``experiments/README.md``. Speed and memory scripts live apart, in ``benchmarks/``.
"""
