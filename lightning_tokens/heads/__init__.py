"""0.1 name of :mod:`lightning_tokens.caft`."""

from lightning_tokens._renamed import alias

alias(__name__, "lightning_tokens.caft")
