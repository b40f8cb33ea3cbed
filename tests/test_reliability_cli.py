"""Reliability: the CLI checks output paths and the network before any work, and every error is one line."""

from __future__ import annotations

import json
import os
import struct

import pytest
from cli_assets import save_classifier, sentences, write_csv
from reliability_cases import record_text

import hf_fwsvd.api
from hf_fwsvd.cli import main

SEQ = "sequence-classification"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-rel")
    dense = save_classifier(root / "dense")
    data = write_csv(root / "train.csv", sentences(12, seed=0))
    out = root / "ck"
    assert (
        main(["compress", str(dense), "--task", SEQ, "--method", "svd", "--rank", "2", "--output", str(out), "-q"])
        == 0
    )
    return {"root": root, "dense": dense, "data": data, "ck": out}


def one_line(capsys, command: str, message: str, root) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"hf-fwsvd {command}: error: ")]
    assert lines == [f"hf-fwsvd {command}: error: {message}"], err
    assert "Traceback" not in err
    record_text("one line", message.replace(str(root), "<tmp>"), f"hf-fwsvd {command}")


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if compression starts (the checks must come first)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("compress ran before the output/network checks")

    monkeypatch.setattr(hf_fwsvd.api, "compress", forbidden)


def compress_args(work, *extra):
    return ["compress", str(work["dense"]), "--task", SEQ, "--data", str(work["data"]), *extra]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_is_found_before_the_fisher_pass(work, tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(compress_args(work, "--output", str(locked / "out"))) == 2
    finally:
        locked.chmod(0o755)
    one_line(capsys, "compress", f"--output {str(locked / 'out')!r} cannot be written: {str(locked)!r} is not "
             "writable. Choose a writable folder.", tmp_path)  # fmt: skip


def test_output_under_a_file_is_found_before_the_fisher_pass(work, tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out"
    assert main(compress_args(work, "--output", str(target))) == 2
    message = (
        f"--output {str(target)!r} cannot be written: {str(tmp_path / 'file')!r} is not writable. Choose a writable "
        "folder."
    )
    one_line(capsys, "compress", message, tmp_path)


def test_report_json_in_a_missing_folder_is_found_before_work(work, tmp_path, capsys, no_work):
    report = tmp_path / "missing" / "r.json"
    assert main(compress_args(work, "--output", str(tmp_path / "o"), "--report-json", str(report))) == 2
    message = (
        f"--report-json {str(report)!r} cannot be written: {str(tmp_path / 'missing')!r} is not a writable folder."
    )
    one_line(capsys, "compress", message, tmp_path)


def test_push_to_hub_without_network_fails_before_work(work, tmp_path, capsys, no_work, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert main(compress_args(work, "--output", str(tmp_path / "o"), "--push-to-hub", "me/model")) == 2
    err = capsys.readouterr().err
    line = [line for line in err.splitlines() if line.startswith("hf-fwsvd compress: error: ")]
    assert len(line) == 1 and line[0].startswith(
        "hf-fwsvd compress: error: --push-to-hub 'me/model': cannot reach http://127.0.0.1:9 ("
    ), err
    assert line[0].endswith(
        "Check the network (or HF_ENDPOINT), or drop --push-to-hub and upload the folder later with "
        "`huggingface-cli upload`."
    )
    assert not (tmp_path / "o").exists()


def test_push_to_hub_in_offline_mode_fails_before_work(work, tmp_path, capsys, no_work, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(compress_args(work, "--output", str(tmp_path / "o"), "--push-to-hub", "me/model")) == 2
    message = (
        "--push-to-hub 'me/model': HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset it, or drop --push-to-hub."
    )
    one_line(capsys, "compress", message, tmp_path)


@pytest.fixture
def copy(work, tmp_path):
    import shutil

    path = tmp_path / "ck"
    shutil.copytree(work["ck"], path)
    return path


def _truncate(path):
    weights = path / "model.fwsvd.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _absurd_header(path):
    weights = path / "model.fwsvd.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2**62) + data[8:])


def _bad_config(path):
    (path / "config.json").write_text('{"architectures": ["Bert')


def _config_list(path):
    (path / "config.json").write_text("[1, 2]")


INSPECT = {
    "truncated-file": (_truncate, "Weights file '{p}/model.fwsvd.safetensors' is not a valid safetensors file ("),
    "absurd-header": (_absurd_header, "Weights file '{p}/model.fwsvd.safetensors' is not a valid safetensors file ("),
    "corrupt-config": (
        _bad_config,
        "'{p}/config.json' is not readable JSON (Unterminated string starting at: line 1 "
        "column 20 (char 19)): restore it from the original checkpoint.",
    ),  # fmt: skip
    "config-not-an-object": (_config_list, "'{p}/config.json' holds a list, not a model config object."),
}


@pytest.mark.parametrize(("damage", "start"), INSPECT.values(), ids=INSPECT.keys())
def test_inspect_damaged_checkpoint_is_one_line(copy, capsys, damage, start):
    damage(copy)
    assert main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-fwsvd inspect: error: " + start.format(p=copy)), err
    record_text("one line", lines[0].removeprefix("hf-fwsvd inspect: error: ").replace(str(copy), "<ckpt>"),
                "hf-fwsvd inspect")  # fmt: skip


@pytest.mark.parametrize("damage", [_truncate, _absurd_header], ids=["truncated", "absurd-header"])
def test_export_dense_on_a_damaged_checkpoint_is_one_line(copy, tmp_path, capsys, damage):
    damage(copy)
    assert main(["export-dense", str(copy), str(tmp_path / "dense")]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hf-fwsvd export-dense: error: Cannot load the checkpoint '{copy}': Weights file ")
    assert not (tmp_path / "dense").exists()


def test_unexpected_failure_is_still_one_line(work, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be async")

    monkeypatch.setattr(hf_fwsvd.api, "compress", boom)
    assert main(compress_args(work, "--method", "svd", "--rank", "2", "--output", str(tmp_path / "o"))) == 1
    one_line(capsys, "compress", "RuntimeError: CUDA error: an illegal memory access was encountered CUDA kernel "
             "errors might be async", tmp_path)  # fmt: skip


@pytest.mark.parametrize("flag", ["--eval-limit", "--limit"])
def test_evaluate_limit_has_the_compress_name_and_keeps_the_old_one(work, capsys, flag):
    assert main(["evaluate", str(work["ck"]), "--task", SEQ, "--data", str(work["data"]), flag, "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 5


def test_evaluate_bad_limit_uses_the_new_name(work, capsys):
    assert main(["evaluate", str(work["ck"]), "--task", SEQ, "--data", str(work["data"]), "--limit", "0"]) == 2
    one_line(capsys, "evaluate", "--eval-limit must be positive, got 0.", work["root"])
