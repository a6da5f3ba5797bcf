"""MtpDrafter: drafting with a model's MTP layers in generate_with_heads, round by round as transformers' own
``MtpModel`` drafts, and decoding that equals greedy ``generate``."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_tokens.caft import MultiTokenHeads, capture_trunk, generate_with_heads, head_losses, mtp_drafter
from lightning_tokens.caft.loss import weighted_sum
from tests.caft.mtp_twin import MODEL_TYPES, ROWS, tiny, twin
from tests.tiny import padded_rows


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def distilled(model_type: str):
    """A tiny model and MTP heads trained briefly on its own greedy continuations of ROWS' first tokens, so that
    decoding accepts some drafts and rejects others."""
    model = tiny(model_type)
    heads = MultiTokenHeads(model, num_heads=3, architecture="mtp")
    prompts = torch.tensor([row[:2] for row in ROWS])
    with torch.no_grad():
        data = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=16,
                              do_sample=False, pad_token_id=0)
        with capture_trunk(model, final=True) as holder:
            model(input_ids=data)
    trunk = holder["trunk"].detach()
    optimizer = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(40):
        loss = weighted_sum(head_losses(heads, model, trunk, data), 0.8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, heads.eval()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_with_mtp_heads_equals_greedy_and_drafts_as_transformers(model_type, monkeypatch):
    model, heads = distilled(model_type)
    mtp = twin(model, heads)
    prompts = [row[:2] for row in ROWS]
    prompts[1] = [3, *prompts[1]]
    ids, mask = padded_rows(prompts, 3, "left")
    rounds = []
    advance = mtp_drafter.MtpDrafter.advance

    def spy(self, trunk, slot_mask, last, positions, generated, finished):
        drafts = advance(self, trunk, slot_mask, last, positions, generated, finished)
        rounds.append(([list(row) for row in generated], list(finished), drafts.tolist()))
        return drafts

    monkeypatch.setattr(mtp_drafter.MtpDrafter, "advance", spy)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    for num_draft in (1, 2, 3):
        rounds.clear()
        got, stats = generate_with_heads(model, heads, ids, mask, max_new_tokens=14, eos_token_id=[],
                                         num_draft=num_draft, pad_token_id=0)
        assert torch.equal(got, reference)
        assert 0 < stats.accepted < stats.drafted
        # every round's drafts are those transformers' MtpModel drafts for the row's tokens so far, from scratch
        for generated, finished, drafts in rounds:
            for b, prompt in enumerate(prompts):
                if finished[b]:
                    continue
                x = torch.tensor([prompt + generated[b]])
                with torch.no_grad():
                    hidden = model(x[:, :-1], output_hidden_states=True).hidden_states[-1]
                    expected, _, _ = mtp(input_ids=x[:, 1:], last_hidden_states=hidden, attention_mask=None,
                                         position_ids=torch.arange(1, x.shape[1])[None], mtp_cache=None)
                assert drafts[b] == expected[0, :num_draft].tolist()
