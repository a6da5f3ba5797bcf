"""Quiet-STaR core: the parallel thought passes against naive sequential generation, and every loss part
against an independent computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import padded_rows, tiny_config
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.quiet_star import QuietSTaRModule, next_token_targets, parallel_thoughts, quiet_star_loss
from lightning_tokens.quiet_star.parallel import sample_tokens

THOUGHT_LENGTH, TALK, N_THOUGHTS = 3, 3, 2


# float64 models; eager attention takes its softmax in float32 (transformers), hence the tolerance
TOL = dict(rtol=1e-5, atol=1e-6)


def make_module(model_type: str = "llama", attn: str = "sdpa", **kwargs) -> QuietSTaRModule:
    spec = ModelSpec(config=tiny_config(model_type), attn_implementation=attn, dtype="float64")
    options = dict(thought_length=THOUGHT_LENGTH, n_ahead_talk=TALK, n_thoughts=N_THOUGHTS)
    module = QuietSTaRModule(spec, **{**options, **kwargs})
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero mixing head, so the mixed prediction differs from the base one
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    return module.double()


def batch(vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    ids[1, 6:] = 0
    return ids, mask


def run_passes(module: QuietSTaRModule, ids, mask, temperature: float = 0.0, generator=None):
    te = module.thought_embeddings
    return parallel_thoughts(module.lm, ids, mask, te.start, te.end, module.forbidden_ids, N_THOUGHTS,
                             THOUGHT_LENGTH, TALK, temperature=temperature, generator=generator)


def naive_branch(module: QuietSTaRModule, prefix: torch.Tensor, future: torch.Tensor):
    """Greedy thought after ``prefix`` by plain full forwards, then the talk steps on ``future``.

    Returns the thought tokens, the base logits and last hidden state of ``prefix``, and per talk step the
    logits and hidden state (step 0 after ``<eot>``, step s after ``future[:s]``).
    """
    lm, te = module.lm, module.thought_embeddings
    embed = lm.get_input_embeddings()

    def forward(embeds):
        out = lm(inputs_embeds=embeds[None], output_hidden_states=True)
        return out.logits[0, -1], out.hidden_states[-1][0, -1]

    embeds = embed(prefix)
    base_logits, base_hidden = forward(embeds)
    embeds = torch.cat([embeds, te.start[None].to(embeds.dtype)])
    thought = []
    for _ in range(THOUGHT_LENGTH):
        logits, _ = forward(embeds)
        logits[module.forbidden_ids] = float("-inf")
        token = int(logits.argmax())
        thought.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([token]))])
    embeds = torch.cat([embeds, te.end[None].to(embeds.dtype)])
    talk = [forward(embeds)]
    for s in range(1, len(future)):
        embeds = torch.cat([embeds, embed(future[s - 1: s])])
        talk.append(forward(embeds))
    return thought, (base_logits, base_hidden), talk


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
@torch.no_grad()
def test_parallel_thoughts_equal_naive_sequential_generation(model_type, attn):
    module = make_module(model_type, attn).eval()
    ids, mask = batch()
    passes = run_passes(module, ids, mask)
    head = module.lm.get_output_embeddings()
    compared = 0
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            future = ids[b, i + 1: min(length, i + TALK)]  # the true tokens the talk steps read
            thought, (base_logits, base_hidden), talk = naive_branch(module, ids[b, : i + 1],
                                                                     ids[b, i + 1: min(length, i + TALK + 1)])
            torch.testing.assert_close(head(passes.base_hidden[b, i]), base_logits, **TOL)
            for k in range(N_THOUGHTS):
                row = b * N_THOUGHTS + k
                assert passes.thought_tokens[row, i].tolist() == thought, (b, i, k)
                for s, (logits, hidden) in enumerate(talk):
                    torch.testing.assert_close(head(passes.talk_hidden[s][row, i]), logits, **TOL)
                    torch.testing.assert_close(passes.talk_hidden[s][row, i], hidden, **TOL)
            compared += 1 + len(future)
    assert compared > 20


def test_thought_sampling_is_an_exact_sample_of_the_softmax():
    """Gumbel-max sampling at temperature t matches softmax(logits / t); temperature 0 is the argmax."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1.0, 2.0):
        draws = sample_tokens(logits.expand(40000, -1), temperature, generator)
        frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
        probs = (logits / temperature).softmax(-1).double()
        assert frequencies[4] == 0
        assert torch.all((frequencies - probs).abs() <= 5 * (probs * (1 - probs) / draws.numel()).sqrt() + 1e-9)
    assert sample_tokens(logits.expand(3, -1), 0.0).tolist() == [0, 0, 0]


def reference_loss(module, passes, ids, mask, targets, base_weight, policy_weight, temperature, chosen=None):
    """The Quiet-STaR loss written position by position, mixing logits (not hidden states); with ``chosen``
    (``(B, L)`` bool), only the branches at chosen positions think (every target still counts in the base NLL)."""
    head, forbidden = module.lm.get_output_embeddings(), module.forbidden_ids
    n, batch_size, length = N_THOUGHTS, ids.shape[0], ids.shape[1]

    def logits_of(hidden):
        logits = head(hidden).clone()
        logits[..., forbidden] = float("-inf")
        return logits

    base_logits = logits_of(passes.base_hidden)
    base_lp = base_logits.log_softmax(-1)
    base_terms, mixed_terms = [], {s: [] for s in range(TALK)}
    rewards = {}
    weights = []
    for b in range(batch_size):
        for i in range(length):
            if targets[b, i] >= 0:
                base_terms.append(-base_lp[b, i, targets[b, i]])
            if not mask[b, i] or (chosen is not None and not chosen[b, i]):
                continue  # a branch at a padding position (or one not chosen) is no thought
            for k in range(n):
                row = b * n + k
                total, complete = 0.0, True
                for s in range(TALK):
                    j = i + s
                    if j >= length or targets[b, j] < 0:
                        complete = False
                        continue
                    hb, ht = passes.base_hidden[b, j], passes.talk_hidden[s][row, i]
                    w = module.mixing_head.net(torch.cat([hb, ht]))[0]
                    weights.append(w)
                    mixed = (1 - w) * head(hb) + w * head(ht)  # mixing logits; delimiters masked after
                    mixed[forbidden] = float("-inf")
                    lp = mixed.log_softmax(-1)[targets[b, j]]
                    mixed_terms[s].append(-lp)
                    total = total + lp - base_lp[b, j, targets[b, j]]
                if complete:
                    rewards[(b, k, i)] = total
    base_nll = torch.stack(base_terms).mean()
    mixed_nll = torch.stack([torch.stack(v).mean() for v in mixed_terms.values() if v]).mean()
    policy_terms = []
    for (b, k, i), r in rewards.items():
        others = [rewards[(b, kk, i)] for kk in range(n)]
        advantage = max(0.0, float(r - sum(others) / n))
        row = b * n + k
        for step in range(THOUGHT_LENGTH):
            lp = (logits_of(passes.thought_hidden[step][row, i]) / temperature).log_softmax(-1)
            policy_terms.append(-advantage * lp[passes.thought_tokens[row, i, step]])
    policy = torch.stack(policy_terms).mean() if policy_terms else torch.zeros(())
    nll = base_weight * base_nll + (1 - base_weight) * mixed_nll
    mean_reward = torch.stack(list(rewards.values())).mean()
    return dict(base_nll=base_nll, mixed_nll=mixed_nll, nll=nll, policy_loss=policy,
                loss=nll + policy_weight * policy, reward=mean_reward, mixing_weight=torch.stack(weights).mean())


@pytest.mark.parametrize("labels", [False, True])
def test_loss_parts_equal_an_independent_computation(labels):
    module = make_module(base_loss_weight=0.3, policy_weight=7.0)
    ids, mask = batch()
    label_ids = ids.masked_fill(mask == 0, -100)
    if labels:
        label_ids[:, :3] = -100  # a prompt
        module.train_on = "labels"
    generator = torch.Generator().manual_seed(5)
    passes = run_passes(module, ids, mask, temperature=1.0, generator=generator)
    targets = next_token_targets(ids, mask, label_ids if labels else None)
    out = quiet_star_loss(passes, module.lm.get_output_embeddings(), module.mixing_head, targets,
                          module.forbidden_ids, N_THOUGHTS, base_loss_weight=0.3, policy_weight=7.0,
                          reinforce_temperature=3.0)
    with torch.no_grad():
        expected = reference_loss(module, passes, ids, mask, targets, 0.3, 7.0, 3.0)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).detach(), value.detach().to(getattr(out, name).dtype),
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert out.policy_loss.abs() > 0 and out.reward.abs() > 0  # the check is not vacuous


def test_targets_and_difficult_tokens():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, 8, -100, -100], [6, 7, 8, 9, -100]]
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 6, 7, 8, 9]])
    assert next_token_targets(ids, mask, labels).tolist() == [[-100, 7, 8, -100, -100], [6, 7, 8, 9, -100]]
    module = make_module()
    ids, mask = batch()
    passes = run_passes(module, ids, mask)
    targets = next_token_targets(ids, mask)
    out = quiet_star_loss(passes, module.lm.get_output_embeddings(), module.mixing_head, targets,
                          module.forbidden_ids, N_THOUGHTS, difficult_fraction=0.25)
    with torch.no_grad():
        logits = module.lm.get_output_embeddings()(passes.base_hidden).clone()
        logits[..., module.forbidden_ids] = float("-inf")
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        values = ce[targets.flatten() >= 0]
        k = math.ceil(0.25 * values.numel())
        torch.testing.assert_close(out.difficult_base_nll, values.sort(descending=True).values[:k].mean().float())
    assert out.difficult_base_nll >= out.base_nll


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_and_right_padding_give_the_same_loss_and_gradients(attn):
    # Rows of 3 and 4 tokens are shorter than a thought window (thought_length + 2 = 5) and than the talk steps.
    module = make_module(attn=attn)
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 3, 6, 4)]
    results = {}
    for side in ("right", "left"):
        module.zero_grad()
        out = module.quiet_star(*padded_rows(rows, 10, side), temperature=0.0)  # greedy thoughts: the same on both
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        results[side] = (out.metrics(), grads)
    (right, right_grads), (left, left_grads) = results["right"], results["left"]
    assert right["mixed_nll"] > 0 and right["reward"] != 0
    for name in right:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=1e-6, msg=name)
    assert right_grads.keys() == left_grads.keys() and right_grads
    for name in right_grads:
        torch.testing.assert_close(left_grads[name], right_grads[name], rtol=0, atol=1e-6, msg=name)


def test_short_samples_and_padding_rows_give_finite_loss_and_grads():
    module = make_module()
    ids = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    for rows in (slice(0, 2), slice(0, 3)):  # only short/empty rows, then with a full one
        module.zero_grad()
        out = module.quiet_star(ids[rows], mask[rows])
        out.loss.backward()
        assert all(torch.isfinite(v) for v in out.metrics().values()), out.metrics()
        for name, parameter in module.named_parameters():
            if parameter.grad is not None:
                assert torch.isfinite(parameter.grad).all(), name


def test_mixing_head_starts_from_the_base_model_and_delimiters_from_dashes(tokenizer):
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), thought_length=2, n_ahead_talk=2)
    assert torch.count_nonzero(module.mixing_head.net[-1].weight) == 0
    dash = tokenizer("---", add_special_tokens=False)["input_ids"][0]
    embedding = module.lm.get_input_embeddings().weight
    torch.testing.assert_close(module.thought_embeddings.start, embedding[dash])
    torch.testing.assert_close(module.thought_embeddings.end, embedding[dash])
    torch.testing.assert_close(module.thought_embeddings.scaled[0], embedding[dash] / 100)
    ids = torch.randint(3, 300, (2, 7))
    out = module.quiet_star(ids, torch.ones_like(ids))
    assert out.mixing_weight == 0 and out.reward.abs() < 1e-6 and out.policy_loss == 0
    delimiters = [module.start_id, module.end_id]
    assert module.tokenizer.convert_ids_to_tokens(delimiters) == ["<|startthought|>", "<|endthought|>"]
    decoded = module.tokenizer.decode([module.start_id, 5, module.end_id], skip_special_tokens=True)
    assert decoded == module.tokenizer.decode([5])


def test_thought_embeddings_train_at_the_scaled_rate():
    """One Adam step moves each embedding entry by lr * scale (Adam's first step is lr * sign(grad))."""
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), thought_length=2, n_ahead_talk=2)
    with torch.no_grad():  # with the initial zero mixing head nothing depends on the thought yet
        torch.nn.init.normal_(module.mixing_head.net[-1].weight, std=0.5)
    optimizer = torch.optim.Adam(module.thought_embeddings.parameters(), lr=1e-4)
    before = module.thought_embeddings().detach().clone()
    ids = torch.randint(3, 300, (2, 7))
    module.quiet_star(ids, torch.ones_like(ids)).loss.backward()
    grad = module.thought_embeddings.scaled.grad
    optimizer.step()
    change = (module.thought_embeddings().detach() - before).abs()
    moved = grad.abs() > 1e-6
    assert moved.any()
    torch.testing.assert_close(change[moved], torch.full_like(change[moved], 1e-4 * 100), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("n_thoughts", 0, "n_thoughts"), ("thought_length", 0, "thought_length"), ("n_ahead_talk", 0, "n_ahead_talk"),
    ("base_loss_weight", 1.5, "base_loss_weight"), ("train_on", "prompt", "train_on"),
    ("thought_init", "", "thought_init"),
])
def test_bad_arguments_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama")), **{field: value})


def test_clear_errors_for_flash_attention_and_gradient_checkpointing():
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama"), gradient_checkpointing=True))
    with pytest.raises(ValueError, match="flash_attention_2"):
        QuietSTaRModule(ModelSpec(config=tiny_config("llama"), attn_implementation="flash_attention_2"))
    module = QuietSTaRModule(ModelSpec(config=tiny_config("llama")), thought_length=1, n_ahead_talk=1)
    enable = getattr(module.lm, "activation_checkpointing_enable", None) or module.lm.gradient_checkpointing_enable
    enable()
    ids = torch.randint(3, 300, (1, 4))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        module.quiet_star(ids, torch.ones_like(ids))
