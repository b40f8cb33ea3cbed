"""Reliability: saving swaps whole folders atomically, repairs what a killed save left, keeps folder modes, and
refuses outputs that would destroy the input or the working directory."""

from __future__ import annotations

import fcntl
import os
import stat

import pytest
import torch
from cli_assets import save_classifier
from conftest import same_outputs, tiny_bert
from reliability_cases import expect_warning, fails_with, record_text
from transformers import AutoModelForSequenceClassification

import hf_fwsvd.integration
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.cli import main

AUTO = AutoModelForSequenceClassification
INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


def compressed(rank: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return compress(tiny_bert(), FWSVDConfig(rank=rank, method="svd"), show_progress=False).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**INPUT).logits


def hidden(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=["umask-022", "umask-027", "umask-002"])
def test_new_folder_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        compressed().save_pretrained(tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~umask


def test_existing_folder_keeps_its_mode(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o751)
    compressed().save_pretrained(out)
    compressed(rank=2).save_pretrained(out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o751


def test_stale_folders_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    out = tmp_path / "out"
    compressed().save_pretrained(out)
    for name in (".out.tmp-killed1", ".out.old-killed2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.fwsvd.safetensors").write_bytes(b"half written")
    model = compressed(rank=2, seed=1)
    model.save_pretrained(out)
    assert hidden(tmp_path) == []
    assert same_outputs(logits(AUTO.from_pretrained(out)), logits(model))


def test_stale_folder_a_reader_holds_is_kept(tmp_path):
    """A folder replaced while a reader still loads it is removed only once nobody holds it."""
    out = tmp_path / "out"
    compressed().save_pretrained(out)
    busy = tmp_path / ".out.tmp-busy"
    busy.mkdir()
    descriptor = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    try:
        compressed(rank=2).save_pretrained(out)
        assert hidden(tmp_path) == [".out.tmp-busy"]
    finally:
        os.close(descriptor)
    AUTO.from_pretrained(out)  # a load cleans up too
    assert hidden(tmp_path) == []


def test_crash_between_the_fallback_renames_is_repaired_by_the_next_load(tmp_path, caplog):
    """Without RENAME_EXCHANGE a save renames the old folder away, then the new one in; a kill between the two used
    to leave no checkpoint at the path. The next load renames the backup back."""
    out = tmp_path / "out"
    model = compressed()
    model.save_pretrained(out)
    backup = tmp_path / ".out.old-k9"
    os.rename(out, backup)
    with caplog.at_level("WARNING", logger="hf_fwsvd.atomic_dir"):
        reloaded = AUTO.from_pretrained(out)
    assert same_outputs(logits(reloaded), logits(model)) and hidden(tmp_path) == []
    expect_warning(
        caplog,
        "hf_fwsvd.atomic_dir",
        f"Restored the checkpoint {out} from {backup}, left behind by an interrupted save.",
        entry="from_pretrained",
        replacements={str(tmp_path): "<tmp>"},
    )


def test_crash_between_the_fallback_renames_is_repaired_by_the_next_save(tmp_path):
    out = tmp_path / "out"
    compressed().save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")
    os.rename(out, tmp_path / ".out.old-k9")
    compressed(rank=2).save_pretrained(out)
    assert sorted(os.listdir(out)) == [
        "README.md",
        "config.json",
        "fwsvd_report.json",
        "model.fwsvd.safetensors",
        "tokenizer.json",
    ]
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_reader_keeps_the_checkpoint_it_opened_while_another_save_replaces_it(tmp_path, monkeypatch, exchange):
    """A save that lands in the middle of a load (here: right after the load's first check) does not mix files:
    the load returns the old model whole, the next load the new one."""
    out = tmp_path / "out"
    old, new = compressed(rank=4, seed=0), compressed(rank=2, seed=1)
    old.save_pretrained(out)
    if not exchange:
        monkeypatch.setattr(hf_fwsvd.atomic_dir, "exchange", lambda first, second: False)
    real_check = hf_fwsvd.integration.check_local_checkpoint
    saves = []

    def save_during_the_load(*args, **kwargs):
        if not saves:
            saves.append(new.save_pretrained(out))
        return real_check(*args, **kwargs)

    monkeypatch.setattr(hf_fwsvd.integration, "check_local_checkpoint", save_during_the_load)
    assert same_outputs(logits(AUTO.from_pretrained(out)), logits(old))
    assert same_outputs(logits(AUTO.from_pretrained(out)), logits(new))
    assert hidden(tmp_path) == []


def test_save_into_the_working_directory_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"
    model = compressed()
    model.save_pretrained(out)
    monkeypatch.chdir(out)
    message = (
        f"Refusing to save into {str(out)!r}: it is (or contains) the current working directory, which the save "
        "replaces as a whole. Change to another directory (`cd ..`) or save somewhere else."
    )
    with fails_with(ValueError, message, entry="save_pretrained", replacements={str(tmp_path): "<tmp>"}):
        model.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), out)


def test_save_with_a_variant_is_refused(tmp_path):
    message = (
        "`save_pretrained(variant='fp16')` is not supported for FWSVD-compressed models: their weights are always "
        "saved as model.fwsvd.safetensors. Save each variant into its own directory instead."
    )
    with fails_with(ValueError, message, entry="save_pretrained"):
        compressed().save_pretrained(tmp_path / "out", variant="fp16")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("save-cli")
    dense = save_classifier(root / "dense")
    out = root / "ck"
    assert main(["compress", str(dense), "--task", "sequence-classification", "--method", "svd", "--rank", "2",
                 "--output", str(out), "-q"]) == 0  # fmt: skip
    return root, out


def _one_line_error(capsys, command: str, code: int, message: str, root) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"hf-fwsvd {command}: error: ")]
    assert lines == [f"hf-fwsvd {command}: error: {message}"], err
    record_text("exit " + str(code), message.replace(str(root), "<tmp>"), f"hf-fwsvd {command}")


def test_export_dense_into_its_own_checkpoint_is_refused(checkpoint, capsys):
    root, out = checkpoint
    before = sorted(os.listdir(out))
    assert main(["export-dense", str(out), str(out), "--overwrite"]) == 2
    message = (
        f"OUT {str(out)!r} is the input checkpoint {str(out)!r}; writing there would destroy it. Choose another "
        "folder."
    )
    _one_line_error(capsys, "export-dense", 2, message, root)
    assert sorted(os.listdir(out)) == before


def test_export_dense_into_the_working_directory_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    root, out = checkpoint
    target = tmp_path / "dense"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    monkeypatch.chdir(target)
    assert main(["export-dense", str(out), ".", "--overwrite"]) == 2
    message = (
        "OUT '.' is the current directory (or holds it), which the save replaces as a whole. Run the command from "
        "another directory."
    )
    _one_line_error(capsys, "export-dense", 2, message, root)
    assert os.path.samefile(os.getcwd(), target) and (target / "notes.txt").read_text() == "mine"


def test_compress_into_the_working_directory_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    root, _ = checkpoint
    target = tmp_path / "work" / "inner"
    target.mkdir(parents=True)
    monkeypatch.chdir(target)
    args = ["compress", str(root / "dense"), "--task", "sequence-classification", "--method", "svd", "--rank", "2"]
    assert main([*args, "--output", "..", "--overwrite"]) == 2
    message = (
        "--output '..' is the current directory (or holds it), which the save replaces as a whole. Run the command "
        "from another directory."
    )
    _one_line_error(capsys, "compress", 2, message, root)
    assert os.path.samefile(os.getcwd(), target)
