"""The shared pipeline: the same statistics, cache, allocation and offloading for every method, in memory and block by
block, and the CLI's budget options."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from cli_assets import save_classifier, sentences, write_csv
from conftest import calibration_data, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_fwsvd.methods.calibrate
from hf_fwsvd import FWSVDConfig, LowRankLinear, compress, compress_layerwise
from hf_fwsvd.cli import main
from hf_fwsvd.methods import CompressionMethod, collect_statistics, register_method, unregister_method
from hf_fwsvd.targets import find_target_modules

# Blocks and final norm on disk: accelerate's hooks load them per forward (as in test_layerwise).
GPT2_OFFLOAD_MAP = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "lm_head": "cpu",
    "transformer.h": "disk", "transformer.ln_f": "disk",
}  # fmt: skip


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _dense(tmp_path, build=tiny_llama) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / "dense")
    build().save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.mark.parametrize("method", ["fwsvd", "whiten"])
def test_param_budget_block_by_block_equals_in_memory(tmp_path, method):
    dense = _dense(tmp_path)
    config = FWSVDConfig(method=method, param_budget=0.4, calibration_dataset=calibration_data("llama"), batch_size=4)
    model = compress(AutoModelForCausalLM.from_pretrained(dense), config, show_progress=False)
    model.save_pretrained(tmp_path / "in-memory")
    report = compress_layerwise(dense, tmp_path / "layerwise", config, show_progress=False)
    assert report.dense_modules == model.fwsvd_report.dense_modules
    assert [row.rank for row in report.modules] == [row.rank for row in model.fwsvd_report.modules]
    assert len(set(model.config.quantization_config.ranks.values())) > 1  # the allocation really varied the ranks
    expected, tensors = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "layerwise")
    assert sorted(tensors) == sorted(expected)
    assert all(torch.equal(tensors[key], value) for key, value in expected.items())


def test_activation_statistics_with_an_offloading_device_map(tmp_path):
    dense = _dense(tmp_path, tiny_gpt2)
    config = FWSVDConfig(method="whiten", calibration_dataset=calibration_data("gpt2"), batch_size=4)
    plain = AutoModelForCausalLM.from_pretrained(dense)
    offloaded = AutoModelForCausalLM.from_pretrained(
        dense, device_map=GPT2_OFFLOAD_MAP, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.transformer.h[0].attn.c_attn.weight.device.type == "meta"  # really offloaded
    expected = collect_statistics(plain, config, find_target_modules(plain, config), show_progress=False)
    stats = collect_statistics(offloaded, config, find_target_modules(offloaded, config), show_progress=False)
    assert list(stats) == ["activation_second_moment"] and len(stats["activation_second_moment"]) == 8
    for name, value in expected["activation_second_moment"].items():
        torch.testing.assert_close(stats["activation_second_moment"][name], value, rtol=1e-5, atol=1e-7)


def test_cache_keeps_every_statistic_and_a_restart_collects_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "stats.safetensors"
    data = calibration_data("llama")
    reference = compress(tiny_llama_seeded(), FWSVDConfig(method="whiten", rank=3, calibration_dataset=data))
    first = compress(
        tiny_llama_seeded(), FWSVDConfig(method="whiten", rank=3, calibration_dataset=data, importances_cache=cache)
    )
    saved = load_file(cache)
    assert len(saved) == 14 and all(key.startswith("activation_second_moment/model.layers.") for key in saved)

    def no_collection(*args, **kwargs):
        raise AssertionError("collected again despite the cache")

    monkeypatch.setattr(hf_fwsvd.methods.calibrate, "collect", no_collection)
    again = compress(tiny_llama_seeded(), FWSVDConfig(method="whiten", rank=3, importances_cache=cache))
    for model in (first, again):
        state, expected = model.state_dict(), reference.state_dict()
        assert all(torch.equal(state[key], value) for key, value in expected.items())
    # a method needing another statistic collects only that one and adds it to the file
    monkeypatch.undo()
    compress(
        tiny_llama_seeded(), FWSVDConfig(method="fwsvd", rank=3, calibration_dataset=data, importances_cache=cache)
    )
    saved = load_file(cache)
    assert len(saved) == 28 and sum("/" not in key for key in saved) == 14  # the row Fisher under bare names


def tiny_llama_seeded():
    torch.manual_seed(0)
    return tiny_llama()


def test_cli_param_budget_and_allocation(tmp_path, capsys):
    dense = save_classifier(tmp_path / "dense")
    train = write_csv(tmp_path / "train.csv", sentences(16, seed=0))
    base = ["compress", str(dense), "--task", "sequence-classification", "-q"]
    args = ["--method", "whiten", "--param-budget", "0.6", "--allocation-power", "1", "--data", str(train)]
    assert main(base + args + ["--output", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (saved["method"], saved["param_budget"], saved["allocation"], saved["allocation_power"]) == (
        "whiten", 0.6, "fisher", 1,
    )  # fmt: skip
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    capsys.readouterr()

    uniform = ["--method", "svd", "--param-budget", "0.6", "--allocation", "uniform", "--output", str(tmp_path / "u")]
    assert main(base + uniform) == 0
    saved = json.loads((tmp_path / "u" / "config.json").read_text())["quantization_config"]
    assert saved["allocation"] == "uniform"  # floor(0.6 * out * in / (out + in)) everywhere
    assert {(16 * 16 * 6 // 10) // 32, (32 * 16 * 6 // 10) // 48} == set(saved["ranks"].values()) == {4, 6}

    assert main(base + ["--method", "svd", "--param-budget", "0.6", "--output", str(tmp_path / "f")]) == 2
    assert (
        "--allocation fisher (the default with --param-budget) needs calibration data: pass --data FILE (or use "
        "--allocation uniform)." in capsys.readouterr().err
    )
    assert main(base + ["--method", "svd", "--allocation", "uniform", "--output", str(tmp_path / "a")]) == 2
    assert "`allocation='uniform'` needs `param_budget=` (a fraction of parameters)." in capsys.readouterr().err
    too_much = ["--method", "svd", "--param-budget", "1.5", "--allocation", "uniform", "--output", str(tmp_path / "b")]
    assert main(base + too_much) == 2
    assert "--param-budget must be in (0, 1), got 1.5" in capsys.readouterr().err


class HalvedSVD(CompressionMethod):
    """Plain SVD, then a model-level step that halves every `up` factor (stands in for a sequential update)."""

    name = "halved_svd"
    title = "plain SVD with a halving refinement (a test plug-in)"
    short_title = "halved SVD"
    summary = "plain SVD, then every up factor halved after replacement"
    calibration_use = "the refinement step"
    statistics = ()
    plot_style = {}
    calls: list = []

    def refine_model(self, model, compressed_names, calibration_batches, config):
        self.calls.append((list(compressed_names), len(list(calibration_batches))))
        if config.refine_iterations == 13:
            raise RuntimeError("refinement failed")
        with torch.no_grad():
            for name in compressed_names:
                model.get_submodule(name).up.weight.mul_(0.5)


def test_refine_model_runs_after_replacement_and_before_the_report(tmp_path):
    register_method(HalvedSVD)
    try:
        data = calibration_data("llama")
        svd = compress(tiny_llama_seeded(), FWSVDConfig(method="svd", rank=3), show_progress=False)
        model = compress(tiny_llama_seeded(), FWSVDConfig(method="halved_svd", rank=3, calibration_dataset=data))
        names = list(model.config.quantization_config.ranks)
        assert HalvedSVD.calls == [(names, 2)]  # every compressed module; the 12 examples in batches of 8
        for name in names:
            assert torch.equal(model.get_submodule(name).up.weight, 0.5 * svd.get_submodule(name).up.weight)
        halved = {row.name: row.plain_error for row in model.fwsvd_report.modules}
        plain = {row.name: row.plain_error for row in svd.fwsvd_report.modules}
        assert all(halved[name] > plain[name] for name in names)  # the report describes the refined model

        dense = tiny_llama_seeded()
        before = {key: value.clone() for key, value in dense.state_dict().items()}
        failing = FWSVDConfig(method="halved_svd", rank=3, calibration_dataset=data, refine_iterations=13)
        with pytest.raises(RuntimeError, match="refinement failed"):
            compress(dense, failing, show_progress=False)
        assert not any(isinstance(module, LowRankLinear) for module in dense.modules())  # rolled back
        assert all(torch.equal(dense.state_dict()[key], value) for key, value in before.items())

        path = _dense(tmp_path)
        with pytest.raises(ValueError) as error:
            compress_layerwise(path, tmp_path / "out", FWSVDConfig(method="halved_svd", rank=3))
        assert str(error.value) == (
            "method='halved_svd' refines the whole compressed model after factorising (HalvedSVD.refine_model), "
            "which needs the model in memory: load it and use `compress`."
        )
    finally:
        unregister_method("halved_svd")


def test_cli_sweep_over_parameter_budgets(tmp_path, capsys):
    dense = save_classifier(tmp_path / "dense")
    train = write_csv(tmp_path / "train.csv", sentences(16, seed=0))
    args = ["sweep", str(dense), "--task", "sequence-classification", "--data", str(train), "--eval-data", str(train)]
    args += ["--methods", "whiten,fisher_whiten", "--ratio-kind", "param-budget", "--ratios", "0.5,0.7"]
    assert main(args + ["--allocation", "uniform", "--output", str(tmp_path / "s"), "-q"]) == 0
    with open(tmp_path / "s" / "sweep.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["method"] != "dense"]
    assert [(row["method"], row["ratio_kind"], row["ratio"]) for row in rows] == [
        ("whiten", "param-budget", "0.5"), ("whiten", "param-budget", "0.7"),
        ("fisher_whiten", "param-budget", "0.5"), ("fisher_whiten", "param-budget", "0.7"),
    ]  # fmt: skip
    assert rows[0]["parameters"] == rows[2]["parameters"] and rows[1]["parameters"] == rows[3]["parameters"]
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 10_000
    capsys.readouterr()
    rank_ratios = args[:-4] + ["--ratios", "0.5", "--allocation", "uniform", "--output", str(tmp_path / "u")]
    assert main(rank_ratios) == 2
    assert "--allocation and --allocation-power need --ratio-kind param-budget." in capsys.readouterr().err
