"""The experiments of ``benchmarks/evidence.py``: each method as its paper ran it, on one pretrained base."""
