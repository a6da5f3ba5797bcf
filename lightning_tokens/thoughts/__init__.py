"""0.1 name of :mod:`lightning_tokens.quiet_star` (``heads`` is now ``mixing``)."""

from lightning_tokens._renamed import alias

alias(__name__, "lightning_tokens.quiet_star", renamed={"heads": "mixing"})
