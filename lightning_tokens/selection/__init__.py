"""0.1 name of :mod:`lightning_tokens.sstoken` (``scores`` is now ``formulas``, ``scoring`` is ``precompute``)."""

from lightning_tokens._renamed import alias

alias(__name__, "lightning_tokens.sstoken", renamed={"scores": "formulas", "scoring": "precompute"})
