"""Sharded training (FSDP2 under ModelParallelStrategy) with two CPU processes (gloo), against one process.

Each sharded run records the batch every rank trained on and its loss; the test replays those batches in one
process (the two ranks' mean loss per step, which is what FSDP2's averaged gradients optimise) and compares the
losses and the final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
# Quiet-STaR thinks greedily here, so that every process draws the same thoughts.
QUIET_STAR = dict(n_thoughts=2, thought_length=2, n_ahead_talk=2, policy_weight=1.0, thought_temperature=0.0,
                  max_new_tokens=0)


def selection_options(options: dict) -> dict:
    """TokenSelection's arguments in a run's (JSON) options, a Rho-1 ``reference`` given as ModelSpec fields."""
    from lightning_tokens.modeling import ModelSpec

    arguments = dict(options.get("selection", {}))
    if "reference" in arguments:
        arguments["reference"] = ModelSpec(**arguments["reference"])
    return arguments


def prompts(pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts and their mask."""
    return torch.tensor([[5, 6, 7, 8], [pad_token_id, 9, 10, 11]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning_tokens import CausalLMModule, ReasoningTask, SFTDataModule
    from lightning_tokens.modeling import ModelSpec
    from lightning_tokens.optim import OptimizerConfig

    torch.set_flush_denormal(True)


    class Record(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = {k: float(v) for c in trainer.callbacks for k, v in getattr(c, "metrics", {}).items()}
            self.seen.append({"batch": {k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)},
                              "loss": outputs["loss"].detach().cpu(), "metrics": metrics})


    def build(out, options):
        """The module, its data and the part of it that trains."""
        from lightning_tokens import BudgetPredictorModule, MultiTokenHeadsModule, TraceDataModule

        optimizer = OptimizerConfig(lr=1e-2, warmup=0, schedule="constant")
        spec = ModelSpec(config=options["config"], lora=options.get("lora"))
        data = SFTDataModule(task=ReasoningTask(num_train=32, num_val=8), max_length=64, batch_size=4,
                             packing=options.get("packing", False))
        if options.get("module") == "heads":
            module = MultiTokenHeadsModule(spec, num_heads=2, optimizer=optimizer, heads_path=out + "/heads",
                                           separate_unembedding=options.get("separate", False))
            return module, data, module.heads
        if options.get("module") == "quiet-star":
            from lightning_tokens import PlainTextDataModule, QuietSTaRModule

            from tests.test_sharding import QUIET_STAR

            module = QuietSTaRModule(spec, optimizer=optimizer, **QUIET_STAR)
            text = PlainTextDataModule(task=ReasoningTask(num_train=32, num_val=8), max_length=48, batch_size=2,
                                       packing=options.get("packing", False))
            return module, text, module
        if options.get("module") == "budget":
            module = BudgetPredictorModule(spec, optimizer=optimizer, predictor_path=out + "/predictor.pt")
            traces = TraceDataModule(task=ReasoningTask(num_train=32, num_val=8, style="mixed"), max_length=128,
                                     batch_size=4)
            return module, traces, module.predictor
        module = CausalLMModule(model=spec, optimizer=optimizer, max_new_tokens=0)
        return module, data, module.model


    def run(out, steps, options):
        from lightning_tokens.sharding import full_state_dict

        torch.manual_seed(0)
        module, data, trained = build(out, options)
        record = Record()
        callbacks = [record]
        if options.get("callback") == "selection":
            from lightning_tokens import TokenSelection
            from tests.test_sharding import selection_options

            callbacks.append(TokenSelection(warmup=0, ratio=0.5, **selection_options(options)))
        elif options.get("callback") == "caft":
            from lightning_tokens import ConceptAwareFineTuning

            if options.get("separate"):  # heads with unembeddings of their own, attached before fit
                from lightning_tokens.caft import MultiTokenHeads

                module.caft_heads = MultiTokenHeads(module.model, num_heads=2, separate_unembedding=True)
            callbacks.append(ConceptAwareFineTuning(num_heads=2, beta=0.5, train_heads=True, schedule="constant"))
        checkpointing = options.get("checkpoint_dir") is not None
        if checkpointing:
            from lightning.pytorch.callbacks import ModelCheckpoint

            callbacks.append(ModelCheckpoint(dirpath=options["checkpoint_dir"], every_n_train_steps=1, save_last=True))
        trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=steps, logger=False, callbacks=callbacks,
                             strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                             enable_checkpointing=checkpointing, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             precision=options.get("precision", "32-true"),
                             gradient_clip_val=options.get("clip"))
        trainer.fit(module, datamodule=data, ckpt_path=options.get("ckpt_path"))
        weights = full_state_dict(trained)
        history = callbacks[1].source.state_dict() if options.get("callback") == "selection" else None
        generated = None
        if options.get("module") == "quiet-star":  # every rank thinks its way through the same prompts
            from tests.test_sharding import prompts

            generated = module.generate(*prompts(module.tokenizer.pad_token_id), max_new_tokens=3).sequences
        if options.get("export") is not None:
            module.export(out + "/export", **options["export"])
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"seen": record.seen, "weights": weights if trainer.global_rank == 0 else None,
                    "history": history, "generated": generated}, f"{out}/rank{trainer.global_rank}.pt")


    # One launch of two processes runs every requested run in turn: (folder, steps, options).
    for out, steps, options in json.loads(sys.argv[1]):
        run(out, steps, options)
''')


def sharded_runs(tmp_path: Path, runs: dict[str, tuple[int, dict]]) -> dict[str, list[dict]]:
    """``{name: [rank 0 result, rank 1 result]}`` of the named ``(steps, options)`` runs, all in one launch."""
    import json

    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false", "PL_DISABLE_FORK": "1"}
    plan = [(str(tmp_path / name), steps, options) for name, (steps, options) in runs.items()]
    result = subprocess.run([sys.executable, str(script), json.dumps(plan)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: [torch.load(tmp_path / name / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
            for name in runs}


def replay(ranks: list[dict], **options) -> tuple[list[list[torch.Tensor]], dict, dict]:
    """One process trains on the ranks' batches, step by step, on the mean of their losses: the losses, the final
    weights, and what else the run records (TokenSelection's ``history`` state, Quiet-STaR's ``generated`` ids)."""
    from lightning_tokens import CausalLMModule
    from lightning_tokens.data.packing import model_inputs
    from lightning_tokens.modeling import ModelSpec
    from lightning_tokens.optim import OptimizerConfig, build_optimizer, parameter_groups
    from lightning_tokens.token_loss import PlainLoss, TokenLossDispatcher

    torch.manual_seed(0)
    optimizer_config = OptimizerConfig(lr=1e-2, warmup=0, schedule="constant")
    spec = ModelSpec(config=options["config"], lora=options.get("lora"))
    if options.get("module") in ("heads", "budget", "quiet-star"):
        return replay_whole_module(ranks, spec, optimizer_config, options["module"], options.get("separate", False),
                                   options.get("clip"))
    module = CausalLMModule(model=spec, optimizer=optimizer_config, max_new_tokens=0)
    model = module.model.train()
    TokenLossDispatcher.for_model(model).add(PlainLoss())
    if options.get("callback") == "selection":
        from lightning_tokens import TokenSelection

        selection = TokenSelection(warmup=0, ratio=0.5, **selection_options(options))
        selection.attach(model, module)
    elif options.get("callback") == "caft":
        from lightning_tokens import ConceptAwareFineTuning

        caft = ConceptAwareFineTuning(num_heads=2, beta=0.5, train_heads=True, schedule="constant")
        if options.get("separate"):
            from lightning_tokens.caft import MultiTokenHeads

            module.caft_heads = MultiTokenHeads(module.model, num_heads=2, separate_unembedding=True)
            caft.setup(None, module, "fit")
        else:
            with pytest.warns(UserWarning, match="untrained"):
                caft.setup(None, module, "fit")
        caft.total_steps = STEPS
    optimizer = build_optimizer(module.optim, parameter_groups(module.named_parameters(), module.optim.weight_decay))
    losses = []
    for step in range(STEPS):
        step_losses = [model(**model_inputs(rank["seen"][step]["batch"])).loss for rank in ranks]
        (sum(step_losses) / len(step_losses)).backward()
        if options.get("clip"):
            torch.nn.utils.clip_grad_norm_(module.parameters(), options["clip"])
        optimizer.step()
        optimizer.zero_grad()
        if options.get("callback") == "selection":
            selection.source.after_optimizer_step(model)
        losses.append([loss.detach() for loss in step_losses])
    history = selection.source.state_dict() if options.get("callback") == "selection" else None
    return losses, {name: value.detach() for name, value in model.state_dict().items()}, {"history": history}


LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
EMA = {"history": "ema", "ema_decay": 0.5}  # a fast average, so that three steps move it
# Clipping (``clip``: Trainer.gradient_clip_val) where sharded and whole parameters train together,
# and in one plain run.
CASES = {"full": dict(config=TINY), "packed": dict(config=TINY, packing=True, clip=0.5),
         "selection": dict(config=TINY, callback="selection"),
         "selection-lora": dict(config=TINY, callback="selection", lora=LORA),
         "caft": dict(config=TINY, callback="caft"),
         "selection-ema": dict(config=TINY, callback="selection", selection=EMA),
         "selection-ema-lora": dict(config=TINY, callback="selection", selection=EMA, lora=LORA),
         "stage1-heads": dict(config=TINY, module="heads"), "budget-predictor": dict(config=TINY, module="budget"),
         "selection-rho1": dict(config=TINY, callback="selection",
                                selection={"mode": "rho1", "reference": {"config": TINY, "seed": 1}}),
         "caft-separate": dict(config=TINY, callback="caft", separate=True, clip=0.5),
         "stage1-heads-separate": dict(config=TINY, module="heads", separate=True, clip=0.5),
         "quiet-star": dict(config=TINY, module="quiet-star"),
         "quiet-star-lora-packed": dict(config=TINY, module="quiet-star", lora=LORA, packing=True, clip=0.5)}


# Each carries state a resume must restore: the EMA history; heads with unembeddings every rank holds whole (and
# their optimizer state) beside sharded ones; Quiet-STaR's model as one unit beside its whole mixing head.
RESUMABLE = {"selection-ema": CASES["selection-ema"], "caft-separate": CASES["caft-separate"],
             "quiet-star": CASES["quiet-star"]}


def replay_whole_module(ranks: list[dict], spec, optimizer_config, kind: str, separate: bool = False,
                        clip: Optional[float] = None) -> tuple[list[list[torch.Tensor]], dict, dict]:
    """:func:`replay` for modules that compute their loss themselves: the stage-1 heads and the budget predictor
    (which train beside a frozen model) and Quiet-STaR."""
    from lightning_tokens import BudgetPredictorModule, MultiTokenHeadsModule
    from lightning_tokens.caft.loss import weighted_sum
    from lightning_tokens.optim import build_optimizer, parameter_groups

    if kind == "heads":
        module = MultiTokenHeadsModule(spec, num_heads=2, optimizer=optimizer_config, heads_path=None,
                                       separate_unembedding=separate)
        trained = module.heads

        def loss_of(batch):
            return weighted_sum(module._losses(batch), module.gamma)
    elif kind == "quiet-star":
        from lightning_tokens import QuietSTaRModule

        module = trained = QuietSTaRModule(spec, optimizer=optimizer_config, **QUIET_STAR)

        def loss_of(batch):
            return module.quiet_star(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"),
                                     position_ids=batch.get("position_ids")).loss
    else:
        module = BudgetPredictorModule(spec, optimizer=optimizer_config)
        trained = module.predictor

        def loss_of(batch):
            return module.step(batch)[0].mean()
    module.train()
    optimizer = build_optimizer(optimizer_config,
                                parameter_groups(trained.named_parameters(), optimizer_config.weight_decay))
    losses = []
    for step in range(STEPS):
        step_losses = [loss_of(rank["seen"][step]["batch"]) for rank in ranks]
        (sum(step_losses) / len(step_losses)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trained.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append([loss.detach() for loss in step_losses])
    extra = {}
    if kind == "quiet-star":
        extra["generated"] = module.generate(*prompts(module.tokenizer.pad_token_id), max_new_tokens=3).sequences
    return losses, {name: value.detach() for name, value in trained.state_dict().items()}, extra


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case of this file, in one launch of two processes: the equivalence cases; for each resumable setup a
    run of 4 steps, one interrupted after 2 with its checkpoints, and its resumption; the exports."""
    root = tmp_path_factory.mktemp("sharded")
    runs = {name: (STEPS, options) for name, options in CASES.items()}
    for name, options in RESUMABLE.items():
        checkpoints = str(root / f"{name}-checkpoints")
        runs.update({f"{name}-straight": (4, options), f"{name}-first": (2, {**options, "checkpoint_dir": checkpoints}),
                     f"{name}-resumed": (4, {**options, "ckpt_path": checkpoints + "/last.ckpt"})})
    runs.update({"export": (1, dict(config=TINY, export={})),
                 "export-lora": (1, dict(config=TINY, lora=LORA, export={})),
                 "export-merged": (1, dict(config=TINY, lora=LORA, export={"merge_lora": True})),
                 "quiet-star-export": (1, dict(config=TINY, module="quiet-star", export={})),
                 "bf16-mixed": (STEPS, dict(config=TINY, precision="bf16-mixed"))})
    results = sharded_runs(root, runs)
    results["root"] = root
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_sft_matches_one_process_on_the_same_batches(sharded, case):
    options = CASES[case]
    ranks = sharded[case]
    losses, weights, extra = replay(ranks, **options)
    assert not torch.equal(ranks[0]["seen"][0]["batch"]["input_ids"][:1], ranks[1]["seen"][0]["batch"]["input_ids"][:1])
    for step in range(STEPS):
        for rank in (0, 1):
            torch.testing.assert_close(ranks[rank]["seen"][step]["loss"], losses[step][rank], rtol=0, atol=1e-5)
    sharded_weights = ranks[0]["weights"]
    assert sharded_weights.keys() == weights.keys() and weights
    for name, value in weights.items():
        torch.testing.assert_close(sharded_weights[name], value, rtol=0, atol=1e-5, msg=name)
    if "generated" in extra:  # thoughtful generation from the sharded model, on every rank
        for rank in (0, 1):
            assert torch.equal(ranks[rank]["generated"], extra["generated"])
    if options.get("selection", {}).get("history") == "ema":  # each rank gathers the whole average
        for rank in (0, 1):
            assert ranks[rank]["history"]["updates"] == extra["history"]["updates"] == STEPS
            for got, expected in zip(ranks[rank]["history"]["shadow"], extra["history"]["shadow"], strict=True):
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_a_sharded_run_resumes_exactly_mid_epoch(sharded, name):
    """Interrupted after 2 of 4 steps (mid-epoch) and resumed from its sharded checkpoint, a run gives the losses
    and the weights of the uninterrupted run."""
    straight, resumed = sharded[f"{name}-straight"], sharded[f"{name}-resumed"]
    assert (sharded["root"] / f"{name}-checkpoints" / "last.ckpt").is_dir()  # a distributed checkpoint
    for rank in (0, 1):
        assert len(resumed[rank]["seen"]) == 2
        for step in (0, 1):
            expected, got = straight[rank]["seen"][2 + step], resumed[rank]["seen"][step]
            assert torch.equal(expected["batch"]["input_ids"], got["batch"]["input_ids"])
            torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=1e-6)
    for name, value in straight[0]["weights"].items():
        torch.testing.assert_close(resumed[0]["weights"][name], value, rtol=0, atol=1e-6, msg=name)
    for rank in (0, 1):  # the EMA history came back from the checkpoint, each rank's own shards
        history, resumed_history = straight[rank]["history"], resumed[rank]["history"]
        if history is None:
            continue
        assert resumed_history["updates"] == history["updates"] == 4
        for got, expected in zip(resumed_history["shadow"], history["shadow"], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_sharded_model_exports_full_weights_that_plain_transformers_loads(sharded):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(sharded["root"] / "export" / "export")
    state = loaded.state_dict()
    for name, value in sharded["export"][0]["weights"].items():
        assert torch.equal(state[name], value), name


def test_a_sharded_lora_model_exports_its_adapters_and_merges_them(sharded):
    """A sharded LoRA model exports adapters PEFT loads onto the written base, and with ``merge_lora`` the plain
    model whose weights are ``W + (alpha / r) B A`` of the gathered ones."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = sharded["root"] / "export-lora" / "export"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters / "base"), adapters).state_dict()
    trained = sharded["export-lora"][0]["weights"]
    assert any("lora_B" in name for name in trained)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name

    merged = AutoModelForCausalLM.from_pretrained(sharded["root"] / "export-merged" / "export").state_dict()
    trained = sharded["export-merged"][0]["weights"]
    assert any(value.abs().sum() > 0 for name, value in trained.items() if "lora_B" in name)  # a step moved B
    scale = LORA["lora_alpha"] / LORA["r"]
    checked = 0
    for name, value in merged.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if prefix + ".lora_A.default.weight" in trained:
            down, up = trained[prefix + ".lora_A.default.weight"], trained[prefix + ".lora_B.default.weight"]
            expected = trained[prefix + ".base_layer.weight"] + scale * up @ down
            checked += 1
        else:
            expected = trained["base_model.model." + name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    assert checked >= 2 * TINY["num_hidden_layers"]


# -- what cannot be sharded says so at once -------------------------------------------------------------------
def test_quantized_weights_fsdp2_cannot_shard_fail_at_setup():
    from lightning_tokens.modeling import ModelSpec, load_causal_lm
    from lightning_tokens.sharding import shard_causal_lm

    quantized, _ = load_causal_lm(ModelSpec(config=TINY, quantization="nf4", compute_dtype="float32",
                                            lora={"r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="cannot shard bitsandbytes 4-bit or 8-bit weights"):
        shard_causal_lm(quantized, mesh=None)


def test_the_fsdp_config_shards_with_model_parallel_strategy(offline_hub):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_tokens import CausalLMModule
    from lightning_tokens.cli import build_cli

    cli = build_cli(["--config", "sft/qwen2.5-7b-fsdp", "--trainer.accelerator", "cpu",
                     "--trainer.precision", "32-true"], run=False)
    assert isinstance(cli.trainer.strategy, ModelParallelStrategy) and isinstance(cli.model, CausalLMModule)
    assert cli.datamodule.packing and not cli.model.spec.quantization


def test_stage1_heads_and_the_budget_predictor_are_written_whole_from_sharded_runs(sharded):
    from lightning_tokens import BudgetPredictor
    from lightning_tokens.caft import MultiTokenHeads
    from lightning_tokens.modeling import ModelSpec, load_causal_lm

    model, _ = load_causal_lm(ModelSpec(config=TINY))
    heads = MultiTokenHeads.load(sharded["root"] / "stage1-heads" / "heads", model)
    for name, value in heads.state_dict().items():
        assert torch.equal(value, sharded["stage1-heads"][0]["weights"][name]), name
    predictor = BudgetPredictor.load(sharded["root"] / "budget-predictor" / "predictor.pt")
    for name, value in predictor.state_dict().items():
        assert torch.equal(value, sharded["budget-predictor"][0]["weights"][name]), name


def test_a_sharded_quiet_star_module_exports_what_one_process_exports(sharded):
    """Gathered from its shards, the export holds the trained weights, the delimiter rows set to the trained thought
    embeddings, and the mixing head."""
    from transformers import AutoModelForCausalLM

    exported = sharded["root"] / "quiet-star-export" / "export"
    trained = sharded["quiet-star-export"][0]["weights"]
    state = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    extras = torch.load(exported / "quiet_star.pt", weights_only=False)
    thought = trained["thought_embeddings.scaled"] * extras["hparams"]["embedding_scale"]
    rows = state["model.embed_tokens.weight"]
    start, end = rows.shape[0] - 2, rows.shape[0] - 1  # the two delimiters, added last
    torch.testing.assert_close(rows[[start, end]], thought, rtol=0, atol=1e-6)
    for name, value in state.items():
        expected = trained["model." + name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # tied: the rows set above are in both
            value, expected = value[:start], expected[:start]
        assert torch.equal(value, expected), name
    for name, value in extras["mixing_head"].items():
        assert torch.equal(value, trained["mixing_head." + name]), name


def test_bf16_mixed_precision_computes_in_bf16_and_keeps_float32_weights(sharded):
    """The Trainer's precision becomes FSDP2's mixed precision policy: the losses are those of the float32 run to
    bf16's precision, not equal to them, and the gathered weights stay float32."""
    from lightning_tokens.sharding import mixed_precision

    policy = mixed_precision("bf16-mixed")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision("32-true") is None
    bf16, fp32 = sharded["bf16-mixed"], sharded["full"]
    differences = [abs(float(bf16[r]["seen"][s]["loss"] - fp32[r]["seen"][s]["loss"]))
                   for r in (0, 1) for s in range(STEPS)]
    assert 0 < max(differences) < 0.05
    assert all(value.dtype == torch.float32 for value in bf16[0]["weights"].values() if value.is_floating_point())


def test_the_fsdp1_strategy_gets_one_warning_naming_what_to_use():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_tokens.sharding import warn_if_fsdp1

    with pytest.warns(UserWarning,
                      match=r"TokenSelection: strategy 'fsdp' \(FSDP1\) is not tested.*ModelParallelStrategy"):
        warn_if_fsdp1(SimpleNamespace(strategy=FSDPStrategy()), "TokenSelection")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for strategy in (DDPStrategy(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)):
            warn_if_fsdp1(SimpleNamespace(strategy=strategy), "TokenSelection")
    from lightning_tokens import CausalLMModule
    from lightning_tokens.modeling import ModelSpec

    module = CausalLMModule(model=ModelSpec(config=TINY), max_new_tokens=0)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    with pytest.warns(UserWarning, match="CausalLMModule: strategy 'fsdp'"):  # where the modules shard
        module.configure_model()


@pytest.fixture()
def one_process_group():
    """A gloo process group of this process alone, for DTensors without a launch."""
    import socket

    import torch.distributed as dist

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_mixes_sharded_and_whole_gradients_like_torch_clips_whole_ones(one_process_group, algorithm):
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_tokens.sharding import clip_mixed_gradients, shard_modules

    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"sharded": torch.nn.Linear(6, 5), "whole": torch.nn.Linear(5, 3)})
    grads = [torch.randn_like(p) * 3 for p in module.parameters()]
    shard_modules((module["sharded"],), init_device_mesh("cpu", (1,)))
    for param, grad in zip(module.parameters(), grads):
        param.grad = torch.distributed.tensor.distribute_tensor(grad, param.device_mesh, param.placements) \
            if hasattr(param, "device_mesh") else grad.clone()
    assert any(hasattr(p, "device_mesh") for p in module.parameters())
    assert not clip_mixed_gradients(module["sharded"], 1.0, algorithm)  # nothing whole: Lightning clips
    assert clip_mixed_gradients(module, 1.0, algorithm)
    expected = [g.clone() for g in grads]
    if algorithm == "norm":
        total = torch.cat([g.flatten() for g in grads]).norm()
        assert total > 1.0
        expected = [g * (1.0 / (total + 1e-6)) for g in grads]
    else:
        expected = [g.clamp(-1.0, 1.0) for g in grads]
    for param, want in zip(module.parameters(), expected):
        got = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(got, want)
