"""Conventions of a reasoning trace: ``<think>`` markers, the final answer and its grading, thinking length.

A response thinks between ``<think>`` and ``</think>`` and states its answer after the last ``</think>``,
e.g. ``"<think>\\n4+3=7\\n</think>\\nThe answer is 7."``. Plain SFT, budget guidance and Quiet-STaR read
responses through these functions; the embedded task (:mod:`lightning_tokens.data.reasoning_task`) writes
its completions in this form.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["THINK_END", "THINK_START", "check_answer", "extract_answer", "is_correct", "thinking_length"]

THINK_START = "<think>"
THINK_END = "</think>"

_ANSWER_RE = re.compile(r"answer\s+is\s*:?\s*(-?\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The final integer answer stated after the last ``</think>``.

    Prefers the last ``"answer is N"`` phrase; otherwise takes the last
    integer after the marker.

    Args:
        text: A model response.

    Returns:
        The answer as a normalised integer string (``"-7"``, ``"56"``), or
        ``None`` when there is no ``</think>`` or no integer after it.
    """
    if THINK_END not in text:
        return None
    tail = text.rsplit(THINK_END, 1)[1]
    phrases = _ANSWER_RE.findall(tail)
    numbers = phrases or _INT_RE.findall(tail)
    if not numbers:
        return None
    return str(int(numbers[-1]))


def check_answer(text: str, answer: int | str) -> bool:
    """Whether the response's extracted answer equals ``answer`` exactly.

    Args:
        text: A model response.
        answer: The true answer (integer or integer string).
    """
    predicted = extract_answer(text)
    return predicted is not None and int(predicted) == int(answer)


def is_correct(text: str, reference: str) -> bool:
    """Whether a response answers ``reference``: :func:`check_answer` for an integer reference (the
    embedded task's), else the response after its last ``</think>`` equal to ``reference`` (both stripped).

    Args:
        text: A model response.
        reference: The true answer.
    """
    try:
        int(reference)
    except ValueError:
        return text.rpartition(THINK_END)[2].strip() == str(reference).strip()
    return check_answer(text, reference)


def thinking_length(token_ids: Sequence[int], think_start_id: int, think_end_id: int) -> int:
    """Number of tokens strictly between the first ``<think>`` and the next ``</think>``.

    Args:
        token_ids: Token ids (list, tuple or 1-d tensor).
        think_start_id: Id of ``<think>``.
        think_end_id: Id of ``</think>``.

    Returns:
        The count; tokens up to the end when no ``</think>`` follows, and 0
        when there is no ``<think>``.
    """
    ids = [int(t) for t in token_ids]
    if think_start_id not in ids:
        return 0
    start = ids.index(think_start_id) + 1
    try:
        end = ids.index(think_end_id, start)
    except ValueError:
        end = len(ids)
    return end - start
