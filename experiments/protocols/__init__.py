"""The protocols of ``python -m experiments.evidence``: each method as its paper ran it, on one pretrained base."""
