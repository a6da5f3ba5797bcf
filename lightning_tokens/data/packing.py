"""Padding-free packing: several samples share a row, and no token attends across a sample boundary.

A packed batch carries ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 with every sample,
and no ``attention_mask``: that is how transformers recognises packed rows (``masking_utils`` builds a
block-diagonal causal mask from the position ids for SDPA and eager attention when no 2D mask and no cache
are given; flash attention reads the same boundaries from ``cu_seq_lens_*``). ``use_cache=False`` is part of
the batch, because a training forward would otherwise create a cache, and a cache turns that detection off.

The last token of a row may be followed by padding: every padding token has position 0 and so is a sample
of one token, attending to itself alone. A real sample has at least two tokens (a context and a target),
which is how :func:`real_tokens` tells them apart.

A sample's first token never is a target: it would be predicted from the previous sample.

Not every model honours packed position ids (Falcon builds its mask without them), so the first packed training
forward of each model is checked against a sample run alone (:func:`check_packed_forward`).
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_tokens.checks import check_numbers
from lightning_tokens.lean_loss import IGNORE_INDEX
from lightning_tokens.modeling import causal_lm_of, decoder_of, find_causal_lm
from lightning_tokens.sharding import is_sharded

#: Keys of a batch that a causal LM's forward takes (the rest, prompts and answers, are for generation).
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "use_cache", *FLASH_KEYS)


class PackingError(ValueError):
    """A packed batch reached a model or a method in a way that would let samples see each other."""


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most ``capacity``: best-fit decreasing.

    Samples are placed longest first (ties: the lower index first), each into the fullest row it still fits
    in, so the result depends on the lengths alone. Within a row, indices are in increasing order.

    Raises:
        ValueError: A sample is longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row number), sorted
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than the row capacity {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (space - length, row))
    return [sorted(row) for row in rows]


class PackedRows(Dataset):
    """A dataset of packed rows: item ``i`` is the list of the items of ``dataset`` that share row ``i``.

    Args:
        dataset: Items whose first element has ``input_ids`` (an :class:`~lightning_tokens.data.encode.Encoded`,
            with anything after it, e.g. ``(Encoded, answer)``), or :class:`Encoded` themselves.
        max_length: Tokens per row at most.
    """

    def __init__(self, dataset: Sequence[Any], max_length: int) -> None:
        self.dataset, self.max_length = dataset, max_length
        lengths = [len(_encoded(dataset[i]).input_ids) for i in range(len(dataset))]
        self.rows = pack_lengths(lengths, max_length)
        self.tokens = sum(lengths)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[Any]:
        return [self.dataset[i] for i in self.rows[index]]

    @property
    def fill(self) -> float:
        """Share of the rows' ``max_length`` slots holding real tokens."""
        return self.tokens / max(1, len(self.rows) * self.max_length)


def _encoded(item: Any) -> Any:
    return item[0] if isinstance(item, tuple) else item


@dataclass
class PackedCollator:
    """Concatenates the samples of each packed row into one row of a padding-free batch.

    Returns ``input_ids``, ``position_ids`` (0, 1, ... per sample; 0 on every padding token), one tensor per
    name in ``fields`` (``labels``: ``-100`` on each sample's first token and on padding; any other field 0 on
    padding) and ``use_cache=False``; with ``flash_attention`` also ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` (see :func:`flash_attention_kwargs`).

    Args:
        pad_token_id: Id used for padding.
        pad_to_multiple_of: Round the row length up to this multiple. Default ``1``.
        flash_attention: Add flash attention's sequence boundaries. Default ``False``.
        fields: Per-token attributes of the samples, besides ``input_ids``, to pack. Default ``("labels",)``.
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1
    flash_attention: bool = False
    fields: tuple[str, ...] = ("labels",)

    def __post_init__(self) -> None:
        check_numbers("PackedCollator", pad_token_id=(self.pad_token_id, "an integer >= 0"),
                      pad_to_multiple_of=(self.pad_to_multiple_of, "an integer >= 1"))

    def __call__(self, rows: list[list[Any]]) -> dict[str, Any]:
        packed = [[_encoded(item) for item in row] for row in rows]
        lengths = [sum(len(s.input_ids) for s in row) for row in packed]
        width = -(-max(lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        values = {name: torch.full(shape, IGNORE_INDEX if name == "labels" else 0, dtype=torch.long)
                  for name in self.fields}
        for r, row in enumerate(packed):
            start = 0
            for sample in row:
                n = len(sample.input_ids)
                input_ids[r, start:start + n] = torch.tensor(sample.input_ids)
                position_ids[r, start:start + n] = torch.arange(n)
                for name, tensor in values.items():
                    tensor[r, start:start + n] = torch.tensor(getattr(sample, name))
                if "labels" in values:
                    values["labels"][r, start] = IGNORE_INDEX
                start += n
        batch: dict[str, Any] = {"input_ids": input_ids, **values, "position_ids": position_ids, "use_cache": False}
        if self.flash_attention:
            batch.update(flash_attention_kwargs(position_ids))
        return batch


@dataclass
class PaddingFreeCollator:
    """Packs the samples of one batch into rows (:func:`pack_lengths` over this batch alone), then collates those
    rows with ``collator``.

    A batch keeps the samples it would have had padded, so training takes the same steps over the same
    samples; only the compute spent on padding goes. The row capacity is chosen per batch: of the longest
    sample's length times 1, 1.25, 1.5, 2, 3 or 4, and ``max_length``, the one whose rows leave the fewest
    token slots (rows times the fullest row), the smallest on a tie. Capacity 1x never packs more slots than
    padding, so no batch gets wider than its padded form.

    Args:
        collator: The :class:`PackedCollator` that concatenates each row.
        max_length: Tokens per row at most (no sample is longer).
    """

    collator: PackedCollator
    max_length: int

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        rows = self.rows([len(_encoded(item).input_ids) for item in items])
        return self.collator([[items[i] for i in row] for row in rows])

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """The rows of the capacity that leaves the fewest token slots."""
        longest = max(lengths)
        capacities = sorted({min(self.max_length, -(-longest * scale // 4)) for scale in (4, 5, 6, 8, 12, 16)}
                            | {max(longest, self.max_length)})
        best: Optional[tuple[int, list[list[int]]]] = None
        for capacity in capacities:
            rows = pack_lengths(lengths, capacity)
            slots = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
            if best is None or slots < best[0]:
                best = (slots, rows)
        return best[1]


def segment_ids(position_ids: Tensor) -> Tensor:
    """``(B, T)`` number of the sample each token belongs to within its row, from 0.

    A sample starts wherever a position is not the previous one plus 1: transformers' own rule
    (``masking_utils.find_packed_sequence_indices``), so these are the blocks attention saw.
    """
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).long().cumsum(-1)


def is_packed(position_ids: Optional[Tensor]) -> bool:
    """Whether some row of ``position_ids`` holds more than one sample (one device synchronisation)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return False
    return bool((segment_ids(position_ids)[:, -1] > 0).any())


def restarts_between_real_tokens(position_ids: Tensor, attention_mask: Tensor) -> bool:
    """Whether positions restart between two real tokens of a row: samples packed into a row that also has a 2D
    mask. Left or right padding with position ids of its own (``cumsum(mask) - 1``, padding filled with 1) does
    not count: its breaks all touch padding."""
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return False
    real = attention_mask.bool()
    step = position_ids[:, 1:] - position_ids[:, :-1]
    return bool(((step != 1) & real[:, 1:] & real[:, :-1]).any())


def sample_starts(segments: Tensor) -> Tensor:
    """``(B, T)`` bool: the first token of every sample (of :func:`segment_ids`)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def real_tokens(segments: Tensor) -> Tensor:
    """``(B, T)`` bool: tokens of samples of two or more tokens; the lone tokens are padding."""
    starts = sample_starts(segments)
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    return ~(starts & ends)


def batch_is_packed(batch: Any) -> bool:
    """Whether a training batch is a packed one: a mapping with packed ``position_ids`` and no ``attention_mask``."""
    if not isinstance(batch, dict) or batch.get("attention_mask") is not None:
        return False
    position_ids = batch.get("position_ids")
    return isinstance(position_ids, Tensor) and is_packed(position_ids)


def model_inputs(batch: dict[str, Any], labels: bool = True) -> dict[str, Any]:
    """The keys of ``batch`` a causal LM's forward takes (packed or padded), ``labels`` included or not."""
    return {key: batch[key] for key in MODEL_KEYS if key in batch and (labels or key != "labels")}


def runs_flash_attention(model: Any) -> bool:
    """Whether a transformers model's attention implementation is a flash attention one."""
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")


def uses_flash_attention(trainer: Any) -> bool:
    """Whether the causal LM ``trainer`` trains runs flash attention (its packed batches then carry
    :func:`flash_attention_kwargs`); ``False`` without a trainer or a model to look at."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if module is None:
        return False
    try:
        return runs_flash_attention(find_causal_lm(module))
    except ValueError:
        return False


def batch_samples(batch: dict[str, Any]) -> tuple[Tensor, Optional[Tensor]]:
    """``(real, segments)`` of a training batch: the ``(B, T)`` mask of real tokens, and for a packed batch the
    sample number of each token (:func:`segment_ids`), ``None`` for a padded one."""
    if batch_is_packed(batch):
        segments = segment_ids(batch["position_ids"])
        return real_tokens(segments), segments
    return batch["attention_mask"].bool(), None


def real_token_count(batch: dict[str, Any]) -> Tensor:
    """Real (non-padding) tokens in a padded or packed batch."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].sum()
    if batch.get("position_ids") is not None:
        return real_tokens(segment_ids(batch["position_ids"])).sum()
    return torch.tensor(batch["input_ids"].numel())


def flash_attention_kwargs(position_ids: Tensor) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` (int32 start offsets of every sample in the flattened batch, then its size) and
    ``max_length_q/k`` (the longest sample), which transformers' flash attention uses for variable-length
    attention over a ``(B, T)`` packed batch."""
    offsets = sample_starts(segment_ids(position_ids)).reshape(-1).nonzero().view(-1)
    cu = torch.cat([offsets, torch.tensor([position_ids.numel()], device=offsets.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


#: Positions of one sample whose final hidden states :func:`check_packed_forward` compares.
CHECK_POSITIONS = 4
_packing_checked: "weakref.WeakSet[Any]" = weakref.WeakSet()


def check_packed_forward(model: Any, input_ids: Optional[Tensor], call_kwargs: dict[str, Any]) -> None:
    """Once per model, on its first packed training forward: check that a packed row gives a sample the final
    hidden states it has alone, at its first :data:`CHECK_POSITIONS` positions (those that would attend most to
    the previous sample), as transformers' masks promise (see the module docstring).

    Two forwards of one row's prefix, in eval mode under ``no_grad`` (dropout would make them differ): the row up
    to those positions, packed, and that sample alone. A model whose attention ignores packed position ids (Falcon
    builds its mask without them) would otherwise train every later sample of a row on its predecessors' tokens.
    Without a row of two samples the check waits for the next packed forward, except on a model sharded with FSDP2,
    where every process must run the same forwards: a row's first sample is then compared with itself.

    Args:
        model: The transformers causal LM (plain, PEFT-wrapped or quantized inside).
        input_ids: ``(B, T)`` the forward's input ids, or ``None`` when it was given ``inputs_embeds``.
        call_kwargs: The forward's keyword arguments (``position_ids``, ``attention_mask``, ``inputs_embeds``...).

    Raises:
        PackingError: The two differ by more than rounding; names the model type.
    """
    position_ids = call_kwargs.get("position_ids")
    if model in _packing_checked or call_kwargs.get("attention_mask") is not None or not is_packed(position_ids):
        return
    tokens = input_ids if input_ids is not None else call_kwargs["inputs_embeds"]
    position_ids = position_ids.expand(tokens.shape[0], -1)
    segments = segment_ids(position_ids)
    found = _later_sample(segments)
    if found is None:
        if not any(is_sharded(module) for module in model.modules()):
            return
        found = 0, 0, int((segments[0] == 0).sum())
    row, start, length = found
    stop = start + min(CHECK_POSITIONS, length)
    backbone = decoder_of(model)
    name = "input_ids" if input_ids is not None else "inputs_embeds"

    def final_hidden(begin: int) -> Tensor:
        positions = position_ids[row:row + 1, begin:stop]
        inputs = {name: tokens[row:row + 1, begin:stop], "position_ids": positions, "use_cache": False}
        if runs_flash_attention(causal_lm_of(model)):
            inputs.update(flash_attention_kwargs(positions))
        return backbone(**inputs).last_hidden_state[0, start - stop:]

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            packed, alone = final_hidden(0), final_hidden(start)
    finally:
        for module, mode in modes:
            module.training = mode
    gap = ((packed.float() - alone.float()).norm() / alone.float().norm().clamp_min(1e-12)).item()
    # Relative: 1e-3 in float32, 1/8 in bfloat16. Measured on a 6-layer model, a sample after one of 500 tokens:
    # 2e-6 (float32) and 0.013 (bfloat16) apart, and 0.8 where it attends to that one (Falcon).
    tolerance = max(1e-3, 16 * torch.finfo(alone.dtype).eps)
    if not gap <= tolerance:
        config = getattr(causal_lm_of(model), "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        raise PackingError(
            f"model type {model_type!r} does not keep the samples of a packed row apart: a sample's final hidden "
            f"states differ from those it has alone by {gap:.3g} (relative; at most {tolerance:.3g} is rounding), so "
            "it would attend to the samples before it; train this model without packing (padded batches)")
    _packing_checked.add(model)


def _later_sample(segments: Tensor) -> Optional[tuple[int, int, int]]:
    """``(row, start, length)`` of the first real sample that does not begin its row, or ``None``."""
    starts = sample_starts(segments) & real_tokens(segments)
    starts[:, 0] = False
    hits = starts.nonzero()
    if not len(hits):
        return None
    row, start = hits[0].tolist()
    return row, start, int((segments[row] == segments[row, start]).sum())


class SampleView:
    """Per-sample views of ``(B, N)`` per-token tensors whose rows may hold several samples.

    ``expand`` gives an ``(S, N)`` tensor with one row per sample (the values of its row), ``response`` is the
    ``(S, N)`` mask of each sample's own response tokens, and ``collapse`` puts per-sample results (0 off the
    sample's tokens) back into ``(B, N)``. Without packing every row is one sample and the view is the identity.

    Args:
        response: ``(B, N)`` bool mask of the tokens that count (targets).
        segments: ``(B, N)`` sample number of each position within its row, or ``None`` (not packed).
    """

    def __init__(self, response: Tensor, segments: Optional[Tensor] = None) -> None:
        self.batch_response = response
        if segments is None:
            self.rows, self.response = None, response
            return
        width = int(segments.max()) + 1
        ids = torch.arange(response.shape[0], device=response.device)[:, None] * width + segments
        present = torch.unique(ids[response])
        self.rows = torch.div(present, width, rounding_mode="floor")
        self.response = (ids[self.rows] == present[:, None]) & response[self.rows]

    def expand(self, values: Tensor) -> Tensor:
        return values if self.rows is None else values[self.rows]

    def collapse(self, values: Tensor) -> Tensor:
        if self.rows is None:
            return values
        if values.dtype == torch.bool:
            return self.collapse(values.long()) > 0
        placed = torch.where(self.response, values, torch.zeros((), dtype=values.dtype, device=values.device))
        out = torch.zeros(self.batch_response.shape, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.rows, placed)
