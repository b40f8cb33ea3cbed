"""Model cards written by `save_pretrained` of compressed models, parsed back with `huggingface_hub`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_gpt2
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_fwsvd
from hf_fwsvd import FWSVDConfig
from hf_fwsvd.model_card import CARD_TAGS, TEMPLATE_PATH, build_model_card, record_evaluation

REPO_ROOT = Path(__file__).resolve().parents[1]


def _compressed_bert(base_model: str | None = "org/tiny-bert"):
    torch.manual_seed(0)
    model = tiny_bert()
    config = FWSVDConfig(rank_ratio=0.25, base_model=base_model, calibration_dataset=calibration_data("bert"))
    return hf_fwsvd.compress(model, config, show_progress=False)


def test_packaged_template_is_the_model_cards_template():
    source = REPO_ROOT / "model_cards" / TEMPLATE_PATH.name
    assert TEMPLATE_PATH.read_bytes() == source.read_bytes(), (
        f"{TEMPLATE_PATH} must be a copy of {source}: run `cp {source} {TEMPLATE_PATH}`"
    )


def test_card_metadata_and_content_from_the_run(tmp_path):
    model = _compressed_bert()
    model.fwsvd_report.calibration_data = "calib.csv (12 examples)"
    record_evaluation(
        model, {"accuracy": 0.75, "f1": 0.5, "num_examples": 12}, "dev.csv (12 examples)", before={"accuracy": 0.8}
    )
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    data = card.data
    assert data.base_model == "org/tiny-bert"
    assert data.library_name == "transformers"
    assert data.tags == CARD_TAGS
    assert data.pipeline_tag == "text-classification"
    results = {result.metric_type: result.metric_value for result in data.eval_results}
    assert results == {"accuracy": 0.75, "f1": 0.5}
    assert data.eval_results[0].dataset_name == "dev.csv (12 examples)"

    report = model.fwsvd_report
    text = card.text
    assert f"| Parameters (whole model) | {report.model_params_before:,} -> {report.model_params_after:,} (" in text
    assert "| Rank setting | `rank_ratio=0.25` (each module keeps 25% of its full rank) |" in text
    assert "| Calibration data | calib.csv (12 examples); 12 examples used for the Fisher estimate |" in text
    assert "| accuracy | 0.8000 | 0.7500 |" in text and "| f1 | n/a | 0.5000 |" in text
    for row in report.modules:
        assert f"| `{row.name}` | {row.out_features} x {row.in_features} | {row.rank} |" in text
        assert f"| {row.plain_error:.4f} | {row.weighted_error:.4f} |" in text
    # The three lines that load it.
    assert "pip install hf-fwsvd" in text and "import hf_fwsvd" in text
    assert f'AutoModelForSequenceClassification.from_pretrained("{tmp_path / "out"}")' in text


def test_card_of_a_reloaded_checkpoint_falls_back_to_the_rank_map(tmp_path):
    model = _compressed_bert()
    model.save_pretrained(tmp_path / "first")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "first")
    assert not hasattr(reloaded, "fwsvd_report")
    reloaded.save_pretrained(tmp_path / "second")
    card = ModelCard.load(tmp_path / "second" / "README.md")
    assert card.data.base_model == "org/tiny-bert" and card.data.eval_results is None
    report = model.fwsvd_report
    assert f"{report.model_params_before:,} -> {report.model_params_after:,}" in card.text
    for row in report.modules:
        assert f"| `{row.name}` | {row.out_features} x {row.in_features} | {row.rank} |" in card.text
    assert "| n/a | n/a |" in card.text and "No evaluation was recorded" in card.text


def test_local_base_model_is_not_put_in_the_metadata(tmp_path):
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    hf_fwsvd.compress(dense, FWSVDConfig(rank=2, method="svd"), show_progress=False)
    assert dense.config.quantization_config.base_model == str((tmp_path / "dense").resolve())
    card = build_model_card(dense, load_path="user/gpt2-svd")
    assert card.data.base_model is None and card.data.pipeline_tag == "text-generation"
    assert f"the local checkpoint `{(tmp_path / 'dense').resolve()}`" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("user/gpt2-svd")' in card.text


def test_save_without_card_and_errors(tmp_path):
    model = _compressed_bert()
    model.save_pretrained(tmp_path / "no-card", model_card=False)
    assert not (tmp_path / "no-card" / "README.md").exists()
    with pytest.raises(ValueError, match="`after` holds no numeric metric"):
        record_evaluation(model, {"num_examples": 3}, "dev")
    with pytest.raises(TypeError, match="unexpected keyword argument 'splt'"):
        record_evaluation(model, {"accuracy": 1.0}, "dev", splt="test")
    with pytest.raises(ValueError, match="BertForSequenceClassification is not FWSVD-compressed"):
        build_model_card(tiny_bert())


def test_a_previous_fwsvd_card_is_replaced_but_a_users_readme_is_kept(tmp_path, caplog):
    model = _compressed_bert()
    model.save_pretrained(tmp_path / "out")
    assert "No evaluation was recorded" in (tmp_path / "out" / "README.md").read_text()
    record_evaluation(model, {"accuracy": 0.5}, "dev.csv")
    model.save_pretrained(tmp_path / "out")
    assert "| accuracy | n/a | 0.5000 |" in (tmp_path / "out" / "README.md").read_text()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("# my own notes\n")
    with caplog.at_level("WARNING", logger="hf_fwsvd.integration"):
        model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "# my own notes\n"
    assert "the FWSVD model card is not written over it" in caplog.text
