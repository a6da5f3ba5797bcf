"""Tests of the bundled task tokenizer."""

import json

import pytest

from lightning_tokens.data.reasoning_task import ReasoningTask, thinking_length
from lightning_tokens.data.tokenizer import (
    THINK_END,
    THINK_START,
    TOKENIZER_PATH,
    load_task_tokenizer,
    train_task_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_task_tokenizer()


@pytest.fixture(scope="module")
def think_ids(tok):
    return tok.convert_tokens_to_ids(THINK_START), tok.convert_tokens_to_ids(THINK_END)


@pytest.mark.parametrize(
    "text",
    [
        "Compute 23 + 45 - 12.",
        "<think>\n7+8=15, write 5 carry 1\n</think>\nThe answer is -56.",
        "  leading and trailing spaces  \n\n\ttabs\r\n",
        "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀, math ∑∫√",
        "Arbitrary ASCII: {}[]<>|\\/~`!@#$%^&*()_ \"quotes\" 'single' 0123456789",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_digits_are_single_tokens(tok):
    for digit in "0123456789":
        assert len(tok(digit, add_special_tokens=False)["input_ids"]) == 1
    tokens = tok.convert_ids_to_tokens(tok("x 9876543210 +12", add_special_tokens=False)["input_ids"])
    digit_tokens = [t for t in tokens if any(ch.isdigit() for ch in t)]
    assert digit_tokens == list("987654321012")


def test_think_markers_are_single_non_special_tokens(tok, think_ids):
    start, end = think_ids
    assert start != tok.unk_token_id and end != tok.unk_token_id and start != end
    ids = tok("<think>\nx\n</think>\nok", add_special_tokens=False)["input_ids"]
    assert ids[0] == start and end in ids
    assert THINK_START not in tok.all_special_tokens and THINK_END not in tok.all_special_tokens
    decoded = tok.decode(tok("<s><think>\nx\n</think>\nok</s>")["input_ids"], skip_special_tokens=True)
    assert decoded == "<think>\nx\n</think>\nok"


def test_special_tokens_and_bos(tok):
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    ids = tok("Compute 1 + 2.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok("Compute 1 + 2.", add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok.padding_side == "right" and tok.model_max_length == 2048
    assert tok.chat_template is None


def test_right_padding_uses_pad_id(tok):
    batch = tok(["1+2", "Compute 12 + 34."], padding=True)["input_ids"]
    assert batch[0][-1] == 0 and len(batch[0]) == len(batch[1])


def test_vocab_size_is_small(tok):
    assert 256 < len(tok) <= 512


def test_training_is_deterministic(tmp_path):
    written = train_task_tokenizer(tmp_path)
    assert written == tmp_path / "tokenizer.json"
    assert json.loads(written.read_text()) == json.loads(TOKENIZER_PATH.read_text())


def _lengths(tok, think_ids, task):
    start, end = think_ids
    encoded = tok([r["completion"] for r in task.records("train")], add_special_tokens=False)["input_ids"]
    return [thinking_length(ids, start, end) for ids in encoded]


def test_thinking_length_range(tok, think_ids):
    easy = _lengths(tok, think_ids, ReasoningTask.preset("easy", num_train=300))
    hardest = ReasoningTask(num_train=100, min_digits=4, max_digits=4, min_operands=5, max_operands=5, style="verbose")
    hard = _lengths(tok, think_ids, hardest)
    assert min(easy) <= 12
    assert min(hard) >= 300
    assert max(hard) < 2048
