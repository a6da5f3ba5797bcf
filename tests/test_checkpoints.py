"""Checks on checkpoint files and folders before a run leans on them (lightning_tokens/checkpoints.py)."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from lightning_tokens.checkpoints import check_checkpoint_file, check_writable_dir


def test_a_saved_checkpoint_passes_and_is_returned_as_a_path(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert check_checkpoint_file(str(path)) == path


def test_a_missing_file_is_named_with_its_field(tmp_path):
    with pytest.raises(ValueError, match=r"^init_checkpoint: .*gone\.ckpt: no such file$"):
        check_checkpoint_file(tmp_path / "gone.ckpt", "init_checkpoint")


def test_an_empty_file_is_refused_before_torch_reads_it(tmp_path):
    path = tmp_path / "killed.ckpt"
    path.touch()
    with pytest.raises(EOFError):  # what torch itself would say
        torch.load(path)
    with pytest.raises(ValueError, match=r"^ckpt_path: .*killed\.ckpt is empty \(0 bytes\)"):
        check_checkpoint_file(path)


def test_a_truncated_checkpoint_is_refused_with_its_size(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save({"w": torch.arange(1000.0)}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises((RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile)):
        torch.load(cut)
    with pytest.raises(ValueError, match=rf"cut\.ckpt is not a PyTorch checkpoint.*\({cut.stat().st_size} bytes\)$"):
        check_checkpoint_file(cut)


def test_a_writable_folder_is_created_and_left_empty(tmp_path):
    folder = tmp_path / "runs" / "checkpoints"
    assert check_writable_dir(folder, "dirpath") == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_folder_that_cannot_be_created_is_named_with_its_field(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"^ModelCheckpoint\.dirpath: cannot write to .*a-file"):
        check_writable_dir(blocker / "checkpoints", "ModelCheckpoint.dirpath")
