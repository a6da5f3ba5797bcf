"""The pretrained base's cache key and the thread count its training runs on (experiments/base.py)."""

import torch

from experiments import base
from experiments.base import BaseSettings


def test_the_key_of_a_two_thread_base_is_the_one_every_cached_base_had():
    # the folder name of the base built before ``threads`` was a setting (runs/pretrained-base/)
    assert BaseSettings().key() == "l6-h192-s2200-965080d1"
    assert BaseSettings(steps=30).key() == "l6-h192-s30-56e4a432"


def test_another_thread_count_is_another_base():
    one = BaseSettings(threads=1).key()
    assert one.startswith("l6-h192-s2200-t1-") and one != BaseSettings().key()
    assert BaseSettings(threads=4).key() not in (one, BaseSettings().key())


def test_training_runs_on_the_settings_threads_and_restores_the_count(monkeypatch):
    seen = []
    monkeypatch.setattr(base, "_train", lambda settings, records, out: seen.append(torch.get_num_threads()) or {})
    torch.set_num_threads(1)
    base.train(BaseSettings(threads=2), None, None)
    assert seen == [2] and torch.get_num_threads() == 1
