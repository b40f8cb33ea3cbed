"""Reliability: broken FWSVD checkpoints fail with errors naming the file or module, never load random weights."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert
from reliability_cases import expect_warning, fails_with
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.quantizers import auto as quantizers_auto

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.quantizer import FWSVDHfQuantizer

AUTO = AutoModelForSequenceClassification
WEIGHTS = "model.fwsvd.safetensors"
DENSE = "bert.encoder.layer.0.attention.output.dense"
INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed tiny BERT saved once; each test copies it. Returns (dir, expected logits)."""
    torch.manual_seed(0)
    model = compress(tiny_bert(), FWSVDConfig(rank=4, method="svd"), show_progress=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "good"
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(**INPUT).logits
    return path, logits


def digest(directory) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in sorted(os.listdir(directory))
    }


@pytest.fixture
def broken(saved, tmp_path):
    """Factory: a copy of the good checkpoint, with an optional edit of its quantization_config."""
    source, _ = saved

    def make(edit=None):
        path = tmp_path / "ckpt"
        shutil.copytree(source, path)
        if edit is not None:
            config = json.loads((path / "config.json").read_text())
            edit(config["quantization_config"])
            (path / "config.json").write_text(json.dumps(config))
        return path

    return make


def load(path):
    return AUTO.from_pretrained(path)


def tmp_names(path) -> dict[str, str]:
    return {str(path): "<ckpt>"}


def test_good_checkpoint_loads_with_the_plugin(saved):
    path, logits = saved
    before = digest(path)
    with torch.no_grad():
        torch.testing.assert_close(load(path)(**INPUT).logits, logits)  # exact equality: test_roundtrip.py
    assert digest(path) == before  # loading never modifies the source


def test_truncated_weights(broken):
    path = broken()
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    message = (
        f"Weights file '{path}/{WEIGHTS}' is not a valid safetensors file (Error while deserializing header: "
        "incomplete metadata, file not fully covered). It is truncated or corrupt (an interrupted download, copy or "
        "save?): download it again (`force_download=True`) or re-save the checkpoint."
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=tmp_names(path)):
        load(path)


def test_corrupt_header(broken):
    path = broken()
    data = bytearray((path / WEIGHTS).read_bytes())
    data[8:16] = b"garbage!"
    (path / WEIGHTS).write_bytes(bytes(data))
    message = (
        f"Weights file '{path}/{WEIGHTS}' is not a valid safetensors file (Error while deserializing header: "
        "invalid JSON in header: expected value at line 1 column 1). It is truncated or corrupt (an interrupted "
        "download, copy or save?): download it again (`force_download=True`) or re-save the checkpoint."
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=tmp_names(path)):
        load(path)


def test_missing_weights_file(broken):
    path = broken()
    (path / WEIGHTS).unlink()
    message = (
        f"Weights file '{path}/{WEIGHTS}' is missing: the checkpoint is incomplete (an interrupted download or "
        "copy?). Download it again (`force_download=True`) or re-save the checkpoint."
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=tmp_names(path)):
        load(path)


def _set_rank(config):
    config["ranks"][DENSE] = 2


def _drop_rank(config):
    del config["ranks"][DENSE]


def _set_and_add_rank(config):
    config["ranks"][DENSE] = 2
    config["ranks"]["classifier"] = 1


RANK_MAP_CASES = {
    "rank-differs-from-tensors": (
        _set_rank,
        "The FWSVD checkpoint in <ckpt> does not match the rank map in its config.json "
        "(`quantization_config.ranks`): "
        f"`{DENSE}.down.weight` has shape [4, 16] in {WEIGHTS}, but rank 2 for `{DENSE}` needs [2, 16]; "
        f"`{DENSE}.up.weight` has shape [16, 4] in {WEIGHTS}, but rank 2 for `{DENSE}` needs [16, 2]. The config.json "
        "was edited or belongs to another checkpoint. Re-export it with `save_pretrained` from the compressed model.",
    ),
    "module-missing-from-rank-map": (
        _drop_rank,
        "The FWSVD checkpoint in <ckpt> does not match the rank map in its config.json "
        "(`quantization_config.ranks`): "
        f"`{DENSE}` is factorised in the weights but missing from the rank map (it would load as a randomly "
        "initialised dense layer). The config.json was edited or belongs to another checkpoint. Re-export it with "
        "`save_pretrained` from the compressed model.",
    ),
    "rank-map-names-a-dense-module": (
        lambda config: config["ranks"].__setitem__("classifier", 1),
        "The FWSVD checkpoint in <ckpt> does not match the rank map in its config.json (`quantization_config.ranks`): "
        "`classifier.down.weight` is missing from the weights; `classifier.up.weight` is missing from the weights; "
        "`classifier.up.bias` is missing from the weights. The config.json was edited or belongs to another "
        "checkpoint. Re-export it with `save_pretrained` from the compressed model.",
    ),
    "rank-map-names-an-unknown-module": (
        lambda config: config["ranks"].__setitem__("bert.encoder.layer.7.output.dense", 4),
        "The checkpoint's rank map names `bert.encoder.layer.7.output.dense`, which BertForSequenceClassification "
        "does not have: the quantization_config does not belong to this model architecture.",
    ),
    "rank-map-names-a-non-linear-module": (
        lambda config: config["ranks"].__setitem__("bert.encoder.layer.0.output.LayerNorm", 4),
        "The checkpoint's rank map names `bert.encoder.layer.0.output.LayerNorm`, a LayerNorm in "
        "BertForSequenceClassification, not a linear layer: the quantization_config does not match this model.",
    ),
    "rank-map-rank-too-large": (
        lambda config: config["ranks"].__setitem__(DENSE, 16),
        f"The checkpoint's rank 16 for `{DENSE}` (16x16) is impossible: ranks must be in [1, 15].",
    ),
    "no-rank-map": (
        lambda config: config.pop("ranks"),
        "This checkpoint's quantization_config has quant_method 'fwsvd' but no rank map (`ranks`): it was not written "
        "by hf_fwsvd's save_pretrained, or it was edited. Re-export it from the compressed model.",
    ),
    "rank-map-bad-value": (
        lambda config: config["ranks"].__setitem__(DENSE, "4"),
        f"`ranks['{DENSE}']` must be a positive int, got '4' (str).",
    ),
    "weights-file-not-recorded": (
        lambda config: config.pop("weights_file"),
        "Weights file '<ckpt>/model.safetensors' is missing: the checkpoint is incomplete (an interrupted download or "
        "copy?). Download it again (`force_download=True`) or re-save the checkpoint.",
    ),
    "quant-method-typo": (
        lambda config: config.__setitem__("quant_method", "fwsvdd"),
        "<ckpt>/config.json has `quantization_config.quant_method` = 'fwsvdd', which no quantization method is "
        "registered under, but the checkpoint looks like an FWSVD one (it has a rank map or FWSVD weight file). "
        "transformers would skip the quantization and fail or load random weights. Fix config.json: set "
        '"quant_method": "fwsvd".',
    ),
}


@pytest.mark.parametrize("edit,message", list(RANK_MAP_CASES.values()), ids=list(RANK_MAP_CASES))
def test_config_does_not_match_weights(broken, edit, message):
    path = broken(edit)
    with fails_with(ValueError, message.replace("<ckpt>", str(path)), "from_pretrained", tmp_names(path)):
        load(path)


def test_several_rank_map_problems_are_reported_together(broken):
    path = broken(_set_and_add_rank)
    with pytest.raises(ValueError, match="but rank 2 for `bert.encoder.layer.0.attention.output.dense` needs") as info:
        load(path)
    assert "`classifier.up.bias` is missing from the weights" in str(info.value)


def test_nan_in_loaded_factors(broken):
    path = broken()
    tensors = load_file(path / WEIGHTS)
    tensors[f"{DENSE}.up.weight"][0, 0] = float("nan")
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    message = (
        f"The checkpoint's `{DENSE}.up.weight` holds NaN/Inf values: the weights file is corrupt or was saved from a "
        "broken model. Re-export it with `save_pretrained` from the compressed model."
    )
    with fails_with(ValueError, message, entry="from_pretrained"):
        load(path)


def test_newer_config_keys_are_dropped_with_a_warning(broken, saved, caplog):
    def newer(config):
        config["hf_fwsvd_version"] = "9.0.0"
        config["fancy_new_option"] = True

    path = broken(newer)
    with caplog.at_level("WARNING", logger="hf_fwsvd.config"):
        model = load(path)
    with torch.no_grad():
        torch.testing.assert_close(model(**INPUT).logits, saved[1])
    expect_warning(
        caplog,
        "hf_fwsvd.config",
        "Ignoring FWSVDConfig keys unknown to hf_fwsvd 0.1.0: fancy_new_option (written by hf_fwsvd 9.0.0; upgrade "
        "to use them).",
        entry="from_pretrained",
    )


class _Payload:
    """Unpickling this creates a marker file: proof that something unpickled the checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_never_unpickled(broken, tmp_path):
    path = broken()
    (path / WEIGHTS).unlink()
    marker = tmp_path / "UNPICKLED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    message = (
        f"{path} is an FWSVD checkpoint with only pickle weights (pytorch_model.bin). hf_fwsvd never unpickles "
        "checkpoints (pickle can run arbitrary code) and FWSVD checkpoints are safetensors only: convert the file to "
        "safetensors in a trusted environment. Re-export it with `save_pretrained` from the compressed model."
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=tmp_names(path)):
        load(path)
    assert not marker.exists()


def test_pickle_file_reaching_the_quantizer_is_refused(tmp_path):
    """A remote repo is checked on its downloaded files: a resolved pickle file is refused before loading."""
    model = tiny_bert()
    quantizer = FWSVDHfQuantizer(FWSVDConfig(ranks={DENSE: 4}), pre_quantized=True)
    bin_path = str(tmp_path / "pytorch_model.bin")
    message = (
        f"Refusing to load {bin_path!r}: it is a pickle file, and hf_fwsvd never unpickles checkpoints (pickle can "
        "run arbitrary code). FWSVD checkpoints are safetensors only. Re-export it with `save_pretrained` from the "
        "compressed model."
    )
    with fails_with(ValueError, message, entry="from_pretrained (Hub)", replacements={str(tmp_path): "<ckpt>"}):
        quantizer._process_model_before_weight_loading(model, checkpoint_files=[bin_path])


def _plain_transformers(monkeypatch):
    """Undo what importing hf_fwsvd did: no `fwsvd` quantization method, the original `from_pretrained`."""
    monkeypatch.delitem(quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "fwsvd")
    monkeypatch.delitem(quantizers_auto.AUTO_QUANTIZER_MAPPING, "fwsvd")
    original = PreTrainedModel.from_pretrained.__func__.__wrapped__
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(original))


def test_loading_without_the_plugin_fails_loudly(saved, monkeypatch):
    """Plain transformers must not load random weights into the compressed layers: it finds no weight file."""
    path, _ = saved
    _plain_transformers(monkeypatch)
    message = f"Error no file named model.safetensors, or pytorch_model.bin, found in directory {path}."
    with fails_with(OSError, message, entry="plain transformers (no hf_fwsvd)", replacements=tmp_names(path)):
        load(path)


@pytest.mark.slow
def test_loading_without_the_plugin_in_a_fresh_process(saved):
    path, _ = saved
    code = "import sys\nfrom transformers import AutoModelForSequenceClassification as A\n"
    code += "A.from_pretrained(sys.argv[1])\n"
    env = {**os.environ, "PYTHONPATH": "", "TRANSFORMERS_VERBOSITY": "warning"}
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    error = f"OSError: Error no file named model.safetensors, or pytorch_model.bin, found in directory {path}."
    assert error in result.stderr and "Unknown quantization type, got fwsvd" in result.stderr, result.stderr[-2000:]
