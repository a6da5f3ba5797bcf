"""The packaged configs: found by name from any folder, listed, copied out, and run from the copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import lightning_tokens
from lightning_tokens.cli import main
from lightning_tokens.cli.configs import ConfigError, packaged_configs, resolve_config, resolve_config_args

PACKAGE_CONFIGS = Path(lightning_tokens.__file__).parent / "configs"
METHODS = {"sft", "sstoken", "caft", "quiet_star", "budget"}
# A few steps, no validation, no progress bar: enough to show that the config ran.
SHORT = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.logger", "false"]


def files_on_disk() -> dict[str, Path]:
    found = {}
    for folder, _, names in os.walk(PACKAGE_CONFIGS):
        for name in names:
            if name.endswith(".yaml"):
                path = Path(folder, name)
                found[path.relative_to(PACKAGE_CONFIGS).as_posix()[: -len(".yaml")]] = path
    return found


def test_every_packaged_config_is_listed_with_its_method_and_header():
    listed = {config.name: config for config in packaged_configs()}
    assert listed.keys() == files_on_disk().keys() and len(listed) >= 14
    for name, config in listed.items():
        first_line = config.path.read_text().splitlines()[0]
        assert config.method == name.split("/")[0] and config.method in METHODS
        assert first_line.startswith("# ") and config.description == first_line[2:].strip()
        assert config.description.endswith((".", ")")), f"{name}: its first line should be a whole sentence"


def test_configs_command_prints_one_line_per_config(capsys):
    main(["configs"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files_on_disk())
    for line, config in zip(lines, packaged_configs()):
        assert line.split()[:2] == [config.name, config.method] and line.endswith(config.description)


def test_a_name_resolves_to_the_packaged_file_and_an_existing_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = str(PACKAGE_CONFIGS / "sft" / "tiny.yaml")
    for spelling in ("sft/tiny", "sft/tiny.yaml", "configs/sft/tiny.yaml", "./configs/sft/tiny.yaml",
                     str(tmp_path / "old-clone" / "configs" / "sft" / "tiny.yaml")):
        assert resolve_config(spelling) == packaged
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "tiny.yaml").write_text("trainer: {max_steps: 1}\n")
    assert resolve_config("sft/tiny.yaml") == "sft/tiny.yaml"  # the user's own file
    assert resolve_config("sft/tiny") == packaged  # no such file here: the packaged one


def test_every_spelling_of_the_option_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine.yaml").write_text("seed_everything: 1\n")
    words = ["fit", "-c", "sft/tiny", "--config=caft/tiny", "--config", "mine.yaml", "--trainer.max_steps", "3"]
    resolved = resolve_config_args(words)
    assert resolved == ["fit", "-c", str(PACKAGE_CONFIGS / "sft/tiny.yaml"),
                        "--config=" + str(PACKAGE_CONFIGS / "caft/tiny.yaml"), "--config", "mine.yaml",
                        "--trainer.max_steps", "3"]


def test_an_unknown_name_is_one_error_with_the_closest_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"sft/tiyn.*Did you mean sft/tiny"):
        resolve_config("sft/tiyn")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "sft/tiyn"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "lightning-tokens configs" in error[0]


def test_fit_by_name_from_another_folder_composes_with_a_local_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("steps.yaml").write_text(yaml.safe_dump({"trainer": {"default_root_dir": "here"},
                                                  "checkpoint": {"dirpath": "here/checkpoints"}}))
    main(["fit", "--config", "sft/tiny", "--config", "steps.yaml", *SHORT])
    assert (tmp_path / "here" / "checkpoints" / "last.ckpt").is_file()
    assert not (PACKAGE_CONFIGS / "here").exists() and not (PACKAGE_CONFIGS.parent / "runs").exists()


def test_copy_writes_the_same_yaml_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["configs", "copy", "sft/tiny", "my.yaml"])
    assert Path("my.yaml").read_bytes() == (PACKAGE_CONFIGS / "sft" / "tiny.yaml").read_bytes()
    Path("folder").mkdir()
    main(["configs", "copy", "configs/caft/heads-tiny.yaml", "folder"])
    assert Path("folder/heads-tiny.yaml").read_bytes() == (PACKAGE_CONFIGS / "caft" / "heads-tiny.yaml").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["configs", "copy", "sft/tiny", "my.yaml"])
    assert stop.value.code == 2 and "--force" in capsys.readouterr().err
    Path("my.yaml").write_text("changed\n")
    main(["configs", "copy", "sft/tiny", "my.yaml", "--force"])
    assert Path("my.yaml").read_bytes() == (PACKAGE_CONFIGS / "sft" / "tiny.yaml").read_bytes()


def test_copied_caft_stages_find_each_other_from_the_folder_they_run_in(tmp_path, monkeypatch):
    """Stage 2 reads the heads stage 1 wrote: paths in configs are relative to where the command runs."""
    monkeypatch.chdir(tmp_path)
    main(["configs", "copy", "caft/heads-tiny", "stage1.yaml"])
    main(["configs", "copy", "caft/tiny", "stage2.yaml"])
    small_task = ["--data.init_args.task.num_train", "32", "--data.init_args.task.num_val", "8"]
    main(["fit", "--config", "stage1.yaml", *SHORT, *small_task])
    heads_path = yaml.safe_load(Path("stage1.yaml").read_text())["model"]["init_args"]["heads_path"]
    assert (tmp_path / heads_path).is_dir()
    main(["fit", "--config", "stage2.yaml", *SHORT, *small_task])
    assert (tmp_path / "runs" / "caft-tiny" / "checkpoints" / "last.ckpt").is_file()
