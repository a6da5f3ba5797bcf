"""MTP heads: a model's own multi-token-prediction layers (deepseek_v3, glm4_moe) checked against transformers'
own ``MtpModel`` (its ``forward_layer``), which this package's chain does not call; export_mtp and from_model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import MtpModel

from lightning_tokens.caft import MultiTokenHeads, capture_trunk, head_losses
from lightning_tokens.caft.loss import weighted_sum
from lightning_tokens.caft.mtp import export_mtp
from tests.caft.mtp_twin import MODEL_TYPES, ROWS, noisy, tiny, twin
from tests.tiny import padded_rows


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def reference_losses(model, mtp: MtpModel, rows: list[list[int]], depths: int) -> list[torch.Tensor]:
    """CE_k of every depth, row by row without padding, through MtpModel.forward_layer: depth k at position t
    reads token t + k and is scored against token t + k + 1; CE_k is the mean over every row's targets."""
    total = [torch.zeros(()) for _ in range(depths)]
    count = [0] * depths
    for row in rows:
        x = torch.tensor([row])
        hidden = model(x, output_hidden_states=True).hidden_states[-1]
        previous = hidden
        for i in range(depths):
            k = i + 1
            n = len(row) - k
            if n <= 1:
                break
            positions = torch.arange(k, len(row))[None]
            previous = mtp.forward_layer(i, previous[:, :n], positions, None, input_ids=x[:, k:])
            logits = mtp._project_to_logits(previous[:, : n - 1]).float()
            total[i] = total[i] + F.cross_entropy(logits[0], x[0, k + 1:], reduction="sum")
            count[i] += n - 1
    return [t / c for t, c in zip(total, count)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_mtp_head_losses_match_transformers_mtp_layers_row_by_row(model_type, side):
    model = tiny(model_type)
    heads = noisy(MultiTokenHeads(model, num_heads=3, architecture="mtp"))
    mtp = twin(model, heads)
    ids, mask = padded_rows(ROWS, 10, side)
    with capture_trunk(model, final=True) as holder:
        model(input_ids=ids, attention_mask=mask)
    losses = head_losses(heads, model, holder["trunk"], ids.masked_fill(mask == 0, -100), mask)
    expected = reference_losses(model, mtp, ROWS, 3)
    for got, want in zip(losses, expected):
        torch.testing.assert_close(got.loss, want, rtol=1e-4, atol=1e-5)
    assert [int(item.count) for item in losses] == [sum(len(r) - 1 - k for r in ROWS) for k in (1, 2, 3)]

    # gradients of the heads' weights too, against those of the twin
    weighted_sum(losses, 0.8).backward()
    sum(0.8 ** k * loss for k, loss in enumerate(reference_losses(model, mtp, ROWS, 3), start=1)).backward()
    twin_grads = dict(mtp.layers.named_parameters())
    for name, param in heads.blocks.named_parameters():
        if param.grad is not None and param.grad.abs().sum() > 0:
            torch.testing.assert_close(param.grad, twin_grads[name].grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mtp_depths_are_causal_and_ignore_padding(model_type):
    model = tiny(model_type)
    heads = noisy(MultiTokenHeads(model, num_heads=3, architecture="mtp"))
    ids, mask = padded_rows(ROWS, 10, "left")

    def states(ids):
        with torch.no_grad(), capture_trunk(model, final=True) as holder:
            model(input_ids=ids, attention_mask=mask)
        return list(heads.all_head_states(model, holder["trunk"], mask))

    base = states(ids)
    # the padding's token values change nothing at real positions
    repadded = ids.masked_fill(mask == 0, 33)
    for k, (a, b) in enumerate(zip(base, states(repadded)), start=1):
        real = (mask[:, :-k] & mask[:, k:]).bool()
        torch.testing.assert_close(a[real], b[real])
    # a later token changes depth k only at positions that read it: position t reads tokens up to t + k
    changed = ids.clone()
    changed[2, 7] = (changed[2, 7] + 1) % 60
    for k, (a, b) in enumerate(zip(base, states(changed)), start=1):
        torch.testing.assert_close(a[:2], b[:2])
        torch.testing.assert_close(a[2, : 7 - k], b[2, : 7 - k])
        assert not torch.allclose(a[2, 7 - k], b[2, 7 - k])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_writes_native_layout_read_back_by_transformers(model_type, tmp_path):
    model = tiny(model_type)
    heads = noisy(MultiTokenHeads(model, num_heads=2, architecture="mtp"))
    export_mtp(model, heads, tmp_path)
    config = AutoModelForCausalLM.from_pretrained(tmp_path).config
    assert config.num_mtp_layers == 2
    first = config.num_hidden_layers
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for k in range(2):  # DeepSeek-V3's layout: the depths follow the decoder layers
        for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight"):
            assert f"model.layers.{first + k}.{name}" in keys
        assert f"model.layers.{first + k}.mlp.experts.0.gate_proj.weight" in keys  # experts stored one by one

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = MultiTokenHeads.from_model(loaded)
    assert again.num_heads == 2
    for (name, a), b in zip(heads.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_of_a_sharded_checkpoint_adds_an_mtp_shard_to_the_index(tmp_path):
    import json

    model = tiny("glm4_moe")
    heads = noisy(MultiTokenHeads(model, num_heads=2, architecture="mtp"))
    export_mtp(model, heads, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and index["model.layers.3.eh_proj.weight"] == "model-mtp.safetensors"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in MultiTokenHeads.from_model(loaded).state_dict().items():
        assert torch.equal(tensor, heads.state_dict()[name]), name


def chain_states(mtp: MtpModel, model, row: list[int]) -> list[torch.Tensor]:
    """Every depth's states over one unpadded row, through transformers' MtpModel.forward_layer."""
    x = torch.tensor([row])
    previous = model(x, output_hidden_states=True).hidden_states[-1]
    out = []
    for i in range(len(mtp.layers)):
        k = i + 1
        previous = mtp.forward_layer(i, previous[:, : len(row) - k], torch.arange(k, len(row))[None], None,
                                     input_ids=x[:, k:])
        out.append(previous)
    return out


def test_from_model_needs_a_checkpoint_and_an_mtp_model(tmp_path):
    with pytest.raises(ValueError, match="built from a config"):
        MultiTokenHeads.from_model(tiny("deepseek_v3"))
    with pytest.raises(ValueError, match="num_mtp_layers"):
        MultiTokenHeads(tiny("llama"), architecture="mtp")
    with pytest.raises(ValueError, match="separate_unembedding"):
        MultiTokenHeads(tiny("glm4_moe"), architecture="mtp", separate_unembedding=True)
    model = tiny("glm4_moe")
    model.save_pretrained(tmp_path)  # a checkpoint without MTP weights
    with pytest.raises(ValueError, match="no MTP layers could be read"):
        MultiTokenHeads.from_model(AutoModelForCausalLM.from_pretrained(tmp_path))


@pytest.mark.parametrize("model_type,layers", [("deepseek_v3", 61), ("glm4_moe", 46)])
def test_generate_use_mtp_after_export_equals_greedy(model_type, layers, tmp_path):
    # transformers finds MTP weights by the flagship checkpoints' layer numbers (DeepSeek-V3: 61 decoder layers and
    # one MTP layer; GLM-4.5-Air: 46 and one), so its generate(use_mtp=True) reads one depth of these models
    model = tiny(model_type, num_hidden_layers=layers, hidden_size=16, intermediate_size=32,
                 moe_intermediate_size=8)
    heads = noisy(MultiTokenHeads(model, num_heads=1, architecture="mtp"))
    export_mtp(model, heads, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    mtp = MtpModel.from_pretrained(loaded).eval()  # transformers' own loader, as generate(use_mtp=True) calls it
    row = ROWS[2]
    with torch.no_grad(), capture_trunk(model, final=True) as holder:
        model(input_ids=torch.tensor([row]))
        ours = list(heads.all_head_states(model, holder["trunk"]))
        theirs = chain_states(mtp, loaded, row)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ids = torch.tensor([ROWS[0]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(loaded.generate(use_mtp=True, **kwargs), model.generate(**kwargs))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mtp_depths_on_packed_rows_equal_the_samples_padded(model_type):
    from lightning_tokens.data.packing import batch_samples
    from tests.integration.packed_samples import SAMPLES, packed, padded

    model = tiny(model_type)
    heads = noisy(MultiTokenHeads(model, num_heads=2, architecture="mtp"))

    def losses(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with capture_trunk(model, final=True) as holder:
            model(**{"use_cache": False, **inputs})
        real, segments = batch_samples(batch)
        return head_losses(heads, model, holder["trunk"], batch["labels"], real.long(), segments=segments)

    for got, want in zip(losses(packed(SAMPLES)), losses(padded(SAMPLES, "right"))):
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
        assert int(got.count) == int(want.count) > 0


def test_export_refuses_heads_other_than_mtp(tmp_path):
    model = tiny("glm4_moe")
    with pytest.raises(ValueError, match="the heads are 'resblock' heads"):
        export_mtp(model, MultiTokenHeads(model, num_heads=1, architecture="resblock"), tmp_path)
    assert not any(tmp_path.iterdir())
