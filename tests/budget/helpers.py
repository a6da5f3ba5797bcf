"""Helpers shared by the budget-guidance tests."""

from __future__ import annotations


def ids(tokenizer, *tokens):
    return tokenizer.convert_tokens_to_ids(list(tokens))
