"""The remaining-length predictor (budget/predictor.py): gathered rows, save and load, eval fast path, body defaults."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.budget import BudgetPredictor, PredictorConfig
from lightning_tokens.budget.predictor import encode_first


@pytest.mark.parametrize("body", ["transformer", "mlp"])
def test_predictor_gathers_only_requested_rows_and_round_trips(tmp_path, body):
    predictor = BudgetPredictor(PredictorConfig(hidden_size=16, num_states=3, vocab_size=40, body=body)).eval()
    states = torch.randn(5, 3, 16)
    tokens = torch.randint(0, 40, (5,))
    full_a, full_r = predictor(states)
    a, r = predictor(states, tokens)
    torch.testing.assert_close(a, full_a.gather(1, tokens[:, None])[:, 0])
    torch.testing.assert_close(r, full_r.gather(1, tokens[:, None])[:, 0])
    k = torch.randint(0, 40, (5, 4))
    torch.testing.assert_close(predictor(states, k)[0], full_a.gather(1, k))
    assert (full_a > 0).all() and (full_r > 0).all()
    loaded = BudgetPredictor.load(predictor.save(tmp_path / "p.pt"))
    torch.testing.assert_close(loaded(states)[0], full_a)
    with pytest.raises(ValueError, match="states of shape"):
        predictor(torch.randn(5, 2, 16))


@pytest.mark.parametrize("body", ["transformer", "bert"])
def test_eval_features_match_the_encoder_modules(body):
    # eval mode runs encode_first (functional ops, CLS-only last layer); train mode runs nn.TransformerEncoder
    predictor = BudgetPredictor(PredictorConfig(hidden_size=16, num_states=3, vocab_size=40, body=body, d_model=32,
                                                heads=4, depth=3, dropout=0.0))
    states = 3 * torch.randn(5, 3, 16)
    modules = predictor.train().features(states)
    torch.testing.assert_close(predictor.eval().features(states), modules, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # against the modules' own eval fast path too
        x = torch.randn(5, 4, 32)
        torch.testing.assert_close(encode_first(predictor.body, x), predictor.body(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_predictor_body_defaults():
    bert = PredictorConfig(hidden_size=64, num_states=5, vocab_size=10, body="bert")
    assert (bert.d_model, bert.depth, bert.heads, bert.dropout, bert.input_norm) == (768, 12, 12, 0.1, False)
    small = PredictorConfig(hidden_size=1536, num_states=29, vocab_size=10)
    assert (small.d_model, small.depth, small.heads) == (512, 2, 8)
    one_layer_bert = BudgetPredictor(PredictorConfig(hidden_size=8, num_states=2, vocab_size=10, body="bert", depth=1))
    assert one_layer_bert.features(torch.randn(2, 2, 8)).shape == (2, 768)
    with pytest.raises(ValueError, match="PredictorConfig.body"):
        PredictorConfig(hidden_size=8, num_states=2, vocab_size=10, body="lstm")
