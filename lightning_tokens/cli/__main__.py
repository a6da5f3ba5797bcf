"""``python -m lightning_tokens.cli``: the ``lightning-tokens`` console script."""

from lightning_tokens.cli import main

if __name__ == "__main__":
    main()
