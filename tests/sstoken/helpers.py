"""Drivers shared by the ssToken tests: tiny models, one selection forward, a quiet Trainer, small task data."""

from __future__ import annotations

import torch
import yaml

from lightning_tokens.modeling import ModelSpec, load_causal_lm
from tests.tiny import tiny_config

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def build(model_type="llama", **overrides):
    config = tiny_config(model_type, **NO_DROPOUT.get(model_type, {}), **overrides)
    model, _ = load_causal_lm(ModelSpec(config=config))
    return model


def perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def run_selection(selection, model, batch):
    """One training forward with the callback attached; returns (loss, kept positions per sample)."""
    grabbed = {}

    class Grab:
        def reshape_token_loss(self, ctx):
            grabbed["weights"] = ctx.weights.clone()

    selection.attach(model)
    grab = Grab()
    selection.dispatcher.add(grab)
    model.train()
    loss = model(**batch).loss
    selection.dispatcher.remove(grab)
    selection.detach()
    weights = grabbed["weights"]
    kept = [{t + 1 for t in range(weights.shape[1]) if weights[b, t] > 0} for b in range(weights.shape[0])]
    return loss, kept


SMALL_TASK = dict(num_train=24, num_val=4, noise=0.25, noisy_fraction=0.3)


def lora_spec(**extra):
    return ModelSpec(config=tiny_config("llama"), lora=dict(r=4, lora_alpha=8, init_lora_weights=False), **extra)


def write_config(tmp_path, seed):
    with open("lightning_tokens/configs/sstoken/tiny.yaml") as f:
        config = yaml.safe_load(f)
    config["data"]["init_args"]["task"].update(SMALL_TASK, seed=seed)
    config["model"]["init_args"]["model"]["config"] = tiny_config("llama")
    path = tmp_path / f"config{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
