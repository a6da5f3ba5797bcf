"""Turn records into token ids with completion-only labels, and pad them into batches.

Labels are ``-100`` on prompt tokens (and, after collation, on padding): only responses are trained on.

Chat ``messages`` use the tokenizer's chat template when it has one. Otherwise the fallback template
renders each message as ``"<role>: <content>\\n"`` and each assistant reply as
``"assistant: " + content + eos``; the ``"assistant: "`` cue is part of the prompt, the reply and its
eos are the targets. A prompt/completion record is ``bos + prompt`` (context) then
``completion + eos`` (targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lightning_tokens.data.records import DataError, Record
from lightning_tokens.lean_loss import IGNORE_INDEX

Truncation = Literal["truncate", "drop"]


@dataclass
class Encoded:
    """Token ids and labels of one sample (``prompt_length`` = tokens before the first target)."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    origin: str


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    # verbose=False: no warning for texts past the tokenizer's model_max_length; the truncation policy decides.
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The context ids of a prompt/completion record: the tokenizer's encoding, bos first."""
    ids = _ids(tokenizer, prompt, special=True)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _prompt_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    context = prompt_ids(tokenizer, prompt)
    completion_ids = _ids(tokenizer, completion, special=False)
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return context, completion_ids


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, special=False)


def _messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids and labels of a chat: every assistant reply is a target, everything else context."""
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.chat_template:
        # Render growing prefixes so each reply's tokens are exactly those the template adds for it.
        for end, message in enumerate(messages, start=1):
            if message["role"] != "assistant":
                continue
            before = _template_ids(tokenizer, messages[: end - 1], generation_prompt=True)
            after = _template_ids(tokenizer, messages[:end], generation_prompt=False)
            if after[: len(before)] != before or before[: len(input_ids)] != input_ids:
                raise ValueError("the chat template does not render a conversation's prefix as a prefix")
            context, reply = before[len(input_ids):], after[len(before):]
            input_ids = input_ids + context + reply
            labels = labels + [IGNORE_INDEX] * len(context) + reply
        return input_ids, labels
    if tokenizer.bos_token_id is not None:
        input_ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for message in messages:
        if message["role"] == "assistant":
            cue = _ids(tokenizer, "assistant: ", special=False)
            reply = _ids(tokenizer, message["content"], special=False)
            reply = reply + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            input_ids += cue + reply
            labels += [IGNORE_INDEX] * len(cue) + reply
        else:
            turn = _ids(tokenizer, f"{message['role']}: {message['content']}\n", special=False)
            input_ids += turn
            labels += [IGNORE_INDEX] * len(turn)
    return input_ids, labels


def character_limit(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """Characters past which a text surely holds more than ``max_length`` tokens (plus a margin of 8).

    No token covers more characters than the longest string in the vocabulary, so a text of
    ``(max_length + 8) * longest`` characters has over ``max_length + 8`` tokens whatever it says (for
    tokenizers whose normalizer does not delete text). Cutting a text there before tokenizing leaves its
    first ``max_length`` tokens as they were, and keeps a 10 MB record from being tokenized whole.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return (max_length + 8) * max(1, longest)


def encode_record(tokenizer: PreTrainedTokenizerBase, record: Record, max_chars: Optional[int] = None) -> Encoded:
    """Ids and completion-only labels of one record.

    Args:
        tokenizer: The tokenizer.
        record: The record.
        max_chars: Cut every text field to this many characters before tokenizing (see
            :func:`character_limit`). Default ``None``: no cut.
    """
    fields = record.fields
    if max_chars is not None:
        fields = _cut_texts(fields, max_chars)
    if "messages" in fields:
        input_ids, labels = _messages(tokenizer, fields["messages"])
    else:
        prompt_ids, completion_ids = _prompt_completion(tokenizer, fields["prompt"], fields["completion"])
        input_ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{record.origin}: the response tokenizes to no tokens")
    prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return Encoded(input_ids, labels, prompt_length, record.origin)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: Record) -> Encoded:
    """A prompt alone (``bos + prompt``, no targets), for generation."""
    ids = prompt_ids(tokenizer, record.fields["prompt"])
    return Encoded(ids, [IGNORE_INDEX] * len(ids), len(ids), record.origin)


def _cut_texts(fields: dict[str, Any], max_chars: int) -> dict[str, Any]:
    if "messages" in fields:
        messages = [{**m, "content": m["content"][:max_chars]} for m in fields["messages"]]
        return {**fields, "messages": messages}
    return {**fields, "prompt": fields["prompt"][:max_chars], "completion": fields["completion"][:max_chars]}


@dataclass
class TruncationReport:
    """What the truncation policy did to one split."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        return f"{self.kept} kept ({self.truncated} truncated), {self.dropped} dropped"


def apply_truncation(samples: list[Encoded], max_length: int,
                     policy: Truncation) -> tuple[list[Encoded], TruncationReport]:
    """Samples no longer than ``max_length`` tokens, under the policy.

    ``"truncate"`` cuts the end of an over-long sample and keeps it if a target token survives; ``"drop"``
    drops it. Either way a sample whose prompt alone fills ``max_length`` is dropped.
    """
    if policy not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {policy!r}")
    report = TruncationReport()
    kept: list[Encoded] = []
    for sample in samples:
        if len(sample.input_ids) <= max_length:
            kept.append(sample)
        elif policy == "truncate" and sample.prompt_length < max_length:
            kept.append(Encoded(sample.input_ids[:max_length], sample.labels[:max_length], sample.prompt_length,
                                sample.origin))
            report.truncated += 1
        else:
            report.dropped += 1
    report.kept = len(kept)
    return kept, report


def pad(sequences: list[list[int]], value: int, side: str = "right", multiple_of: int = 1) -> torch.Tensor:
    """A ``(B, T)`` long tensor of ``sequences`` padded with ``value`` on ``side`` to a multiple of ``multiple_of``."""
    length = max(len(s) for s in sequences)
    length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            if side == "right":
                out[row, : len(seq)] = torch.tensor(seq)
            else:
                out[row, length - len(seq):] = torch.tensor(seq)
    return out


@dataclass
class SFTCollator:
    """Pads a list of :class:`Encoded` samples into a batch (right padding, labels ``-100`` on padding).

    With ``generation=True`` the batch also carries the prompts left-padded for ``generate()``
    (``prompt_input_ids``, ``prompt_attention_mask``) and the reference ``answers``, for
    generation-based validation.

    Args:
        pad_token_id: Id used for padding.
        pad_to_multiple_of: Round the padded length up to this multiple. Default ``1``.
        generation: Add the left-padded prompts and answers. Default ``False``.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1
    generation: bool = False

    def __call__(self, samples: list[tuple[Encoded, Optional[str]]]) -> dict[str, Any]:
        encoded = [sample for sample, _ in samples]
        batch: dict[str, Any] = {
            "input_ids": pad([s.input_ids for s in encoded], self.pad_token_id, multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad([[1] * len(s.input_ids) for s in encoded], 0, multiple_of=self.pad_to_multiple_of),
            "labels": pad([s.labels for s in encoded], IGNORE_INDEX, multiple_of=self.pad_to_multiple_of),
        }
        if self.generation:
            prompts = [s.input_ids[: s.prompt_length] for s in encoded]
            batch["prompt_input_ids"] = pad(prompts, self.pad_token_id, side="left")
            batch["prompt_attention_mask"] = pad([[1] * len(p) for p in prompts], 0, side="left")
            batch["answers"] = [answer for _, answer in samples]
        return batch
