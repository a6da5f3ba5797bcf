"""The evidence protocol's noise (experiments/protocols/noise.py): where it goes and how the audit mask records it.

The noisy training set is compared with the same data module without noise: taking the positions the mask
calls noise out of a noisy sample must give back the clean sample, up to replaced digits inside the thinking.
"""


from experiments.protocols.noise import NoiseSettings, NoisySFTDataModule
from lightning_tokens import ReasoningTask
from lightning_tokens.data.tokenizer import load_task_tokenizer
from lightning_tokens.sstoken.loss_table import sample_key


def _train_samples(noise: NoiseSettings, noise_seed: int = 3):
    task = ReasoningTask.preset("medium", style="concise", num_train=64, num_val=4, seed=900)
    data = NoisySFTDataModule(noise=noise, noise_seed=noise_seed, task=task, max_length=512, batch_size=4)
    data.tokenizer = load_task_tokenizer()
    data.setup("fit")
    return data, data.train_dataset.samples


def test_noise_stays_inside_thinking_and_the_mask_names_every_changed_token():
    noise = NoiseSettings(noisy_fraction=0.5, spans=3, span_length=6, digit_rate=0.3)
    noisy_data, noisy = _train_samples(noise)
    _, clean = _train_samples(NoiseSettings(noisy_fraction=0.0))
    tok = noisy_data.tokenizer
    think_open, think_close = tok.convert_tokens_to_ids(["<think>", "</think>"])
    digits = set(tok.convert_tokens_to_ids([str(d) for d in range(10)]))
    corpus_ids = set(tok(noisy_data.task.corpus("train"), add_special_tokens=False)["input_ids"])
    changed = 0
    for before, after in zip(clean, noisy):
        mask = noisy_data.noise_masks.get(sample_key(after.input_ids, after.labels))
        if mask is None:  # a clean sample stays exactly as it was
            assert (after.input_ids, after.labels) == (before.input_ids, before.labels)
            continue
        changed += 1
        assert after.labels[:after.prompt_length] == before.labels[:before.prompt_length]
        targets = [i for i, label in enumerate(after.labels) if label != -100]
        assert len(mask) == len(targets)
        # Every target is its own input token (labels are not shifted), noise or not.
        assert all(after.labels[i] == after.input_ids[i] for i in targets)
        flag = dict(zip(targets, mask))
        noise_at = [i for i in targets if flag[i]]
        assert after.input_ids.index(think_open) < min(noise_at)
        assert max(noise_at) < after.input_ids.index(think_close)
        # Filler comes from tokens the task's text never uses (so never a digit).
        filler = [i for i in noise_at if after.input_ids[i] not in digits]
        assert filler and all(after.input_ids[i] not in corpus_ids for i in filler)
        # Without the filler, the sample is the clean one with some digits of the thinking replaced by others.
        unfilled = [(t, flag.get(i, False)) for i, t in enumerate(after.input_ids) if i not in set(filler)]
        assert len(unfilled) == len(before.input_ids)
        start, end = before.input_ids.index(think_open), before.input_ids.index(think_close)
        for i, (original, (token, is_noise)) in enumerate(zip(before.input_ids, unfilled)):
            if is_noise:
                assert start < i < end and original in digits and token in digits and token != original
            else:
                assert token == original
    assert 16 <= changed <= 48  # half of 64 samples, give or take the draw


def test_noise_is_drawn_per_sample_and_reproducible():
    noise = NoiseSettings(noisy_fraction=1.0)
    _, first = _train_samples(noise, noise_seed=5)
    _, again = _train_samples(noise, noise_seed=5)
    _, other = _train_samples(noise, noise_seed=6)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [s.input_ids for s in first] != [s.input_ids for s in other]


def test_the_audit_counts_the_same_tokens_in_padded_and_padding_free_batches():
    """The ssToken audit on batches of the same samples, padded or padding-free, with a keep rule known per token
    (even token ids kept): its counts equal those taken from the samples and their noise masks directly."""
    from types import SimpleNamespace

    from experiments.protocols.sstoken import audit_callback
    from lightning_tokens.data.packing import real_tokens, segment_ids

    task = ReasoningTask.preset("medium", style="concise", num_train=32, num_val=4, seed=900)
    noise = NoiseSettings(noisy_fraction=0.5, spans=3, span_length=6, digit_rate=0.3)
    expected = dict(noise=0, noise_kept=0, clean=0, clean_kept=0)
    counted = []
    for padding_free in (False, True):
        data = NoisySFTDataModule(noise=noise, noise_seed=3, task=task, max_length=512, batch_size=8,
                                  padding_free=padding_free)
        data.tokenizer = load_task_tokenizer()
        data.setup("fit")
        audit = audit_callback(data.noise_masks)
        for batch in data.train_dataloader():
            segments = segment_ids(batch["position_ids"]) if padding_free else None
            target_mask = batch["labels"][:, 1:] != -100
            audit.reshape_token_loss(SimpleNamespace(
                input_ids=batch["input_ids"], labels=batch["labels"], segments=segments, target_mask=target_mask,
                attention_mask=real_tokens(segments) if padding_free else batch["attention_mask"],
                weights=(target_mask & (batch["input_ids"][:, 1:] % 2 == 0)).float()))
        counted.append(audit.counts)
        if padding_free:
            continue
        for sample in data.train_dataset.samples:
            flags = data.noise_masks.get(sample_key(sample.input_ids, sample.labels))
            if flags is None:
                continue
            targets = [token for token, label in zip(sample.input_ids, sample.labels) if label != -100]
            for is_noise, token in zip(flags, targets):
                name = "noise" if is_noise else "clean"
                expected[name] += 1
                expected[name + "_kept"] += int(token % 2 == 0)
    assert expected["noise"] > 0 and 0 < expected["noise_kept"] < expected["noise"]
    assert counted == [expected, expected]
