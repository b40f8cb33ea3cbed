"""A method added from outside the package, in this one file: registered, then used through every entry point.

`ConstantImportance` weighs every input feature by the same constant, read off a registered statistic so that it needs
calibration data (forward passes only). A constant importance is exactly plain SVD (see `hf_fwsvd.factorize`), which
gives every check an exact reference. Nothing outside this file knows the method.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping

import pytest
import torch
from cli_assets import save_classifier, sentences, write_csv
from conftest import calibration_data, tiny_llama
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress, compress_layerwise
from hf_fwsvd.cli import main
from hf_fwsvd.methods import CompressionMethod, available_methods, get_method, register_method, unregister_method
from hf_fwsvd.model_card import build_model_card

BUILT_INS = (
    "fwsvd",
    "svd",
    "tfwsvd",
    "whiten",
    "asvd",
    "fisher_whiten",
    "svdllm",
    "fisher_svdllm",
    "whiten_v2",
    "kfac_whiten",
    "kfac_svdllm",
)


class ConstantImportance(CompressionMethod):
    name = "constant"
    title = "constant-importance SVD (a test plug-in)"
    short_title = "constant"
    summary = "every input feature weighted by the same constant (equals plain SVD); reads calibration activations"
    calibration_use = "checking that activations reach every layer"
    statistics = ("activation_abs_mean",)
    plot_style = {"color": "black", "marker": "x", "linestyle": ":"}

    def importance(self, name: str, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return torch.full_like(stats["activation_abs_mean"][name], 3.0)


@pytest.fixture(autouse=True)
def constant_method():
    register_method(ConstantImportance)
    yield get_method("constant")
    unregister_method("constant")


def _llama_dir(tmp_path) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / "dense")
    tiny_llama().save_pretrained(path, max_shard_size="20KB")
    return path


def _config(method: str, **kwargs) -> FWSVDConfig:
    return FWSVDConfig(method=method, rank=3, calibration_dataset=calibration_data("llama"), batch_size=4, **kwargs)


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_registry_lists_it_after_the_built_ins_and_forgets_it():
    assert available_methods() == (*BUILT_INS, "constant")
    assert FWSVDConfig(method="constant").method == "constant"
    unregister_method("constant")
    with pytest.raises(ValueError) as error:
        FWSVDConfig(method="constant")
    assert str(error.value) == f"Unknown method 'constant'; choose one of {', '.join(BUILT_INS)}."
    register_method(ConstantImportance)  # the fixture unregisters it again


def test_compress_equals_plain_svd_and_reloads(tmp_path, sample_input):
    dense = _llama_dir(tmp_path)
    model = compress(AutoModelForCausalLM.from_pretrained(dense), _config("constant"), show_progress=False)
    svd = compress(AutoModelForCausalLM.from_pretrained(dense), _config("svd"), show_progress=False)
    low_rank = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    assert len(low_rank) == 14
    for name in low_rank:
        assert torch.equal(model.get_submodule(name).weight, svd.get_submodule(name).weight), name
    report = model.fwsvd_report
    assert report.method == "constant" and report.calibration_samples == 12
    for row in report.modules:  # a constant weighting scales both errors' norms alike
        assert row.weighted_error == pytest.approx(row.plain_error, rel=1e-6), row.name

    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["method"] == "constant"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.quantization_config.method == "constant"
    with torch.no_grad():
        assert torch.equal(model(**sample_input).logits, reloaded(**sample_input).logits)
    card = ModelCard.load(tmp_path / "saved" / "README.md").text
    assert '| Method | constant-importance SVD (a test plug-in) (`method="constant"`) |' in card
    assert "12 examples used for checking that activations reach every layer" in card
    assert "constant-importance SVD" in build_model_card(reloaded).text


def test_compress_layerwise_equals_compress_and_save(tmp_path):
    dense = _llama_dir(tmp_path)
    model = compress(AutoModelForCausalLM.from_pretrained(dense), _config("constant"), show_progress=False)
    model.save_pretrained(tmp_path / "in-memory")
    report = compress_layerwise(dense, tmp_path / "layerwise", _config("constant"), show_progress=False)
    assert report.method == "constant" and len(report.modules) == 14
    expected, tensors = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "layerwise")
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[key], value) for key, value in expected.items())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "layerwise")
    assert reloaded.config.quantization_config.method == "constant"


def test_cli_offers_it_with_its_summary_and_uses_it(tmp_path, capsys):
    assert main(["compress", "--help"]) == 0
    assert f"  constant       {ConstantImportance.summary}" in capsys.readouterr().out
    dense = save_classifier(tmp_path / "dense")
    train = write_csv(tmp_path / "train.csv", sentences(16, seed=0))
    args = ["compress", str(dense), "--task", "sequence-classification", "--method", "constant", "--rank", "3"]
    assert main(args + ["--data", str(train), "--output", str(tmp_path / "out"), "-q"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.quantization_config.method == "constant"
    card = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "train.csv (16 examples); 16 examples used for checking that activations reach every layer" in card

    assert main(args + ["--output", str(tmp_path / "no-data")]) == 2
    assert "--method constant needs calibration data: pass --data FILE" in capsys.readouterr().err

    sweep = ["sweep", str(dense), "--task", "sequence-classification", "--data", str(train), "--eval-data", str(train)]
    assert main(sweep + ["--methods", "constant,svd", "--ratios", "0.5", "--output", str(tmp_path / "s"), "-q"]) == 0
    with open(tmp_path / "s" / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["dense", "constant", "svd"]
    assert rows[1]["accuracy"] == rows[2]["accuracy"]  # a constant importance is plain SVD


def test_register_method_as_a_decorator_and_its_errors():
    @register_method
    class Scaled(ConstantImportance):
        name = "scaled_constant"

    try:
        assert isinstance(get_method("scaled_constant"), Scaled) and "scaled_constant" in available_methods()
    finally:
        unregister_method("scaled_constant")
    assert "scaled_constant" not in available_methods()

    class Clash(ConstantImportance):
        pass

    with pytest.raises(ValueError) as error:
        register_method(Clash)
    assert str(error.value) == (
        f"Method 'constant' is already registered by {__name__}.ConstantImportance; choose another name or call "
        "`unregister_method` first."
    )

    class NeedsMagic(ConstantImportance):
        name = "magic"
        statistics = ("magic_moment",)

    with pytest.raises(ValueError, match=r"^NeedsMagic needs the unknown statistic 'magic_moment'; register it"):
        register_method(NeedsMagic)

    class Untitled(CompressionMethod):
        name = "untitled"

    with pytest.raises(ValueError) as error:
        register_method(Untitled)
    assert str(error.value) == "Untitled must set the class attribute `title` (a non-empty str)."
    with pytest.raises(TypeError, match="takes a CompressionMethod subclass"):
        register_method(object)
    with pytest.raises(ValueError) as error:
        get_method("nope")
    assert str(error.value).startswith("Unknown method 'nope'; choose one of fwsvd, svd, tfwsvd,")
