"""Independent references the Quiet-STaR tests compare against, shared by several test files.

- :func:`naive_branch`: one position's thought and talk steps by plain full forwards (no passes, no cache);
- :func:`reference_loss`: the Quiet-STaR loss written position by position;
- :func:`dense_reference`: softmax attention over every key at once;
- :func:`cached_parallel_thoughts`: the thought passes on one growing ``DynamicCache`` with 4D masks, the
  implementation :func:`~lightning_tokens.quiet_star.parallel_thoughts` replaced;
- :func:`naive_generate`: thoughtful generation from full forwards of whole sequences.

Plus the tiny float64 module (:func:`make_module`) and batch (:func:`batch`) most of those tests run on.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lightning_tokens.modeling import ModelSpec, cache_keyword, decoder_of
from lightning_tokens.quiet_star import QuietSTaRModule, parallel, parallel_thoughts
from lightning_tokens.quiet_star import module as thoughts_module
from tests.tiny import padded_rows, tiny_config

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


def last_position(lm, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and last hidden state at the last position of one full forward of ``embeds`` (``(L, H)``)."""
    out = lm(inputs_embeds=embeds[None], output_hidden_states=True)
    return out.logits[0, -1], out.hidden_states[-1][0, -1]


def talk_steps(module: QuietSTaRModule, embeds: torch.Tensor, future: torch.Tensor) -> list:
    """Per talk step, the logits and last hidden state after ``embeds`` (a prefix, ``<sot>`` and a thought): step 0
    after ``<eot>``, step s after ``<eot>`` and ``future[:s]``; by plain full forwards."""
    lm = module.lm
    embeds = torch.cat([embeds, module.thought_embeddings.end[None].to(embeds.dtype)])
    talk = [last_position(lm, embeds)]
    for s in range(1, len(future)):
        embeds = torch.cat([embeds, lm.get_input_embeddings()(future[s - 1: s])])
        talk.append(last_position(lm, embeds))
    return talk


def naive_branch(module: QuietSTaRModule, prefix: torch.Tensor, future: torch.Tensor):
    """Greedy thought after ``prefix`` by plain full forwards, then the talk steps on ``future``.

    Returns the thought tokens, the base logits and last hidden state of ``prefix``, and per talk step the
    logits and hidden state (see :func:`talk_steps`).
    """
    lm, te = module.lm, module.thought_embeddings
    embed = lm.get_input_embeddings()
    embeds = embed(prefix)
    base_logits, base_hidden = last_position(lm, embeds)
    embeds = torch.cat([embeds, te.start[None].to(embeds.dtype)])
    thought = []
    for _ in range(THOUGHT_LENGTH):
        logits, _ = last_position(lm, embeds)
        logits[module.forbidden_ids] = float("-inf")
        token = int(logits.argmax())
        thought.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([token]))])
    return thought, (base_logits, base_hidden), talk_steps(module, embeds, future)


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


def dense_reference(query, text_key, text_value, allowed, keys, values, scaling, softcap=None):
    """Softmax attention over every key at once, key/value heads repeated for the query heads (scores soft-capped
    as ``softcap * tanh(scores / softcap)`` before the mask where ``softcap`` is given)."""
    rows, heads, length, _ = query.shape
    n, groups = rows // text_key.shape[0], heads // text_key.shape[1]

    def expand(tensor, repeat_rows):
        tensor = tensor.repeat_interleave(repeat_rows, 0) if repeat_rows > 1 else tensor
        return tensor.repeat_interleave(groups, 1)

    all_keys = torch.cat([expand(text_key, n)] + [expand(k, 1) for k in keys], 2)
    all_values = torch.cat([expand(text_value, n)] + [expand(v, 1) for v in values], 2)
    eye = torch.eye(length, dtype=torch.bool).expand(rows, length, length)
    mask = torch.cat([allowed.repeat_interleave(n, 0)] + [eye] * len(keys), -1)[:, None]
    scores = query @ all_keys.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ all_values


def cached_parallel_thoughts(lm, input_ids, attention_mask, start_embedding, end_embedding, forbidden_ids,
                             n_thoughts, thought_length, n_ahead_talk, temperature=1.0, pad_token_id=0,
                             generator=None, position_ids=None, think_at="all", candidates=None):
    """The passes on one DynamicCache that grows by ``L`` keys per pass, with 4D masks ``[text | I | ... | I]``; a
    layer of sliding window ``W`` reads, from the query at pass ``k`` and position ``i`` (index ``i + k`` of the
    sequence it stands for), the text keys ``j > i + k - W`` and the keys of passes ``p > k - W`` (one mask per
    layer type where the model lists ``config.layer_types``)."""
    assert think_at == "all"  # every position thinks here
    backbone, head, embed = decoder_of(lm), lm.get_output_embeddings(), lm.get_input_embeddings()
    batch, length = input_ids.shape
    n = n_thoughts
    segments = None if position_ids is None else parallel.segment_ids(position_ids)
    positions = parallel.positions_of(attention_mask) if position_ids is None else position_ids
    allowed = parallel.text_mask(attention_mask, segments=segments)
    embeds = embed(input_ids)
    dtype = embeds.dtype
    cache = DynamicCache()
    kinds = getattr(lm.config.get_text_config(decoder=True), "layer_types", None)
    windows = dict(zip(kinds or [None], parallel.layer_windows(lm)))
    index = torch.arange(length)

    def step(inputs, mask, position_ids, pass_index=0):
        def additive(window):
            reach = mask
            if window is not None:
                parts = [index[:, None] + pass_index - index < window]
                parts += [torch.full((length, length), pass_index - p < window) for p in range(1, pass_index + 1)]
                reach = mask & torch.cat(parts, -1)
            return torch.where(reach, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)[:, None]

        masks = {kind: additive(window) for kind, window in windows.items()}
        return backbone(inputs_embeds=inputs, attention_mask=masks if kinds else masks[None], position_ids=position_ids,
                        use_cache=True, **{cache_keyword(backbone): cache}).last_hidden_state

    base_hidden = step(embeds, allowed, positions)
    cache.batch_repeat_interleave(n)
    allowed, positions = allowed.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
    eye = torch.eye(length, dtype=torch.bool).expand(batch * n, length, length)

    def thought_step(inputs, pass_index):
        return step(inputs, torch.cat([allowed, *([eye] * pass_index)], -1), positions + pass_index, pass_index)

    rows, thought_hidden, tokens = batch * n, [], []
    inputs = start_embedding.to(dtype).expand(rows, length, -1)
    for pass_index in range(1, thought_length + 2):
        hidden = thought_step(inputs, pass_index)
        if pass_index > thought_length:
            break
        thought_hidden.append(hidden)
        with torch.no_grad():
            token = parallel.sample_tokens(parallel.forbid(head(hidden), forbidden_ids), temperature, generator)
        tokens.append(token)
        inputs = embed(token)
    pass_index = thought_length + 2
    talk_hidden = [thought_step(end_embedding.to(dtype).expand(rows, length, -1), pass_index)]
    repeated = input_ids.repeat_interleave(n, 0)
    for shift in range(1, n_ahead_talk):
        shifted = torch.nn.functional.pad(repeated[:, shift:], (0, shift), value=pad_token_id)
        talk_hidden.append(thought_step(embed(shifted), pass_index + shift))
    return parallel.ThoughtPasses(base_hidden, thought_hidden, torch.stack(tokens, -1), talk_hidden,
                                  attention_mask, segments)


def loss_and_gradients(module, batch):
    module.zero_grad()
    out = module.quiet_star(*batch, temperature=0.0)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_equal_to_the_growing_cache(monkeypatch, module, batch, loss_atol=1e-10, gradient_tolerance=None):
    """The parallel passes' loss parts and gradients against :func:`cached_parallel_thoughts` on ``batch``: loss parts
    within ``loss_atol``, each gradient within ``gradient_tolerance(expected)`` (default rtol 1e-7, atol 1e-9).
    Returns the growing cache's gradients, for a caller to check which parameters have one."""
    out, grads = loss_and_gradients(module, batch)
    monkeypatch.setattr(thoughts_module, "parallel_thoughts", cached_parallel_thoughts)
    expected, expected_grads = loss_and_gradients(module, batch)
    assert out.mixed_nll > 0 and expected_grads
    for name in ("loss", "base_nll", "mixed_nll", "policy_loss", "reward"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=loss_atol, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, value in expected_grads.items():
        tolerance = gradient_tolerance(value) if gradient_tolerance else dict(rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(grads[name], value, **tolerance, msg=name)
    return expected_grads


@torch.no_grad()
def naive_generate(module: QuietSTaRModule, prompt: list[int], new_tokens: int):
    """Each token from full forwards of ``prompt + emitted [+ <sot> thought <eot>]``; no cache."""
    lm, te, forbidden = module.lm, module.thought_embeddings, module.forbidden_ids
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()

    def last_hidden(embeds):
        return lm(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[-1][0, -1]

    def masked(logits):
        logits = logits.clone()
        logits[forbidden] = float("-inf")
        return logits

    tokens, thoughts = list(prompt), []
    for _ in range(new_tokens):
        text = embed(torch.tensor(tokens))
        base = last_hidden(text)
        embeds = torch.cat([text, te.start[None]])
        thought = []
        for _ in range(THOUGHT_LENGTH):
            token = int(masked(head(last_hidden(embeds))).argmax())
            thought.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
        after = last_hidden(torch.cat([embeds, te.end[None]]))
        w = module.mixing_head.net(torch.cat([base, after]))
        logits = masked((1 - w) * head(base) + w * head(after))  # logits mixing, independent of the code's
        tokens.append(int(logits.argmax()))
        thoughts.append(thought)
    return tokens[len(prompt):], thoughts


def assert_generate_equals_naive(module: QuietSTaRModule, prompts: list[list[int]], new_tokens: int):
    """``module.generate`` on ``prompts`` left-padded into one batch gives each row the tokens and thoughts
    :func:`naive_generate` gives the prompt alone; returns the batch's output."""
    width = max(map(len, prompts))
    ids, mask = padded_rows(prompts, width, "left")
    out = module.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=None, return_thoughts=True)
    for row, prompt in enumerate(prompts):
        tokens, thoughts = naive_generate(module, prompt, new_tokens)
        assert out.sequences[row, width:].tolist() == tokens
        assert out.thoughts[row].tolist() == thoughts
    return out
