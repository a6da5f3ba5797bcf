"""Bundled byte-level BPE tokenizer for the embedded reasoning task.

The tokenizer is trained on text of the task (all difficulty presets, both
thinking styles). Digits are always single tokens, ``<think>`` and
``</think>`` are single *non-special* added tokens (so
``decode(..., skip_special_tokens=True)`` keeps them) and the byte-level
decoder round-trips any text. Special tokens: ``<pad>`` (id 0), ``<s>``
(bos, prepended when ``add_special_tokens=True``) and ``</s>`` (eos).

Regenerate the bundled ``tokenizer.json`` with::

    python -m lightning_tokens.data.tokenizer
"""

from __future__ import annotations

from pathlib import Path

from lightning_tokens.data.reasoning_task import (
    PRESETS,
    generate_problems,
    render_answer,
    render_corpus,
    render_prompt,
    render_thinking,
)
from lightning_tokens.reasoning import THINK_END, THINK_START

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "THINK_END",
    "THINK_START",
    "TOKENIZER_PATH",
    "load_task_tokenizer",
    "train_task_tokenizer",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
TOKENIZER_PATH = Path(__file__).with_name("tokenizer.json")
MODEL_MAX_LENGTH = 2048


def _training_texts(seed: int, per_preset: int = 600) -> list[str]:
    """Task text without think markers (they are added tokens, not learned)."""
    texts = []
    for offset, bounds in enumerate(PRESETS.values()):
        problems = generate_problems(per_preset, seed=seed * 1000 + offset, **bounds)
        for problem in problems:
            texts.append(render_prompt(problem))
            texts.append(render_answer(problem.answer))
            texts.extend(render_thinking(problem, style) for style in ("concise", "verbose"))
        corpus = render_corpus(problems[: per_preset // 4], style="mixed", seed=seed)
        texts.extend(corpus.replace(THINK_START, "").replace(THINK_END, "").split("\n\n"))
    return texts


def train_task_tokenizer(path: str | Path = TOKENIZER_PATH, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train the task's byte-level BPE tokenizer and write ``tokenizer.json``.

    Training is deterministic: the same arguments produce the same file.

    Args:
        path: Output file (``*.json``) or directory (``tokenizer.json`` is
            written inside it). Defaults to the bundled file next to this module.
        vocab_size: Total vocabulary size including special and think tokens.
            Defaults to ``512``.
        seed: Seed of the generated training problems. Defaults to ``0``.

    Returns:
        The path of the written ``tokenizer.json``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # room for <think> and </think>
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_texts(seed), trainer=trainer)
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token in (THINK_START, THINK_END)]
    )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    out = Path(path)
    if out.suffix != ".json":
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


def load_task_tokenizer():
    """Load the bundled tokenizer as a Hugging Face fast tokenizer.

    Returns:
        transformers.PreTrainedTokenizerFast: The tokenizer, with ``bos_token="<s>"``,
            ``eos_token="</s>"``, ``pad_token="<pad>"`` (id 0), right padding,
            ``model_max_length=2048`` and no chat template.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_PATH),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


if __name__ == "__main__":
    print(f"wrote {train_task_tokenizer()}")
