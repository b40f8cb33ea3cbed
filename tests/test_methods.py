"""Every method end to end: compress, save, reload; activation methods on causal LMs; recovery fine-tuning."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, calibration_data, tiny_bert, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress
from hf_fwsvd.activations import collect_activation_statistics
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.factorize import factorize
from hf_fwsvd.finetune import finetune
from hf_fwsvd.methods import available_methods

METHODS = available_methods()  # the registry: a new method is tested here at once


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_method_compresses_saves_and_reloads(arch, method, tmp_path, sample_input):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    compress(
        model, FWSVDConfig(method=method, rank=3, calibration_dataset=calibration_data(arch)), show_progress=False
    )
    assert model.config.quantization_config.method == method
    assert all(module.rank == 3 for module in model.modules() if isinstance(module, LowRankLinear))
    model.save_pretrained(tmp_path / "m")
    auto = AutoModelForCausalLM if arch == "llama" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path / "m")
    assert reloaded.config.quantization_config.method == method
    state, again = model.state_dict(), reloaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    with torch.no_grad():
        assert torch.allclose(model(**sample_input).logits, reloaded(**sample_input).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_every_method_hands_a_fine_tune_factors_of_the_same_scale(arch, method):
    # Adam moves every weight by about the learning rate, so a fine-tune of the factors needs `up` columns of norm
    # about 1 (orthonormal, or refitted from that start), as `svd` gives. `kfac_*` once returned `L^-T U_r` with
    # columns of norm up to 10 here (up to 980 on all-mpnet-base-v2), and issue #15's recovery fine-tune collapsed.
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    compress(
        model, FWSVDConfig(method=method, rank=3, calibration_dataset=calibration_data(arch)), show_progress=False
    )
    norms = torch.cat(
        [module.up.weight.norm(dim=0) for module in model.modules() if isinstance(module, LowRankLinear)]
    )
    assert 1 / 3 < norms.min() and norms.max() < 3, (norms.min().item(), norms.max().item())


def test_whiten_and_asvd_factors_match_the_maths():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    data = calibration_data("llama")
    name = "model.layers.1.mlp.down_proj"
    weight = model.get_submodule(name).weight.detach().clone()
    stats = collect_activation_statistics(
        model, build_calibration_loader(data, model=model), [name], show_progress=False
    )
    for method, importance in (("whiten", stats.second_moment[name]), ("asvd", stats.abs_mean[name])):
        torch.manual_seed(0)
        compressed = compress(
            tiny_llama().eval(), FWSVDConfig(method=method, rank=4, calibration_dataset=data), show_progress=False
        )
        expected = factorize(weight, 4, importance).product()
        assert torch.allclose(compressed.get_submodule(name).weight, expected, atol=1e-5), method


def test_activation_methods_need_no_labels_but_need_data():
    torch.manual_seed(0)
    texts_as_ids = [{"input_ids": e["input_ids"]} for e in calibration_data("llama")]
    compress(tiny_llama(), FWSVDConfig(method="whiten", rank=2, calibration_dataset=texts_as_ids), show_progress=False)
    with pytest.raises(ValueError, match="FWSVD needs calibration data"):
        compress(tiny_llama(), FWSVDConfig(method="asvd", rank=2), show_progress=False)


def test_whitening_lowers_calibration_output_error_against_svd():
    torch.manual_seed(0)
    data = calibration_data("llama", 24)
    errors = {}
    dense = tiny_llama().eval()
    with torch.no_grad():
        # give the residual stream a few outlier features, as real LLMs have
        dense.model.embed_tokens.weight[:, :3] *= 20
    names = ["model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj"]
    stats = collect_activation_statistics(
        dense, build_calibration_loader(data, model=dense), names, show_progress=False
    )
    for method in ("svd", "whiten"):
        model = tiny_llama().eval()
        model.load_state_dict(dense.state_dict())
        compress(model, FWSVDConfig(method=method, rank=3, calibration_dataset=data), show_progress=False)
        errors[method] = 0.0
        for name in names:
            delta = dense.get_submodule(name).weight - model.get_submodule(name).weight
            errors[method] += float(((delta @ stats.second_moment[name]) * delta).sum().detach())
    assert errors["whiten"] < errors["svd"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_finetune_lowers_training_loss_and_saves(arch, tmp_path, sample_input):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    data = calibration_data(arch, 16)
    compress(model, FWSVDConfig(method="svd", rank=3), show_progress=False)
    loader = build_calibration_loader(data, model=model, batch_size=16)
    batch = next(iter(loader))

    def loss():
        model.eval()
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    result = finetune(
        model,
        data,
        output_dir=tmp_path / "tuned",
        epochs=8,
        learning_rate=1e-2,
        batch_size=16,
        logging_steps=1,
        show_progress=False,
    )
    after = loss()
    assert after < 0.95 * before
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    assert not result.model.training
    reloaded = type(model).from_pretrained(tmp_path / "tuned")
    assert isinstance(reloaded.get_submodule(next(iter(model.config.quantization_config.ranks))), LowRankLinear)
    state, again = model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_precomputed_statistics_are_reused_and_checked(sample_input):
    data = calibration_data("bert", 12)
    torch.manual_seed(0)
    dense = tiny_bert().eval()
    config = FWSVDConfig(method="whiten", rank=3, calibration_dataset=data)
    from hf_fwsvd.methods import collect_statistics
    from hf_fwsvd.targets import find_target_modules

    stats = collect_statistics(dense, config, find_target_modules(dense, config), show_progress=False)
    fresh, reused = tiny_bert().eval(), tiny_bert().eval()
    fresh.load_state_dict(dense.state_dict())
    reused.load_state_dict(dense.state_dict())
    compress(fresh, config, show_progress=False)
    compress(reused, FWSVDConfig(method="whiten", rank=3), show_progress=False, statistics=stats)
    with torch.no_grad():
        assert torch.equal(fresh(**sample_input).logits, reused(**sample_input).logits)
    with pytest.raises(ValueError, match=r"lack `row_fisher` .* method='fwsvd'"):
        compress(tiny_bert(), FWSVDConfig(method="fwsvd", rank=3), show_progress=False, statistics=stats)


def test_finetune_only_low_rank_freezes_the_rest():
    torch.manual_seed(0)
    model = compress(tiny_bert(), FWSVDConfig(method="svd", rank=3), show_progress=False)
    embeddings = model.bert.embeddings.word_embeddings.weight.detach().clone()
    factor = model.bert.encoder.layer[0].attention.self.query.up.weight.detach().clone()
    finetune(
        model,
        calibration_data("bert", 8),
        epochs=1,
        learning_rate=1e-2,
        batch_size=8,
        train_only_low_rank=True,
        show_progress=False,
    )
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.up.weight, factor)
    with pytest.raises(ValueError, match="has no LowRankLinear module: compress it first"):
        finetune(tiny_bert(), calibration_data("bert", 4), train_only_low_rank=True, show_progress=False)


def test_docs_and_cli_help_list_every_registered_method(capsys):
    from pathlib import Path

    from hf_fwsvd.cli import main
    from hf_fwsvd.methods import get_method

    table = (Path(__file__).resolve().parent.parent / "docs" / "methods.md").read_text()
    assert main(["compress", "--help"]) == 0
    help_text = capsys.readouterr().out
    width = max(len(method) for method in available_methods())
    for method in available_methods():
        assert f'| `"{method}"`' in table, method
        assert f"  {method:<{width}}  {get_method(method).summary}" in help_text, method
