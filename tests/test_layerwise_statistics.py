"""The block-wise calibration pass of `compress_layerwise`: the same statistics as the in-memory collector."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ARCHITECTURES, calibration_data
from transformers import AlbertConfig, AlbertForSequenceClassification, AutoModelForCausalLM

import hf_fwsvd.layerwise
from hf_fwsvd import FWSVDConfig, compress, compress_layerwise
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.layerwise import _blocks, _group_keys, _weight_files
from hf_fwsvd.layerwise_statistics import _CheckpointBlocks
from hf_fwsvd.methods import available_methods, get_method
from hf_fwsvd.statistics import FISHER_ESTIMATORS, collect, get_statistic
from hf_fwsvd.statistics.blockwise import BlockwiseUnsupported, collect_blockwise
from hf_fwsvd.targets import find_target_modules

# every statistic some registered method reads, so a new method's statistics are checked here at once
STATISTICS = tuple(dict.fromkeys(key for method in available_methods() for key in get_method(method).statistics))
ARCHS = ("bert", "llama", "gpt2", "roberta", "distilbert")
FAST = ("bert", "llama")


def _saved(tmp_path, arch: str) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    path = str(tmp_path / arch)
    model.save_pretrained(path, max_shard_size="20KB")
    return model, path


def _blockwise(model: torch.nn.Module, path: str, batches, modules: list[str], statistics, estimator: str):
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    files = _weight_files(path)
    blocks = _blocks(skeleton)
    groups = dict(_group_keys(list(files), blocks))
    source = _CheckpointBlocks(skeleton, files, {"": [], **groups}, None)
    source.load("")
    targets = {name: skeleton.get_submodule(name) for name in modules}
    stats = collect_blockwise(
        skeleton, blocks, source.load, source.free, batches, targets, statistics, None, False, estimator
    )
    assert all(param.is_meta for block in blocks for param in skeleton.get_submodule(block).parameters())
    return stats


# every architecture with every statistic (gpt2, roberta, distilbert in the slow suite); the other Fisher estimators
# (backward statistics only) on bert and llama
CASES = [
    pytest.param(arch, "empirical", id=f"{arch}-empirical", marks=() if arch in FAST else pytest.mark.slow)
    for arch in ARCHS
] + [
    pytest.param(arch, estimator, id=f"{arch}-{estimator}")
    for arch in FAST
    for estimator in FISHER_ESTIMATORS
    if estimator != "empirical"
]


@pytest.mark.parametrize(("arch", "estimator"), CASES)
def test_blockwise_statistics_equal_the_in_memory_collector(tmp_path, arch, estimator):
    model, path = _saved(tmp_path, arch)
    batches = list(build_calibration_loader(calibration_data(arch), None, model, batch_size=4))
    modules = list(find_target_modules(model, FWSVDConfig()))
    if arch == "bert":
        modules.append("bert.pooler.dense")  # a target after the blocks
    statistics = STATISTICS if estimator == "empirical" else [s for s in STATISTICS if get_statistic(s).needs_backward]
    expected = collect(model, batches, modules, statistics, show_progress=False, fisher_estimator=estimator)
    got = _blockwise(model, path, batches, modules, statistics, estimator)
    assert sorted(got) == sorted(expected) == sorted(statistics)
    assert got.samples == expected.samples == 12
    assert got.tokens == expected.tokens
    for key in statistics:
        for name in modules:
            assert expected[key][name].abs().max() > 0
            torch.testing.assert_close(got[key][name], expected[key][name], rtol=1e-5, atol=0, msg=f"{key} {name}")


def test_forward_only_statistics_never_run_the_head(tmp_path, monkeypatch):
    model, path = _saved(tmp_path, "llama")
    batches = list(build_calibration_loader(calibration_data("llama"), None, model, batch_size=4))
    modules = list(find_target_modules(model, FWSVDConfig()))
    calls = []
    original = torch.nn.Linear.forward
    monkeypatch.setattr(
        torch.nn.Linear, "forward", lambda self, x: (calls.append(self.out_features), original(self, x))[1]
    )
    _blockwise(model, path, batches, modules, ["activation_second_moment"], "empirical")
    assert 64 not in calls  # the vocabulary-sized lm_head never ran


def tiny_albert(num_hidden_layers: int) -> AlbertForSequenceClassification:
    """ALBERT shares one layer across its blocks: the model the block-wise pass must refuse."""
    config = AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=num_hidden_layers,
                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    return AlbertForSequenceClassification(config).eval()


def test_a_shared_block_is_refused_before_the_pass(tmp_path):
    model = tiny_albert(num_hidden_layers=3)
    path = str(tmp_path / "albert")
    model.save_pretrained(path)
    batches = list(build_calibration_loader(calibration_data("bert"), None, model, batch_size=4))
    modules = ["albert.encoder.albert_layer_groups.0.albert_layers.0.ffn"]
    with pytest.raises(BlockwiseUnsupported, match=r"called its blocks in the order \[0, 0, 0\] on batch 0"):
        _blockwise(model, path, batches, modules, ["row_fisher"], "empirical")


@pytest.mark.parametrize("method", ["fwsvd", "tfwsvd", "whiten"])
def test_compress_layerwise_collects_block_by_block(tmp_path, monkeypatch, method):
    torch.manual_seed(0)
    dense = str(tmp_path / "dense")
    ARCHITECTURES["llama"]().save_pretrained(dense, max_shard_size="20KB")

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded for the calibration pass")

    monkeypatch.setattr(hf_fwsvd.layerwise, "_estimate", refuse)
    config = FWSVDConfig(rank=4, method=method, calibration_dataset=calibration_data("llama"), batch_size=4)
    report = compress_layerwise(dense, tmp_path / "out", config, show_progress=False)
    expected = compress(AutoModelForCausalLM.from_pretrained(dense), config, show_progress=False)
    assert report.to_dict() == expected.fwsvd_report.to_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    inputs = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, expected(inputs).logits)


def test_compress_layerwise_falls_back_to_loading_a_shared_block_model(tmp_path, caplog):
    model = tiny_albert(num_hidden_layers=2)
    model.save_pretrained(tmp_path / "albert")
    config = FWSVDConfig(
        rank=4, method="fwsvd", calibration_dataset=calibration_data("bert"), batch_size=4,
        target_modules=["ffn", "ffn_output"],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.layerwise"):
        report = compress_layerwise(tmp_path / "albert", tmp_path / "out", config, show_progress=False)
    assert "called its blocks in the order [0, 0]" in caplog.text
    assert "Loading the whole model for the calibration pass instead." in caplog.text
    assert len(report.modules) == 2
