"""ConceptAwareFineTuning (CAFT stage 2) in real Trainer runs: the loss on a user's module against an independent
computation, LoRA, QLoRA, checkpoint resume, argument checks and the configs that use it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_tokens.caft import ConceptAwareFineTuning, MultiTokenHeads, capture_trunk
from lightning_tokens.modeling import ModelSpec, load_causal_lm
from lightning_tokens.optim import OptimizerConfig
from lightning_tokens.sft import CausalLMModule
from tests.caft.builders import UserModule, task_data, user_batch
from tests.tiny import tiny_config, trainer

ROOT = Path(__file__).resolve().parents[2]


VOCAB = 60


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)  # tiny random models carry denormal weights: slow CPU matmuls otherwise
    yield
    torch.set_flush_denormal(False)


def perturbed_heads(model, path, scale=0.05, **kwargs):
    heads = MultiTokenHeads(model, **kwargs)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(scale * torch.randn_like(p))
    heads.save(path)
    return heads


# -- stage 2 on a user's own LightningModule ----------------------------------------------------------------
def user_module():
    sizes = tiny_config("llama")
    sizes.pop("model_type")
    return UserModule(AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=VOCAB, **sizes)))


def naive_caft_loss(model, heads, batch, beta, gamma, s):
    """CE_0 + sum_k beta gamma^k s CE_k from stacked full logits, written independently of the library."""
    with torch.no_grad(), capture_trunk(model) as holder:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        all_logits = [logits, *heads(model, holder["trunk"], batch["attention_mask"])]
    labels = batch["labels"]
    total = 0.0
    for k, head_logits in enumerate(all_logits):
        shift = 1 + k
        ce = F.cross_entropy(head_logits[:, :-shift].reshape(-1, VOCAB), labels[:, shift:].reshape(-1),
                             ignore_index=-100)
        total = total + (ce if k == 0 else beta * gamma ** k * s * ce)
    return total


def test_stage2_loss_on_a_user_module_equals_independent_computation(tmp_path):
    module = user_module()
    heads = perturbed_heads(module.net, tmp_path / "heads").eval()
    reference = copy.deepcopy(module.net).eval()
    batch = user_batch(VOCAB)
    callback = ConceptAwareFineTuning(heads_path=str(tmp_path / "heads"), beta=0.5)
    trainer(max_steps=2, callbacks=[callback]).fit(module, DataLoader([batch, batch], batch_size=None))
    assert len(module.seen) == 2
    for step, seen in enumerate(module.seen):
        s = math.sin(math.pi / 2 * (1 - step / 2))  # rsine at p = step / total_steps
        torch.testing.assert_close(seen, naive_caft_loss(reference, heads, batch, 0.5, 0.8, s))
    assert isinstance(module.caft_heads, MultiTokenHeads)  # on the module side: device, optimizer, checkpoint
    assert not any(p.requires_grad for p in module.caft_heads.parameters())  # frozen by default, as in the paper
    assert not module.net._forward_hooks and not module.net._forward_pre_hooks  # removed at teardown
    assert callback.total_steps == 2


# -- stage 2 on CausalLMModule: LoRA, QLoRA, export, checkpoints --------------------------------------------
def lora_spec(**kwargs):
    return ModelSpec(config=tiny_config("llama"), lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, **kwargs)


def test_stage2_under_lora_freezes_heads_feeds_adapters_and_exports_plain_model(tmp_path):
    module = CausalLMModule(model=lora_spec(), optimizer=OptimizerConfig(lr=1e-2, warmup=0), max_new_tokens=0)
    heads = perturbed_heads(module.model, tmp_path / "heads")
    callback = ConceptAwareFineTuning(heads_path=str(tmp_path / "heads"), beta=1.0)
    run = trainer(max_steps=2, log_every_n_steps=1, callbacks=[callback])
    run.fit(module, datamodule=task_data())
    assert all(not p.requires_grad for p in module.caft_heads.parameters())
    for name, tensor in module.caft_heads.state_dict().items():
        assert torch.equal(tensor, heads.state_dict()[name]), name
    logged = {"train/caft_loss", "train/caft_head4_loss", "train/caft_head4_acc", "train/caft_schedule"}
    assert logged <= set(run.logged_metrics)

    # the auxiliary gradient reaches the adapters through the frozen heads
    data = task_data()
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grads = {}
    for beta in (0.0, 1.0):
        callback = ConceptAwareFineTuning(heads_path=str(tmp_path / "heads"), beta=beta, schedule="constant")
        callback.setup(run, module, "fit")
        module.zero_grad()
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss.backward()
        grads[beta] = [p.grad.clone() for n, p in module.named_parameters() if "lora_A" in n]
        assert all(p.grad is None for p in module.caft_heads.parameters())
        callback.teardown(run, module, "fit")
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[1.0]))

    module.export(tmp_path / "export")
    exported = "".join(p.name for p in (tmp_path / "export").iterdir())
    from safetensors.torch import load_file

    assert "adapter_model.safetensors" in exported
    assert not any("caft" in key for key in load_file(tmp_path / "export" / "adapter_model.safetensors"))


def test_stage2_under_nf4_qlora_runs_with_heads_saved_from_the_unquantized_base(tmp_path):
    plain, _ = load_causal_lm(ModelSpec(config=tiny_config("llama", intermediate_size=64)))
    perturbed_heads(plain, tmp_path / "heads")
    module = CausalLMModule(model=lora_spec(quantization="nf4"), optimizer=OptimizerConfig(lr=1e-2, warmup=0),
                            max_new_tokens=0)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    before = [p.detach().clone() for n, p in module.named_parameters() if "lora_B" in n]
    trainer(max_steps=2, callbacks=[ConceptAwareFineTuning(heads_path=str(tmp_path / "heads")), Record()]).fit(
        module, datamodule=task_data())
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    after = [p.detach() for n, p in module.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    # heads built straight from the quantized model copy its dequantized last layer
    fresh = MultiTokenHeads(module.model, num_heads=1)
    reference = plain.model.layers[-1].self_attn.q_proj.weight
    torch.testing.assert_close(fresh.blocks[0].self_attn.q_proj.weight, reference, atol=0.02, rtol=0.2)


def test_heads_and_schedule_state_survive_checkpoint_resume(tmp_path):
    def build():
        module = CausalLMModule(model=ModelSpec(config=tiny_config("llama")),
                                optimizer=OptimizerConfig(lr=1e-2, warmup=0), max_new_tokens=0)
        return module, ConceptAwareFineTuning(heads_path=str(tmp_path / "heads"), schedule="linear", train_heads=True)

    module, callback = build()
    perturbed_heads(module.model, tmp_path / "heads")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first_run = trainer(max_steps=3, callbacks=[callback, checkpoint], enable_checkpointing=True)
    first_run.fit(module, datamodule=task_data())
    trained = copy.deepcopy(module.caft_heads.state_dict())
    initial = MultiTokenHeads.load(tmp_path / "heads", module.model).state_dict()
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)  # train_heads=True trained them

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["heads"] = copy.deepcopy(pl_module.caft_heads.state_dict())
            seen["total"], seen["step"] = resumed.total_steps, resumed.step

    module, resumed = build()
    trainer(max_steps=4, callbacks=[resumed, Probe()]).fit(module, datamodule=task_data(),
                                                           ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                                                           weights_only=True)
    for name, tensor in seen["heads"].items():
        assert torch.equal(tensor, trained[name]), name
    assert seen["total"] == 3 and seen["step"] == 2  # the schedule keeps the first run's length
    assert resumed.schedule_weight == 1.0  # linear, p = 3 / 3

    # without the callback (inference, export) the checkpoint loads strictly: the heads are left out
    plain = CausalLMModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not hasattr(plain, "caft_heads")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], msg=name)


def test_callback_rejects_bad_arguments():
    for kwargs, field in [({"beta": -1.0}, "beta"), ({"gamma": 0.0}, "gamma"), ({"schedule": "cosine"}, "schedule"),
                          ({"chunk_size": 0}, "chunk_size")]:
        with pytest.raises(ValueError, match=field):
            ConceptAwareFineTuning(**kwargs)


# -- configs --------------------------------------------------------------------------------------------------
def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_configs_run_stage1_then_stage2_through_the_cli(tmp_path):
    from lightning_tokens.cli import build_cli

    heads_dir = str(tmp_path / "heads")
    stage1 = yaml.safe_load((ROOT / "lightning_tokens/configs/caft/heads-tiny.yaml").read_text())
    stage1["model"]["init_args"]["heads_path"] = heads_dir
    stage2 = yaml.safe_load((ROOT / "lightning_tokens/configs/caft/tiny.yaml").read_text())
    [caft] = [c for c in stage2["trainer"]["callbacks"] if c["class_path"].endswith("ConceptAwareFineTuning")]
    caft["init_args"]["heads_path"] = heads_dir
    for config in (stage1, stage2):
        config["data"]["init_args"]["task"].update(num_train=16, num_val=4)
        config["trainer"].pop("logger", None)
        config["trainer"]["default_root_dir"] = str(tmp_path)
        config.pop("checkpoint", None)
        if "max_new_tokens" in config["model"]["init_args"]:
            config["model"]["init_args"]["max_new_tokens"] = 0  # no generation-based validation here
    common = ["--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]
    build_cli(["fit", "--config", str(_write(stage1, tmp_path / "s1.yaml")), *common])
    assert (tmp_path / "heads" / "heads.safetensors").is_file()
    cli = build_cli(["fit", "--config", str(_write(stage2, tmp_path / "s2.yaml")), *common])
    assert isinstance(cli.model.caft_heads, MultiTokenHeads)


@pytest.mark.parametrize("name", ["qwen2.5-1.5b.yaml", "glm-4.5-air-mtp.yaml"])
def test_gpu_hub_config_names_real_classes_and_arguments(name):
    import importlib
    import inspect

    config = yaml.safe_load((ROOT / "lightning_tokens/configs/caft" / name).read_text())
    entries = [config["model"], config["data"], *config["trainer"]["callbacks"]]
    for entry in entries:
        module_name, _, name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls.__init__).parameters
        assert set(entry.get("init_args", {})) <= set(parameters), entry["class_path"]
    assert config["model"]["init_args"]["model"]["quantization"] == "nf4"


def test_missing_heads_fail_unless_fresh_heads_are_allowed(tmp_path):
    module = user_module()
    with pytest.raises(FileNotFoundError, match="heads"):
        ConceptAwareFineTuning(heads_path=str(tmp_path / "none")).setup(None, module, "fit")
    assert not module.net._forward_hooks and not hasattr(module, "caft_heads")  # nothing left behind
    callback = ConceptAwareFineTuning(heads_path=str(tmp_path / "none"), require_heads=False, num_heads=2)
    with pytest.warns(UserWarning, match="untrained"):
        callback.setup(None, module, "fit")
    assert module.caft_heads.num_heads == 2
    callback.teardown(None, module, "fit")
