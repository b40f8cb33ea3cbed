"""Reliability: saving never modifies the source, never leaves a half-written checkpoint, and refuses bad targets."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import pytest
import torch
import transformers.modeling_utils
from conftest import tiny_bert
from reliability_cases import expect_warning, fails_with
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.quantizers import auto as quantizers_auto

import hf_fwsvd.atomic_dir
import hf_fwsvd.serialization
from hf_fwsvd import FWSVDConfig, compress

AUTO = AutoModelForSequenceClassification
INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


def compressed(rank: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return compress(tiny_bert(), FWSVDConfig(rank=rank, method="svd"), show_progress=False).eval()


def digest(directory) -> dict[str, str]:
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                result[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return result


def leftovers(parent) -> list[str]:
    """Staging or backup directories left next to the output (the lock file is allowed to stay)."""
    return sorted(name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name)


def test_existing_directory_keeps_other_files_and_drops_stale_weights(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "README.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("[]")
    (out / "model.safetensors").write_bytes(b"stale dense weights")
    (out / "pytorch_model.bin").write_bytes(b"stale pickle")
    (out / "config.json").write_text("{}")
    model = compressed()
    with caplog.at_level("WARNING", logger="hf_fwsvd.serialization"):
        model.save_pretrained(out)
    expected = ["README.md", "config.json", "eval", "fwsvd_report.json", "model.fwsvd.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(out)) == expected
    assert (out / "README.md").read_text() == "my notes" and (out / "eval" / "results.json").read_text() == "[]"
    expect_warning(
        caplog,
        "hf_fwsvd.serialization",
        f"Saving into the existing directory {out}: replacing config.json; keeping README.md, eval, tokenizer.json.",
        entry="save_pretrained",
        replacements={str(tmp_path): "<tmp>"},
    )
    with torch.no_grad():
        torch.testing.assert_close(AUTO.from_pretrained(out)(**INPUT).logits, model(**INPUT).logits)


def _chmod_read_only(path):
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def test_read_only_output_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _chmod_read_only(out)
    try:
        with fails_with(
            PermissionError,
            f"Cannot save into {str(out)!r}: {str(out)!r} is read-only. Choose a writable output directory or make it "
            "writable (chmod u+w).",
            entry="save_pretrained",
            replacements={str(tmp_path): "<tmp>"},
        ):
            compressed().save_pretrained(out)
    finally:
        out.chmod(0o755)
    assert os.listdir(out) == ["keep.txt"] and leftovers(tmp_path) == []


def test_read_only_parent_directory(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    _chmod_read_only(parent)
    try:
        with fails_with(
            PermissionError,
            f"Cannot save into {str(parent / 'out')!r}: {str(parent)!r} is read-only. Choose a writable output "
            "directory or make it writable (chmod u+w).",
            entry="save_pretrained",
            replacements={str(tmp_path): "<tmp>"},
        ):
            compressed().save_pretrained(parent / "out")
    finally:
        parent.chmod(0o755)
    assert os.listdir(parent) == []


def test_output_is_the_input_directory(tmp_path):
    source = tmp_path / "source"
    compressed().save_pretrained(source)
    before = digest(source)
    model = AUTO.from_pretrained(source)
    with fails_with(
        ValueError,
        f"Refusing to save into {str(source)!r}: it is the checkpoint this model was loaded from, and overwriting it "
        "would destroy the source. Save to a new directory.",
        entry="save_pretrained",
        replacements={str(tmp_path): "<tmp>"},
    ):
        model.save_pretrained(source)
    assert digest(source) == before and leftovers(tmp_path) == []


def test_dense_input_directory_is_never_overwritten_by_compress_on_load(saved_dense):
    dense_dir, _ = saved_dense("bert")
    before = digest(dense_dir)
    model = AUTO.from_pretrained(dense_dir, fwsvd_config=FWSVDConfig(rank=4, method="svd"))
    with pytest.raises(ValueError, match="it is the checkpoint this model was loaded from"):
        model.save_pretrained(dense_dir)
    assert digest(dense_dir) == before


def test_output_is_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a directory")
    with fails_with(
        ValueError,
        f"`save_directory` {str(target)!r} is a file, not a directory.",
        entry="save_pretrained",
        replacements={str(tmp_path): "<tmp>"},
    ):
        compressed().save_pretrained(target)
    assert target.read_text() == "not a directory"


def _disk_full_mid_write(monkeypatch, exception: BaseException):
    """Make transformers' safetensors writer write half a file, then fail (disk full, Ctrl-C, ...)."""

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 64)
        raise exception

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_write)


@pytest.mark.parametrize(
    "exception",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["disk-full", "interrupt"],
)
def test_interrupted_save_into_a_new_directory_leaves_nothing(tmp_path, monkeypatch, exception):
    _disk_full_mid_write(monkeypatch, exception)
    with pytest.raises(type(exception)):
        compressed().save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "exception",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["disk-full", "interrupt"],
)
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exception):
    out = tmp_path / "out"
    compressed(rank=4).save_pretrained(out)
    before = digest(out)
    _disk_full_mid_write(monkeypatch, exception)
    with pytest.raises(type(exception)):
        compressed(rank=2, seed=1).save_pretrained(out)
    assert digest(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_failure_while_swapping_directories_restores_the_previous_checkpoint(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out"
    compressed(rank=4).save_pretrained(out)
    before = digest(out)
    real_replace = os.replace

    def failing_exchange(first, second):
        if exchange:
            raise OSError(errno.EIO, "Input/output error")
        return False

    def failing_replace(source, destination):
        if ".tmp-" in os.fspath(source) and os.fspath(destination) == str(out):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, destination)

    monkeypatch.setattr(hf_fwsvd.atomic_dir, "exchange", failing_exchange)
    monkeypatch.setattr(hf_fwsvd.atomic_dir.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        compressed(rank=2, seed=1).save_pretrained(out)
    monkeypatch.setattr(hf_fwsvd.atomic_dir.os, "replace", real_replace)
    assert digest(out) == before and leftovers(tmp_path) == []


def test_stale_dense_weights_cannot_be_loaded_by_plain_transformers(tmp_path, monkeypatch):
    """A dense save followed by a compressed save into the same directory must not leave the dense weights behind
    for plain transformers to load in place of the compressed ones."""
    out = tmp_path / "out"
    tiny_bert().save_pretrained(out)
    assert (out / "model.safetensors").exists()
    compressed().save_pretrained(out)
    monkeypatch.delitem(quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "fwsvd")
    monkeypatch.delitem(quantizers_auto.AUTO_QUANTIZER_MAPPING, "fwsvd")
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(PreTrainedModel.from_pretrained.__wrapped__))
    with pytest.raises(OSError, match="Error no file named model.safetensors"):
        AUTO.from_pretrained(out)
