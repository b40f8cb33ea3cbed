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
    assert "Measured with `evaluate` on dev.csv (12 examples)." in text
    assert "(Fisher-Weighted SVD (FWSVD); Hsu et al., ICLR 2022)." in text
    for row in report.modules:
        assert f"| `{row.name}` | {row.out_features} x {row.in_features} | {row.rank} |" in text
        assert f"| {row.plain_error:.4f} | {row.weighted_error:.4f} |" in text
    # The lines that load it; a local save shows the folder's name, never the absolute path.
    assert "pip install hf-fwsvd" in text and "import hf_fwsvd" in text
    assert 'model = AutoModelForSequenceClassification.from_pretrained("out")' in text
    assert 'tokenizer = AutoTokenizer.from_pretrained("out")' in text
    assert str(tmp_path) not in text


def test_report_survives_save_and_reload(tmp_path):
    model = _compressed_bert()
    model.fwsvd_report.warnings.append("accuracy collapsed")
    model.save_pretrained(tmp_path / "first")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "first")
    expected = model.fwsvd_report.to_dict()
    expected["calibration_data"] = "12 examples passed in Python (no dataset name given)"
    assert reloaded.fwsvd_report.to_dict() == expected
    assert reloaded.fwsvd_report.modules[0].plain_error == pytest.approx(model.fwsvd_report.modules[0].plain_error)
    reloaded.save_pretrained(tmp_path / "second")  # unchanged weights: no training run is recorded
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "second")
    assert again.fwsvd_report.to_dict() == expected and again.fwsvd_report.finetuning == []
    card = (tmp_path / "second" / "README.md").read_text()
    assert "> **Warning:** accuracy collapsed" in card
    assert "| Fine-tuning after compression | none recorded |" in card


def test_card_of_a_reloaded_checkpoint_falls_back_to_the_rank_map(tmp_path):
    model = _compressed_bert()
    model.save_pretrained(tmp_path / "first")
    (tmp_path / "first" / "fwsvd_report.json").unlink()  # a checkpoint written before reports were saved
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "first")
    assert reloaded.fwsvd_report.modules[0].plain_error != reloaded.fwsvd_report.modules[0].plain_error  # NaN
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
    assert dense.config.quantization_config.base_model == "./dense"  # the folder name, never the absolute path
    card = build_model_card(dense, load_path="user/gpt2-svd")
    assert card.data.base_model is None and card.data.pipeline_tag == "text-generation"
    assert "compressed from a local checkpoint" in card.text and str(tmp_path) not in str(card)
    assert 'AutoModelForCausalLM.from_pretrained("user/gpt2-svd")' in card.text
    # plain SVD is not attributed to the FWSVD paper; a perplexity is not said to come from `evaluate`
    assert "(plain truncated SVD; Eckart & Young, 1936: the best rank-k approximation)." in card.text
    assert "Hsu et al." not in card.text
    record_evaluation(dense, {"perplexity": 30.5, "num_examples": 3}, "held_out.txt (3 examples)")
    text = build_model_card(dense).text
    assert (
        "Perplexity measured by hf_fwsvd (`evaluate_perplexity`: the texts joined by blank lines, the exp of the "
        in text
    )
    assert "over non-overlapping windows) on held_out.txt (3 examples)." in text and "`evaluate` on" not in text
    dense.save_pretrained(tmp_path / "out")
    assert str(tmp_path) not in (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path) not in (tmp_path / "out" / "fwsvd_report.json").read_text()
    assert str(tmp_path) not in (tmp_path / "out" / "config.json").read_text()


def test_calibration_data_is_described_when_given():
    from datasets import Dataset

    from hf_fwsvd.provenance import describe_calibration

    rows = [{"text": "w3 w4", "label": 0}] * 5
    assert describe_calibration(rows) == "5 examples passed in Python (no dataset name given)"
    dataset = Dataset.from_list(rows, split="train")
    dataset.info.dataset_name = "polarity"
    assert describe_calibration(dataset) == "polarity (train split, 5 examples)"
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    assert describe_calibration(loader) == "a DataLoader over list (5 examples)"
    assert describe_calibration(None) is None


def test_finetune_and_trainer_runs_are_recorded(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_fwsvd.finetune import finetune

    model = _compressed_bert()
    finetune(model, calibration_data("bert"), max_steps=2, batch_size=4, show_progress=False)
    record = model.fwsvd_report.finetuning[0]
    assert (record.by, record.examples, record.steps, record.epochs) == ("hf_fwsvd.finetune", 12, 2, None)
    model.save_pretrained(tmp_path / "tuned")
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "Fine-tuned after compression with `hf_fwsvd.finetune` on 12 examples (2 steps, learning rate 2e-05" in card

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tuned")
    examples = [{"input_ids": row["input_ids"], "labels": row["label"]} for row in calibration_data("bert")]
    args = TrainingArguments(tmp_path / "run", max_steps=2, per_device_train_batch_size=1, report_to=[], use_cpu=True)
    Trainer(model=reloaded, args=args, train_dataset=examples).train()
    reloaded.save_pretrained(tmp_path / "trainer-tuned")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "trainer-tuned")
    assert [record.by for record in again.fwsvd_report.finetuning] == ["hf_fwsvd.finetune", "unrecorded"]
    card = (tmp_path / "trainer-tuned" / "README.md").read_text()
    assert "trained after compression outside `hf_fwsvd.finetune`" in card


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


def test_weights_fingerprint_samples_every_parameter(monkeypatch):
    from hf_fwsvd import report as report_module

    monkeypatch.setattr(report_module, "_FINGERPRINT_SAMPLES", 2)  # stride 15: one-element strided samples
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 1), torch.nn.Linear(1, 1, bias=False))
    first = report_module.weights_fingerprint(model)
    assert report_module.weights_fingerprint(model) == first
    with torch.no_grad():
        model[1].weight += 1e-6
    assert report_module.weights_fingerprint(model) != first
