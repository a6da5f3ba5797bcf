"""Read every layer's hidden states with module hooks (no ``output_hidden_states``), in training or generate().

Pre-hooks on the decoder layers see each layer's input (the embedding output for layer 0); a hook on the
decoder stack sees its final-norm output. Together these are the ``N + 1`` vectors transformers returns as
``hidden_states``, for llama, qwen2, mistral, gpt2 and any model :func:`decoder_layers` understands.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_tokens.modeling import decoder_layers, decoder_of


class HiddenStateCapture:
    """Hooks that keep the hidden states of the latest forward.

    Use as a context manager (or call :meth:`remove`). After a forward, :attr:`states` is ``(B, N + 1, H)``
    at the last position (``last_only=True``, what decoding needs) or ``(B, T, N + 1, H)``.

    Args:
        model: The causal LM (any wrapper).
        last_only: Read only the last position of each forward. Default ``True``.
        mask: ``(B, T)`` bool: keep only these positions, as ``(P, N + 1, H)`` (training reads only the
            supervised positions, so no ``(B, T, N + 1, H)`` copy is held). Default ``None``.
    """

    def __init__(self, model: nn.Module, last_only: bool = True, mask: Optional[torch.Tensor] = None) -> None:
        self.last_only = last_only
        self.mask = mask
        self._layers: list[Optional[torch.Tensor]] = []
        self._final: Optional[torch.Tensor] = None
        layers = decoder_layers(model)
        self._layers = [None] * len(layers)
        self._handles = [layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]
        self._handles.append(decoder_of(model).register_forward_hook(self._final_hook))

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            return x.detach()[self.mask]
        # last_only keeps a reference and slices when read: the hooks run at every decoding step, the
        # states are read only at guided ones (a view would keep the same storage alive anyway).
        return x if self.last_only else x.detach()

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._layers[index] = self._keep(hidden)
            if index == 0:
                self._final = None

        return hook

    def _final_hook(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self._final = self._keep(hidden)

    @property
    def ready(self) -> bool:
        """Whether a complete forward has been captured."""
        return self._final is not None and all(x is not None for x in self._layers)

    @property
    def states(self) -> torch.Tensor:
        """The states of the latest forward, stacked on a layer axis just before the hidden axis."""
        if self.last_only and self.mask is None:
            return self.last_states()
        if not self.ready:
            raise RuntimeError("HiddenStateCapture: no complete forward captured yet")
        return torch.stack([*self._layers, self._final], dim=-2)

    def last_states(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(R, N + 1, H)`` states at the last position of the latest forward (needs ``last_only=True``).

        Args:
            rows: ``(R,)`` batch indices to keep (on the states' device). Default ``None``: every row.
        """
        if not self.last_only or self.mask is not None:
            raise RuntimeError("HiddenStateCapture.last_states needs last_only=True and no mask")
        if not self.ready:
            raise RuntimeError("HiddenStateCapture: no complete forward captured yet")
        states = torch.stack([x[:, -1] for x in (*self._layers, self._final)], dim=1).detach()
        return states if rows is None else states.index_select(0, rows)

    def gather(self, mask: torch.Tensor) -> torch.Tensor:
        """``(P, N + 1, H)`` states at the ``True`` positions of a ``(B, T)`` mask (needs ``last_only=False``)."""
        if self.last_only:
            raise RuntimeError("HiddenStateCapture.gather needs last_only=False")
        if not self.ready:
            raise RuntimeError("HiddenStateCapture: no complete forward captured yet")
        return torch.stack([x[mask] for x in (*self._layers, self._final)], dim=1)

    def clear(self) -> None:
        """Drop the captured tensors."""
        self._layers = [None] * len(self._layers)
        self._final = None

    def remove(self) -> None:
        """Remove the hooks and drop the tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "HiddenStateCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
