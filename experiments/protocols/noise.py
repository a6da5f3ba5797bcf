"""Noise of the kinds real SFT responses carry, injected token by token into fresh training samples.

Two kinds, both inside the thinking (the final answer stays right, as in data whose reasoning is sloppy):

- **uninformative spans**: runs of filler tokens inserted between the response's tokens. The filler comes from
  tokens the task's text never uses and is drawn anew for every sample, so one epoch cannot learn it: like the
  boilerplate, markup debris and off-topic words of scraped instruction data.
- **wrong digits**: digits of the worked steps replaced by other digits (mistakes in the reasoning).

Every sample gets its own generator (run seed, sample index), so a sample's noise does not depend on the others.
The data module records which target tokens are noise, by sample key, for the kept-rate audit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lightning_tokens.data.encode import Encoded
from lightning_tokens.data.module import SFTDataModule
from lightning_tokens.lean_loss import IGNORE_INDEX


@dataclass(frozen=True)
class NoiseSettings:
    """How much noise, and where.

    Attributes:
        noisy_fraction: Share of training samples that get noise. Default ``0.5``.
        spans: Most filler spans inserted per noisy sample (at least one). Default ``3``.
        span_length: Most filler tokens per span (at least two). Default ``6``.
        digit_rate: Share of the thinking's digit tokens replaced in a noisy sample. Default ``0.15``.
    """

    noisy_fraction: float = 0.5
    spans: int = 3
    span_length: int = 6
    digit_rate: float = 0.15


def filler_ids(tokenizer, corpus: str) -> list[int]:
    """Token ids the task's text never uses (and no special token): the filler the spans draw from."""
    # the whole corpus as one string: longer than the model's context on purpose, so no length warning
    used = set(tokenizer(corpus, add_special_tokens=False, verbose=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in used and i not in special]


def inject(sample: Encoded, rng: random.Random, settings: NoiseSettings, filler: list[int], digits: list[int],
           think: tuple[int, int]) -> tuple[Encoded, list[bool]]:
    """``sample`` with noise in its thinking, and for each of its tokens whether it is noise."""
    ids, labels = list(sample.input_ids), list(sample.labels)
    start, end = ids.index(think[0]), ids.index(think[1])  # noise goes strictly between <think> and </think>
    noise = [False] * len(ids)
    digit_set = set(digits)
    for i in range(start + 1, end):
        if ids[i] in digit_set and rng.random() < settings.digit_rate:
            ids[i] = labels[i] = rng.choice([d for d in digits if d != ids[i]])
            noise[i] = True
    for _ in range(rng.randint(1, settings.spans)):
        end = ids.index(think[1])
        at = rng.randint(start + 1, end)
        span = [rng.choice(filler) for _ in range(rng.randint(2, settings.span_length))]
        ids[at:at] = span
        labels[at:at] = span
        noise[at:at] = [True] * len(span)
    return Encoded(ids, labels, sample.prompt_length, sample.origin), noise


class NoisySFTDataModule(SFTDataModule):
    """:class:`~lightning_tokens.SFTDataModule` whose training samples get :func:`inject` noise.

    Args:
        noise: The :class:`NoiseSettings`. Default ``NoiseSettings()``.
        noise_seed: Seed of which samples are noisy and of their noise. Default ``0``.
        **kwargs: Passed to ``SFTDataModule`` (``task``, ``batch_size``, ...).

    Attributes:
        noise_masks: ``sample_key -> [is noise]`` over each noisy sample's target tokens, in order.
    """

    def __init__(self, noise: NoiseSettings = NoiseSettings(), noise_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise, self.noise_seed = noise, noise_seed
        self.noise_masks: dict[str, list[bool]] = {}

    def _encode(self, records, split):
        dataset = super()._encode(records, split)
        if split != "train" or self.noise.noisy_fraction == 0:
            return dataset
        from lightning_tokens.sstoken.loss_table import sample_key

        tok = self.tokenizer
        filler = filler_ids(tok, self.task.corpus("train")[:200_000])
        digits = tok.convert_tokens_to_ids([str(d) for d in range(10)])
        think = tuple(tok.convert_tokens_to_ids(["<think>", "</think>"]))
        for index, sample in enumerate(dataset.samples):
            rng = random.Random(f"{self.noise_seed}:{index}")
            if rng.random() >= self.noise.noisy_fraction:
                continue
            noisy, noise = inject(sample, rng, self.noise, filler, digits, think)
            dataset.samples[index] = noisy
            targets = [flag for flag, label in zip(noise, noisy.labels) if label != IGNORE_INDEX]
            self.noise_masks[sample_key(noisy.input_ids, noisy.labels)] = targets
        return dataset
