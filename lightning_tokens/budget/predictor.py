"""BudgetPredictor: from the hidden states of every layer at a position, a Gamma over the remaining
thinking length for each candidate next token.

Input at a position: the ``N + 1`` hidden states of an ``N``-layer causal LM (the embedding output, the
input of every later layer and the final-norm output, exactly ``output_hidden_states``), read as a short
sequence over the layer axis. A body turns it into one feature vector; two bias-free heads with a
softplus give shape ``alpha_v`` and rate ``lambda_v`` for a candidate ``v``. Only the head rows asked for
are computed (the realised next token in training, the candidates when decoding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tokens.checks import check_numbers

Body = Literal["transformer", "mlp", "bert"]

#: BERT-base sizes, the reference's predictor body (randomly initialised, encoder only).
BERT_BASE = dict(d_model=768, depth=12, heads=12, ffn=3072, dropout=0.1)


@dataclass
class PredictorConfig:
    """Shape of a :class:`BudgetPredictor`.

    Attributes:
        hidden_size: Width ``H`` of the host LM's hidden states.
        num_states: Hidden states per position, ``N + 1`` for an ``N``-layer LM.
        vocab_size: Rows of each head (the LM's vocabulary size).
        body: ``"transformer"`` (a small encoder over the layer axis read at a CLS vector), ``"mlp"``
            (the flattened states through two layers) or ``"bert"`` (the paper's body: Linear(H -> 768) and
            a BERT-base encoder, 12 layers, post-norm, GELU). Default ``"transformer"``.
        d_model: Width of the body. Default ``None``: ``min(H, 512)`` rounded to a multiple of ``heads``
            (768 for ``"bert"``).
        depth: Encoder layers (``"transformer"``, ``"bert"``) or hidden layers (``"mlp"``). Default ``None``:
            2 (12 for ``"bert"``).
        heads: Attention heads of the encoder. Default ``None``: 4 when ``d_model < 256``, else 8 (12 for
            ``"bert"``).
        dropout: Dropout inside the body. Default ``0.0`` (0.1 for ``"bert"``, as BERT).
        input_norm: LayerNorm (no affine) on each hidden state before the body. The residual stream's scale
            grows with depth in real LLMs; normalising keeps the body well conditioned. Default ``True``;
            the reference has none (``False`` under ``"bert"``).
        layer_positions: Learned embedding of the layer index added to each state (the reference's BERT
            encoder sees no positions). Default ``True`` (``False`` under ``"bert"``).
    """

    hidden_size: int
    num_states: int
    vocab_size: int
    body: Body = "transformer"
    d_model: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    dropout: Optional[float] = None
    input_norm: Optional[bool] = None
    layer_positions: Optional[bool] = None

    def __post_init__(self) -> None:
        check_numbers("PredictorConfig", hidden_size=(self.hidden_size, "an integer >= 1"),
                      num_states=(self.num_states, "an integer >= 1"), vocab_size=(self.vocab_size, "an integer >= 1"),
                      d_model=(self.d_model, "an integer >= 1 or None"), depth=(self.depth, "an integer >= 1 or None"),
                      heads=(self.heads, "an integer >= 1 or None"), dropout=(self.dropout, "in [0, 1) or None"))
        if self.body not in ("transformer", "mlp", "bert"):
            raise ValueError(f"PredictorConfig.body must be 'transformer', 'mlp' or 'bert', got {self.body!r}")
        bert = self.body == "bert"
        width = min(self.hidden_size, 512)
        if self.heads is None:
            self.heads = BERT_BASE["heads"] if bert else (4 if (self.d_model or width) < 256 else 8)
        if self.d_model is None:
            self.d_model = BERT_BASE["d_model"] if bert else max(self.heads, width // self.heads * self.heads)
        if self.depth is None:
            self.depth = BERT_BASE["depth"] if bert else 2
        if self.dropout is None:
            self.dropout = BERT_BASE["dropout"] if bert else 0.0
        if self.input_norm is None:
            self.input_norm = not bert
        if self.layer_positions is None:
            self.layer_positions = not bert
        if self.body != "mlp" and self.d_model % self.heads:
            raise ValueError(f"PredictorConfig.d_model ({self.d_model}) must be a multiple of heads ({self.heads})")


# Module checkpoints keep the config in their hyperparameters; allow torch.load(weights_only=True) to read it.
torch.serialization.add_safe_globals([PredictorConfig])


def encode_first(encoder: nn.TransformerEncoder, x: torch.Tensor) -> torch.Tensor:
    """``encoder(x)[:, 0]`` in eval mode (no dropout, no mask), from the layers' weights with functional ops.

    Only the first position (the CLS vector) is read, so the last layer computes its query, attention output
    and feed-forward for that position alone. Skipping ``nn.TransformerEncoderLayer.forward`` also skips its
    per-call checks, which at decoding sizes (a few rows of ``N + 2`` positions) cost about as much as the
    layer's own arithmetic. Equal to the module up to float rounding (tested).

    Args:
        encoder: An encoder of ``batch_first`` :class:`~torch.nn.TransformerEncoderLayer` and no final norm.
        x: ``(P, T, d)`` input sequence.

    Returns:
        ``(P, d)`` output at position 0.
    """
    layers = encoder.layers
    for i, layer in enumerate(layers):
        x = _encoder_layer(layer, x, queries=1 if i == len(layers) - 1 else x.shape[1])
    return x[:, 0]


def _encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, queries: int) -> torch.Tensor:
    """``layer(x)[:, :queries]`` in eval mode: every position is attended to, the first ``queries`` attend."""
    def norm(module: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, module.normalized_shape, module.weight, module.bias, module.eps)

    def attend(h: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        batch, length, width = h.shape
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        # (P, T, 3, heads, head_dim) -> q, k, v of (P, heads, T, head_dim), as few view ops as possible
        q, k, v = qkv.view(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q[:, :, :queries], k, v).transpose(1, 2).reshape(batch, queries, width)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def feed_forward(h: torch.Tensor) -> torch.Tensor:
        return F.linear(layer.activation(F.linear(h, layer.linear1.weight, layer.linear1.bias)),
                        layer.linear2.weight, layer.linear2.bias)

    if layer.norm_first:
        x = x[:, :queries] + attend(norm(layer.norm1, x))
        return x + feed_forward(norm(layer.norm2, x))
    x = norm(layer.norm1, x[:, :queries] + attend(x))
    return norm(layer.norm2, x + feed_forward(x))


class BudgetPredictor(nn.Module):
    """Remaining-length predictor of budget guidance (Gamma shape and rate per candidate next token).

    Build it for a model with :meth:`for_model`, save and load it alone with :meth:`save` / :meth:`load`.

    Args:
        config: Its :class:`PredictorConfig` (a dict of its fields is accepted too).
    """

    def __init__(self, config: PredictorConfig | dict) -> None:
        super().__init__()
        self.config = config if isinstance(config, PredictorConfig) else PredictorConfig(**config)
        c = self.config
        d = c.d_model
        self.norm = nn.LayerNorm(c.hidden_size, elementwise_affine=False) if c.input_norm else nn.Identity()
        if c.body == "mlp":
            layers: list[nn.Module] = [nn.Linear(c.num_states * c.hidden_size, d), nn.GELU(), nn.Dropout(c.dropout)]
            for _ in range(c.depth - 1):
                layers += [nn.Linear(d, d), nn.GELU(), nn.Dropout(c.dropout)]
            self.body = nn.Sequential(*layers)
        else:
            self.project = nn.Linear(c.hidden_size, d)
            self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.positions = nn.Parameter(torch.zeros(1, c.num_states, d)) if c.layer_positions else None
            ffn = BERT_BASE["ffn"] if c.body == "bert" else 4 * d
            layer = nn.TransformerEncoderLayer(d, c.heads, ffn, c.dropout, activation="gelu", batch_first=True,
                                               norm_first=c.body != "bert",
                                               layer_norm_eps=1e-12 if c.body == "bert" else 1e-5)
            self.body = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
            self.final_norm = nn.LayerNorm(d) if c.body != "bert" else nn.Identity()
        self.alpha_head = nn.Linear(d, c.vocab_size, bias=False)
        self.rate_head = nn.Linear(d, c.vocab_size, bias=False)
        nn.init.normal_(self.alpha_head.weight, std=0.02)
        nn.init.normal_(self.rate_head.weight, std=0.02)

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: object) -> "BudgetPredictor":
        """A predictor sized for ``model`` (any transformers causal LM, PEFT-wrapped or quantized).

        Args:
            model: The host LM.
            **overrides: Further :class:`PredictorConfig` fields (``body``, ``d_model``, ...).
        """
        from lightning_tokens.modeling import causal_lm_of, decoder_layers

        base = causal_lm_of(model)
        hidden = base.get_output_embeddings().in_features
        vocab = base.get_output_embeddings().out_features
        return cls(PredictorConfig(hidden_size=hidden, num_states=len(decoder_layers(model)) + 1, vocab_size=vocab,
                                   **overrides))

    # -- forward ---------------------------------------------------------------------------------------
    def features(self, states: torch.Tensor) -> torch.Tensor:
        """``(P, N + 1, H)`` hidden states to ``(P, d)`` features.

        In eval mode the encoder runs through :func:`encode_first` (the same maths as the module, cheaper
        at decoding sizes).
        """
        c = self.config
        if states.ndim != 3 or states.shape[1:] != (c.num_states, c.hidden_size):
            raise ValueError(f"BudgetPredictor: expected states of shape (P, {c.num_states}, {c.hidden_size}), "
                             f"got {tuple(states.shape)}")
        x = self.norm(states.to(self.alpha_head.weight.dtype))
        if c.body == "mlp":
            return self.body(x.flatten(1))
        x = self.project(x)
        if self.positions is not None:
            x = x + self.positions
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        if self.training:
            return self.final_norm(self.body(x)[:, 0])
        return self.final_norm(encode_first(self.body, x))

    def gamma(self, features: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and rate (fp32) for candidate tokens.

        Args:
            features: ``(P, d)`` from :meth:`features`.
            tokens: ``(P,)`` or ``(P, K)`` candidate ids; only those head rows are computed. Default ``None``:
                every vocabulary row, ``(P, V)``.
        """
        if tokens is None:
            a, r = self.alpha_head(features), self.rate_head(features)
        else:
            squeeze = tokens.ndim == 1
            idx = tokens[:, None] if squeeze else tokens
            a = torch.einsum("pd,pkd->pk", features, F.embedding(idx, self.alpha_head.weight))
            r = torch.einsum("pd,pkd->pk", features, F.embedding(idx, self.rate_head.weight))
            if squeeze:
                a, r = a[:, 0], r[:, 0]
        return F.softplus(a.float()), F.softplus(r.float())

    def forward(self, states: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, rate)`` for hidden states ``(P, N + 1, H)`` and candidates ``tokens`` (see :meth:`gamma`)."""
        return self.gamma(self.features(states), tokens)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write the config and weights to one file (``torch.save``); the LM is not included.

        Args:
            path: The file.
            state_dict: The weights to write. Default ``None``: ``self.state_dict()`` (for a sharded predictor,
                pass the gathered :func:`~lightning_tokens.sharding.full_state_dict`).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = self.state_dict() if state_dict is None else state_dict
        torch.save({"config": asdict(self.config), "state_dict": weights}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "BudgetPredictor":
        """Read a predictor written by :meth:`save`."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        predictor = cls(PredictorConfig(**blob["config"]))
        predictor.load_state_dict(blob["state_dict"])
        return predictor.eval()
