"""Guided generate() speed against unguided generate(), measured in the same run (ratios, not absolute figures).

For each model and batch size (1 and 8): tokens per second of greedy decoding of a fixed number of new tokens
(``min_new_tokens`` = ``max_new_tokens``, so every run makes the same tokens) without guidance, with
newline-step guidance (the paper's) and with guidance at every step (the worst case). Models:
``--model DIR``: a saved model with the embedded task's tokenizer (its own newline rate), and/or
``--qwen-shaped``: a randomly initialised model with Qwen2-1.5B's shapes (bf16 on a GPU) and a default
predictor over its 151,936-token vocabulary. The settings run in rounds (one run of each per round; the first
round warms up): tokens per second come from the median time over ``--repeats`` rounds, an overhead is the
median over rounds of guided time / unguided time in the same round.

    python -m benchmarks.budget_speed --model runs/budget-experiment/sft-model \
        --predictor runs/budget-experiment/predictor.pt
    python -m benchmarks.budget_speed --qwen-shaped
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import timed
from lightning_tokens.budget import BudgetGuidanceLogitsProcessor, BudgetPredictor
from lightning_tokens.data.reasoning_task import ReasoningTask
from lightning_tokens.data.tokenizer import load_task_tokenizer

QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)


def timed_generate(model, enc, new_tokens, processors):
    def generate():
        model.generate(**enc, logits_processor=processors, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)

    return timed(generate, model.device, repeats=1, warmup=0)


def bench(name, model, predictor, tokenizer, prompts, new_tokens, repeats, relaxed):
    rows = []
    thresholds = dict(min_rate=0.0, min_shape=0.0, min_mode=-1.0) if relaxed else {}
    for batch in (1, 8):
        enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True).to(model.device)
        times = {"unguided": [], "newline": [], "every": []}
        guided_steps = {"newline": 0, "every": 0}
        # Rounds of one run per setting (not common.timed, which repeats one call), so that a drift in machine
        # speed hits every setting alike (a shared CPU drifts by tens of percent within a minute); the first
        # round warms up. Hooks are only on the model during guided runs.
        for _ in range(repeats + 1):
            times["unguided"].append(timed_generate(model, enc, new_tokens, []))
            for steps in guided_steps:
                guide = BudgetGuidanceLogitsProcessor(model, predictor, tokenizer, 10_000, steps=steps, **thresholds)
                with guide:
                    times[steps].append(timed_generate(model, enc, new_tokens, [guide]))
                guided_steps[steps] += guide.guided_steps
        plain = statistics.median(times["unguided"][1:])
        row = {"model": name, "batch": batch, "new_tokens": new_tokens, "unguided_tok_s": batch * new_tokens / plain}
        for steps, count in guided_steps.items():
            seconds = statistics.median(times[steps][1:])
            row[f"{steps}_guided_share"] = count / ((repeats + 1) * new_tokens)
            row[f"{steps}_tok_s"] = batch * new_tokens / seconds
            row[f"{steps}_overhead"] = statistics.median(g / p for g, p in zip(times[steps][1:], times["unguided"][1:]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="saved model directory (embedded task tokenizer)")
    parser.add_argument("--predictor", help="saved BudgetPredictor for --model (default: a fresh one)")
    parser.add_argument("--qwen-shaped", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_task_tokenizer()
    tokenizer.padding_side = "left"
    task = ReasoningTask(num_val=8, style="mixed", min_digits=1, max_digits=3, min_operands=2, max_operands=3)
    prompts = [r["prompt"] + "<think>" for r in task.records("val")]
    rows = []
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
        predictor = BudgetPredictor.load(args.predictor) if args.predictor else BudgetPredictor.for_model(model)
        rows += bench("embedded tiny llama", model, predictor.to(device), tokenizer, prompts, args.new_tokens,
                      args.repeats, relaxed=False)
    if args.qwen_shaped:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        config = AutoConfig.for_model("qwen2", **QWEN2_1_5B)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        predictor = BudgetPredictor.for_model(model).to(device=device, dtype=dtype).eval()
        rows += bench("qwen2-1.5b-shaped (random)", model, predictor, tokenizer, prompts, args.new_tokens, args.repeats,
                      relaxed=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
