"""The CPU suite's equality checks again where CUDA computes them: bf16 matmuls, SDPA's fused kernels, bitsandbytes'
4-bit CUDA kernels, the thought passes' chunked attention and decoding on the device.

Every reference is independent of the code under test: transformers' own ``model(labels=...)`` loss and gradients,
the same sample run alone, a sequential re-run of each thought with plain forwards, dense softmax attention,
transformers' greedy ``generate``, and a fresh interpreter that reloads an export with transformers and PEFT only.

Skipped without CUDA. To check their logic on a machine without a GPU (device ``cpu``, bf16 where the check is
about bf16)::

    LT_GPU_TESTS_ON_CPU=1 python -m pytest tests/gpu -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens import CausalLMModule, ModelSpec, OptimizerConfig
from lightning_tokens.caft import generate_with_heads
from lightning_tokens.data.packing import PackedCollator, model_inputs
from lightning_tokens.quiet_star.attention import two_part_attention
from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher
from tests.caft.speculative_cases import MAX_NEW, PROMPTS, early_eos, greedy, noisy_heads
from tests.data.builders import sample, tiny_model
from tests.quiet_star.naive import N_THOUGHTS, TALK, THOUGHT_LENGTH, last_position, make_module, run_passes, talk_steps
from tests.quiet_star.naive import batch as thought_batch
from tests.tiny import padded_rows, tiny_config

ON_CPU = os.environ.get("LT_GPU_TESTS_ON_CPU") == "1"
# Collected everywhere (an import the CPU tests broke shows on every run), run only on CUDA or when asked.
pytestmark = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                reason="CUDA equality check: no CUDA device (LT_GPU_TESTS_ON_CPU=1 runs it on the CPU)")
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    # TF32 would make every float32 comparison a 1e-3 one; a test run before this one may have turned it on.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def on_device(batch: dict) -> dict:
    return {key: value.to(DEVICE) if torch.is_tensor(value) else value for key, value in batch.items()}


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours: dict, theirs: dict, dtype: torch.dtype) -> None:
    """float32: elementwise; bf16: each tensor within 3% of its norm. bf16 keeps 8 bits of mantissa: on a CPU,
    transformers' own bf16 gradients of this model are up to 0.9% (in norm) away from its float64 ones."""
    assert ours.keys() == theirs.keys() and ours
    for name, expected in theirs.items():
        if dtype == BF16:
            gap, size = (ours[name] - expected).norm().item(), expected.norm().item()
            assert gap <= 0.03 * size + 1e-6, (name, gap, size)
        else:
            torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-5, msg=name)


# -- the lean per-token loss against transformers' own loss and gradients ------------------------------------------
VOCAB = 512


def lean_llama(dtype: torch.dtype, tie: bool) -> torch.nn.Module:
    config = AutoConfig.for_model(**tiny_config("llama", vocab_size=VOCAB, tie_word_embeddings=tie))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(DEVICE).train()


def lean_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (12, 7, 9, 10)]
    ids, mask = padded_rows(rows, 12, "right")
    labels = ids.masked_fill((mask == 0) | (mask.cumsum(-1) <= 3), -100)  # the first 3 tokens are the prompt
    return on_device(dict(input_ids=ids, attention_mask=mask, labels=labels))


class ReadsTokenLoss:
    """Reads the per-token loss, which takes the unfused path (losses first, weights after); changes nothing."""

    def reshape_token_loss(self, ctx) -> None:
        assert ctx.token_loss.shape == ctx.target_mask.shape


@pytest.mark.parametrize("handler", [PlainLoss, ReadsTokenLoss], ids=["fused", "per-token"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_lean_loss_and_gradients_equal_transformers_own(dtype, tie, handler):
    model = lean_llama(dtype, tie)
    data = lean_batch()
    expected = model(**data).loss
    expected.backward()
    expected_grads = gradients(model)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_rows.append(out.shape[:-1].numel()))
    dispatcher = TokenLossDispatcher.for_model(model)
    dispatcher.chunk_size = 7  # several chunks: the weight gradient accumulates over them
    dispatcher.add(attached := handler())
    try:
        for _ in range(2):  # the first forward also checks the projection on the last positions
            model.zero_grad(set_to_none=True)
            loss = model(**data).loss
            loss.backward()
            torch.testing.assert_close(loss.float(), expected.float(), rtol=0, atol=1e-5 if dtype != BF16 else 2e-3)
            assert_same_gradients(gradients(model), expected_grads, dtype)
        assert dispatcher.counts["dispatched"] == 2 and head_rows[-1] == 0  # the lean path ran, no full logits
    finally:
        dispatcher.remove(attached)


# -- packing under SDPA ------------------------------------------------------------------------------------------
# bf16: a few units in the last place of logits below 1 (2 ** -8 each); a sample reading its neighbours is off by 0.15
PACKING_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=0, atol=1.5e-2)}
PACKED_ROWS = [[(7, 2, 0), (5, 1, 1), (9, 3, 2)], [(12, 4, 3), (6, 2, 4)]]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_packed_rows_under_sdpa_give_each_sample_its_logits_alone(dtype, model_type):
    model = tiny_model(model_type, "sdpa").to(DEVICE, dtype)
    rows = [[sample(*item) for item in row] for row in PACKED_ROWS]
    batch = on_device(PackedCollator(pad_token_id=0)(rows))
    packed = model(**model_inputs(batch, labels=False)).logits.float()
    # the same rows as one causal sequence each: later samples read earlier ones (the mask is what is tested)
    leaked = model(input_ids=batch["input_ids"]).logits.float()
    leaks = []
    for r, row in enumerate(rows):
        start = 0
        for item in row:
            n = len(item.input_ids)
            alone = model(input_ids=torch.tensor([item.input_ids], device=DEVICE)).logits[0].float()
            torch.testing.assert_close(packed[r, start:start + n], alone, **PACKING_TOLERANCE[dtype])
            if start:
                leaks.append((leaked[r, start:start + n] - alone).abs().max().item())
            start += n
    assert min(leaks) > 5 * PACKING_TOLERANCE[dtype]["atol"], leaks  # a wrong mask would show


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_dispatched_packed_loss_equals_transformers_loss_of_the_padded_samples(dtype):
    model = tiny_model("llama", "sdpa").to(DEVICE, dtype).train()
    samples = [sample(*item) for row in PACKED_ROWS for item in row]
    packed = on_device(PackedCollator(pad_token_id=0)([samples[:3], samples[3:]]))
    packed.pop("use_cache")  # the dispatcher must turn the cache off itself
    width = max(len(s.input_ids) for s in samples)
    ids, mask = padded_rows([s.input_ids for s in samples], width, "right")
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(samples):
        labels[i, :len(s.labels)] = torch.tensor(s.labels)
    expected = model(**on_device(dict(input_ids=ids, attention_mask=mask, labels=labels))).loss
    dispatcher = TokenLossDispatcher.for_model(model)
    dispatcher.add(handler := PlainLoss())
    try:
        loss = model(**packed).loss
        assert dispatcher.counts["dispatched"] == 1
    finally:
        dispatcher.remove(handler)
    torch.testing.assert_close(loss.float(), expected.float(), rtol=0, atol=1e-5 if dtype != BF16 else 1e-2)


# -- QLoRA: nf4 training and its export --------------------------------------------------------------------------
QLORA = dict(quantization="nf4", compute_dtype="bfloat16", lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
STEPS = 12
# The same kernels on the same weights: equal, but for a last-place difference of a bf16 4-bit matmul at most.
SAME_KERNELS = dict(rtol=0, atol=1e-2)

# Runs in a fresh interpreter from another directory: transformers and PEFT only, the device's 4-bit kernels.
RELOAD = textwrap.dedent("""
    import sys, torch
    from peft import AutoPeftModelForCausalLM
    export, ids, device, out = sys.argv[1], torch.tensor(eval(sys.argv[2])), sys.argv[3], sys.argv[4]
    model = AutoPeftModelForCausalLM.from_pretrained(export, device_map={"": device})
    for module in model.modules():  # bitsandbytes' AVX512-BF16 CPU repacking cannot take 32-wide layers
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        torch.save(model.eval()(input_ids=ids.to(device)).logits.cpu(), out)
    assert not [name for name in sys.modules if name.startswith("lightning_tokens")]
""")


def reasoning_batch(tokenizer) -> dict:
    texts = [f"Compute {a} + {b}. <think> {a} + {b} = {a + b} </think> {a + b}" for a, b in
             [(12, 7), (3, 45), (100, 1), (8, 8)]]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return dict(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=labels)


@torch.no_grad()
def eval_loss(model, batch) -> float:
    """transformers' own loss (no dispatcher acts in eval mode)."""
    return model.eval()(**on_device(batch)).loss.item()


class LogitsAtTrainEnd(pl.Callback):
    """The model's eval logits of ``ids`` when training ends, before Lightning moves the module off the device."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.logits = ids, None

    @torch.no_grad()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.eval()
        self.logits = pl_module.model(input_ids=self.ids.to(pl_module.device)).logits.float().cpu()
        pl_module.model.train()


def test_qlora_nf4_trains_and_its_export_reloads_with_transformers_and_peft(tokenizer, tmp_path):
    # A wider initialisation than the default: through a default tiny model's frozen head, LoRA barely moves the loss
    module = CausalLMModule(model=ModelSpec(config=tiny_config(initializer_range=0.2), **QLORA), max_new_tokens=2,
                            optimizer=OptimizerConfig(lr=1e-2, warmup=0, schedule="constant"))
    layers = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.device.type == DEVICE.type for layer in layers)
    batch = reasoning_batch(tokenizer)
    ids = batch["input_ids"][:2]
    before = eval_loss(module.model, batch)
    at_train_end = LogitsAtTrainEnd(ids)
    trainer = pl.Trainer(accelerator=DEVICE.type, devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[at_train_end])
    trainer.fit(module, DataLoader([batch] * STEPS, batch_size=None))
    module.to(DEVICE)  # Lightning moves the module to the CPU when fit ends: the 4-bit weights go there and back
    assert all(layer.weight.device.type == DEVICE.type for layer in layers)
    after = eval_loss(module.model, batch)
    assert trainer.global_step == STEPS and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in module.model.parameters() if p.requires_grad)
    assert after < 0.7 * before, (before, after)

    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids.to(DEVICE)).logits.float().cpu()
        torch.testing.assert_close(expected, at_train_end.logits, **SAME_KERNELS)
        with module.model.disable_adapter():
            base = module.model(input_ids=ids.to(DEVICE)).logits.float().cpu()
    module.export(tmp_path / "qlora")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    device = "cuda:0" if DEVICE.type == "cuda" else "cpu"
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "qlora"), json.dumps(ids.tolist()), device,
                             str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(tmp_path / "logits.pt").float()
    torch.testing.assert_close(reloaded, expected, **SAME_KERNELS)
    assert (expected - base).abs().max() > 0.5  # the trained adapters matter far beyond the tolerance


# -- Quiet-STaR: the parallel passes against a sequential re-run of every thought ----------------------------------
THOUGHT_TOLERANCE = {torch.float64: dict(rtol=1e-5, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def sequential_branch(module, prefix: torch.Tensor, thought: list[int], future: torch.Tensor):
    """The thought ``thought`` after ``prefix``, re-run with one plain full forward per token, then the talk steps on
    ``future``: the logits each thought token was chosen from, the base logits and hidden state, and per talk step
    the logits and hidden state (step 0 after ``<eot>``, step s after ``future[:s]``)."""
    lm, te = module.lm, module.thought_embeddings
    embed = lm.get_input_embeddings()
    embeds = embed(prefix)
    base = last_position(lm, embeds)
    embeds = torch.cat([embeds, te.start[None].to(embeds.dtype)])
    chosen_from = []
    for token in thought:
        chosen_from.append(last_position(lm, embeds)[0])
        embeds = torch.cat([embeds, embed(torch.tensor([token], device=prefix.device))])
    return chosen_from, base, talk_steps(module, embeds, future)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@torch.no_grad()
def test_parallel_thoughts_equal_a_sequential_rerun_of_each_thought(dtype, model_type):
    module = make_module(model_type, "sdpa").to(DEVICE, dtype).eval()
    tolerance = THOUGHT_TOLERANCE[dtype]
    ids, mask = (t.to(DEVICE) for t in thought_batch())
    passes = run_passes(module, ids, mask)
    head = module.lm.get_output_embeddings()
    compared = 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            future = ids[b, i + 1: min(length, i + TALK + 1)]
            for k in range(N_THOUGHTS):
                row = b * N_THOUGHTS + k
                thought = passes.thought_tokens[row, i].tolist()
                assert len(thought) == THOUGHT_LENGTH
                chosen_from, (base_logits, _), talk = sequential_branch(module, ids[b, : i + 1], thought, future)
                torch.testing.assert_close(head(passes.base_hidden[b, i]), base_logits, **tolerance)
                for token, logits in zip(thought, chosen_from):  # greedy: each token the argmax, up to rounding
                    logits[module.forbidden_ids] = float("-inf")
                    assert logits[token] >= logits.max() - tolerance["atol"], (b, i, k)
                for s, (logits, hidden) in enumerate(talk):
                    torch.testing.assert_close(head(passes.talk_hidden[s][row, i]), logits, **tolerance)
                    torch.testing.assert_close(passes.talk_hidden[s][row, i], hidden, **tolerance)
                compared += len(talk)
    assert compared > 40


def dense_attention(query, text_key, text_value, allowed, keys, values, scaling):
    """Softmax over ``[text keys | every pass's key at the query's own position]`` in one matrix."""
    rows, heads, length, _ = query.shape
    n, groups = rows // text_key.shape[0], heads // text_key.shape[1]

    def expand(tensor, repeat_rows):
        return tensor.repeat_interleave(repeat_rows, 0).repeat_interleave(groups, 1)

    all_keys = torch.cat([expand(text_key, n)] + [expand(k, 1) for k in keys], 2)
    all_values = torch.cat([expand(text_value, n)] + [expand(v, 1) for v in values], 2)
    own = torch.eye(length, dtype=torch.bool, device=query.device).expand(rows, length, length)
    mask = torch.cat([allowed.repeat_interleave(n, 0)] + [own] * len(keys), -1)[:, None]
    scores = (query @ all_keys.transpose(-1, -2) * scaling).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ all_values


@pytest.mark.parametrize("chunk", [3, 256])
def test_thought_attention_and_its_gradients_equal_dense_attention(chunk):
    generator = torch.Generator().manual_seed(0)
    batch, n, kv_heads, groups, length, dim, passes = 2, 2, 2, 3, 9, 8, 3

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE).requires_grad_()

    query = rand(batch * n, kv_heads * groups, length, dim)
    text_key, text_value = rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
    keys = [rand(batch * n, kv_heads, length, dim) for _ in range(passes)]
    values = [rand(batch * n, kv_heads, length, dim) for _ in range(passes)]
    allowed = (torch.rand(batch, length, length, generator=generator) > 0.4).to(DEVICE)
    allowed[0, 2] = False  # a query reading no text key: its own window still holds keys
    inputs = [query, text_key, text_value, *keys, *values]
    out = two_part_attention(query, text_key, text_value, allowed, keys, values, 0.5, chunk)
    expected = dense_attention(query, text_key, text_value, allowed, keys, values, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# -- CAFT: self-speculative decoding against greedy generate -------------------------------------------------------
@pytest.mark.parametrize("model_type,architecture", [("llama", "layer"), ("llama", "resblock"), ("gpt2", "layer")])
@torch.no_grad()
def test_speculative_decoding_equals_greedy_generate(model_type, architecture):
    model, heads = noisy_heads(model_type, architecture)
    model, heads = model.to(DEVICE), heads.to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in padded_rows(PROMPTS, 6, "left"))
    eos, early_row = early_eos(model, ids, mask)
    reference = greedy(model, ids, mask, eos)
    got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                     pad_token_id=0)
    assert got.device.type == DEVICE.type and torch.equal(got, reference)
    assert 0 < stats.accepted < stats.drafted  # not vacuous: some drafts kept, some rejected
    assert stats.row_new_tokens[early_row] < MAX_NEW
    for b in range(len(PROMPTS)):  # every row alone decodes the same tokens
        alone, _ = generate_with_heads(model, heads, ids[b: b + 1], mask[b: b + 1], max_new_tokens=MAX_NEW,
                                       eos_token_id=eos)
        new = got[b, ids.shape[1]: ids.shape[1] + stats.row_new_tokens[b]]
        assert torch.equal(alone[0], torch.cat([torch.tensor(PROMPTS[b], device=DEVICE), new]))
