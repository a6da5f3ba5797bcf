"""Quiet-STaR vs plain LM training for the same wall time on the embedded task's plain-text corpus.

1. A tiny Llama learns the corpus with plain next-token training (the starting point, "before").
2. From the same weights: Quiet-STaR continued pretraining for ``--seconds``, and plain LM training for the
   same wall time.
3. On the validation corpus: NLL on the difficult tokens (the answer digits after "The answer is"), base
   (no thought) and, for Quiet-STaR, mixed (greedy thoughts); all-token NLL; answer accuracy from the
   prompt with plain greedy generation and with thoughtful generation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/thoughts_experiment.py --seconds 300
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch

from lightning_tokens.data.reasoning_task import ReasoningTask, check_answer
from lightning_tokens.modeling import ModelSpec
from lightning_tokens.thoughts import QuietSTaRModule, parallel_thoughts
from lightning_tokens.thoughts.data import PlainTextDataModule
from lightning_tokens.thoughts.parallel import forbid


def batches(data: PlainTextDataModule, seed: int):
    torch.manual_seed(seed)
    for epoch in itertools.count():
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        yield from loader


def train(module: QuietSTaRModule, data, seconds: float, steps: int, lr: float, quiet: bool, seed: int) -> int:
    """Train for ``seconds`` (or ``steps``, whichever ends first); returns the number of steps taken."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.001)
    module.train()
    start, done = time.perf_counter(), 0
    for batch in batches(data, seed):
        if done >= steps or time.perf_counter() - start >= seconds:
            break
        if quiet:
            loss = module.quiet_star(batch["input_ids"], batch["attention_mask"]).loss
        else:
            loss = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        done += 1
    return done


def answer_digit_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """``(B, L)``: position ``i`` predicts a digit of the final answer (the target ``ids[i + 1]`` is one)."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, seq in enumerate(ids.tolist()):
        text = ""
        for index, token in enumerate(seq):
            piece = tokenizer.decode([token])
            if "answer is" in text and (piece.strip().isdigit() or piece.strip() == "-") and index > 0:
                mask[row, index - 1] = True
            text += piece
    return mask


@torch.no_grad()
def evaluate(module: QuietSTaRModule, data: PlainTextDataModule, thoughts: bool) -> dict[str, float]:
    module.eval()
    lm, te, head = module.lm, module.thought_embeddings, module.lm.get_output_embeddings()
    sums = {"nll_all": 0.0, "nll_answer": 0.0, "mixed_all": 0.0, "mixed_answer": 0.0}
    counts = {"all": 0, "answer": 0}
    correct = {"plain": 0, "thoughtful": 0}
    total = 0
    for batch in data.val_dataloader():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = torch.nn.functional.pad(ids[:, 1:], (0, 1))
        valid = mask.bool() & torch.nn.functional.pad(mask[:, 1:], (0, 1)).bool()
        answer = answer_digit_mask(ids, data.tokenizer) & valid
        passes = parallel_thoughts(lm, ids, mask, te.start, te.end, module.forbidden_ids, 1, module.thought_length,
                                   1, temperature=0.0)
        base_lp = forbid(head(passes.base_hidden), module.forbidden_ids).log_softmax(-1)
        mixed, _ = module.mixing_head(passes.base_hidden, passes.talk_hidden[0])
        mixed_lp = forbid(head(mixed), module.forbidden_ids).log_softmax(-1)
        base_nll = -base_lp.gather(-1, targets[..., None]).squeeze(-1)
        mixed_nll = -mixed_lp.gather(-1, targets[..., None]).squeeze(-1)
        sums["nll_all"] += float(base_nll[valid].sum())
        sums["mixed_all"] += float(mixed_nll[valid].sum())
        sums["nll_answer"] += float(base_nll[answer].sum())
        sums["mixed_answer"] += float(mixed_nll[answer].sum())
        counts["all"] += int(valid.sum())
        counts["answer"] += int(answer.sum())
        prompts, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        plain = module.model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=48,
                                      do_sample=False, pad_token_id=0, eos_token_id=data.tokenizer.eos_token_id)
        kinds = {"plain": plain[:, prompts.shape[1]:]}
        if thoughts:
            kinds["thoughtful"] = module.generate(prompts, prompt_mask, max_new_tokens=48).sequences[:, prompts.shape[1]:]
        for kind, rows in kinds.items():
            for row, answer_text in zip(rows.tolist(), batch["answers"]):
                correct[kind] += check_answer(data.tokenizer.decode(row, skip_special_tokens=True), answer_text)
        total += len(batch["answers"])
    out = {"nll_all": sums["nll_all"] / counts["all"], "nll_answer": sums["nll_answer"] / counts["answer"],
           "acc_plain": correct["plain"] / total, "answer_tokens": counts["answer"]}
    if thoughts:
        out.update(mixed_all=sums["mixed_all"] / counts["all"], mixed_answer=sums["mixed_answer"] / counts["answer"],
                   acc_thoughtful=correct["thoughtful"] / total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--thought-length", type=int, default=4)
    parser.add_argument("--talk", type=int, default=4)
    parser.add_argument("--n-thoughts", type=int, default=2)
    parser.add_argument("--policy-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    task = ReasoningTask(num_train=4000, num_val=128, min_digits=1, max_digits=2)
    module = QuietSTaRModule(ModelSpec(config={"model_type": "llama"}), n_thoughts=args.n_thoughts,
                             thought_length=args.thought_length, n_ahead_talk=args.talk,
                             policy_weight=args.policy_weight, max_new_tokens=48)
    data = PlainTextDataModule(task=task, max_length=128, batch_size=16, eval_batch_size=64)
    data.tokenizer = module.tokenizer
    data.setup()
    start = time.perf_counter()
    steps = train(module, data, float("inf"), args.pretrain_steps, 3e-3, quiet=False, seed=args.seed)
    print(f"pretrained {steps} plain steps in {time.perf_counter() - start:.0f}s")
    before = evaluate(module, data, thoughts=False)
    plain, quiet = copy.deepcopy(module), copy.deepcopy(module)
    q_steps = train(quiet, data, args.seconds, 10**9, args.lr, quiet=True, seed=args.seed + 1)
    p_steps = train(plain, data, args.seconds, 10**9, args.lr, quiet=False, seed=args.seed + 1)
    after_plain = evaluate(plain, data, thoughts=False)
    after_quiet = evaluate(quiet, data, thoughts=True)
    print(f"# {args}; {before['answer_tokens']} answer-digit tokens in {task.num_val} validation documents")
    print("| model | steps | NLL all tokens | NLL answer digits | mixed NLL all | mixed NLL answer digits | "
          "accuracy (greedy) | accuracy (thoughtful) |")
    print("|---|---|---|---|---|---|---|---|")
    row = lambda name, s, r: print(  # noqa: E731
        f"| {name} | {s} | {r['nll_all']:.4f} | {r['nll_answer']:.4f} | {r.get('mixed_all', float('nan')):.4f} | "
        f"{r.get('mixed_answer', float('nan')):.4f} | {r['acc_plain']:.3f} | {r.get('acc_thoughtful', float('nan')):.3f} |")
    row("before (plain pretraining)", steps, before)
    row(f"+ plain LM, {args.seconds:.0f}s", p_steps, after_plain)
    row(f"+ Quiet-STaR, {args.seconds:.0f}s", q_steps, after_quiet)


if __name__ == "__main__":
    main()
