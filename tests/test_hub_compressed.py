"""Compressed models through the local Hub stand-in: push -> download from the Hub cache -> reload, card kept."""

from __future__ import annotations

from pathlib import Path

import torch
from cli_assets import save_classifier, sentences, tokenizer, write_csv
from conftest import calibration_data, tiny_bert
from huggingface_hub import HfApi, ModelCard, constants
from transformers import AutoModelForSequenceClassification

import hf_fwsvd
from hf_fwsvd import FWSVDConfig, LowRankLinear
from hf_fwsvd.cli import main
from hf_fwsvd.model_card import CARD_TAGS, record_evaluation

REPO_ID = "org/tiny-bert-fwsvd"
INPUTS = {"input_ids": torch.tensor([[2, 7, 11, 42, 3], [2, 5, 9, 3, 0]])}
INPUTS["attention_mask"] = (INPUTS["input_ids"] != 0).long()


def _compressed():
    torch.manual_seed(0)
    config = FWSVDConfig(rank=3, base_model="org/tiny-bert", calibration_dataset=calibration_data("bert"))
    return hf_fwsvd.compress(tiny_bert(), config, show_progress=False).eval()


def _logits(model):
    with torch.no_grad():
        return model(**INPUTS).logits


def test_push_download_reload(hub_endpoint):
    model = _compressed()
    record_evaluation(model, {"accuracy": 0.5}, "dev.csv (8 examples)", before={"accuracy": 0.625})
    model.push_to_hub(REPO_ID, tags=["sentiment"])

    files = set(HfApi().list_repo_files(REPO_ID))
    assert {"config.json", "model.fwsvd.safetensors", "README.md"} <= files
    assert "model.safetensors" not in files

    card = ModelCard.load(REPO_ID)  # downloaded from the stub
    assert card.data.tags == CARD_TAGS + ["sentiment"] and card.data.base_model == "org/tiny-bert"
    assert card.data.eval_results[0].metric_value == 0.5
    assert f'from_pretrained("{REPO_ID}")' in card.text and "| accuracy | 0.6250 | 0.5000 |" in card.text

    reloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID).eval()
    head = HfApi().model_info(REPO_ID).sha
    assert ("GET", f"/{REPO_ID}/resolve/{head}/model.fwsvd.safetensors") in hub_endpoint.requests
    cached = Path(constants.HF_HUB_CACHE).glob(f"models--{REPO_ID.replace('/', '--')}/snapshots/*/*")
    assert {"config.json", "model.fwsvd.safetensors"} <= {path.name for path in cached}
    assert {n for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == set(
        model.config.quantization_config.ranks
    )
    assert torch.equal(_logits(reloaded), _logits(model))


def test_push_replaces_stale_dense_weights_and_save_pretrained_push(hub_endpoint, tmp_path):
    torch.manual_seed(0)
    tiny_bert().push_to_hub(REPO_ID)  # a dense model first: model.safetensors on the repo
    assert "model.safetensors" in HfApi().list_repo_files(REPO_ID)
    model = _compressed()
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id=REPO_ID)
    files = set(HfApi().list_repo_files(REPO_ID))
    assert "model.fwsvd.safetensors" in files and "README.md" in files
    # save_pretrained(push_to_hub=True) uploads the folder as is; push_to_hub also cleans stale weights.
    model.push_to_hub(REPO_ID)
    assert "model.safetensors" not in HfApi().list_repo_files(REPO_ID)
    reloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    assert f'from_pretrained("{REPO_ID}")' in ModelCard.load(REPO_ID).text


def test_cli_compress_push_to_hub(hub_endpoint, tmp_path, capsys):
    dense = save_classifier(tmp_path / "dense")
    train = write_csv(tmp_path / "train.csv", sentences(16, seed=0))
    args = ["compress", str(dense), "--task", "sequence-classification", "--data", str(train), "--rank", "2"]
    code = main(args + ["--output", str(tmp_path / "out"), "--push-to-hub", "org/cli-model", "-q"])
    assert code == 0, capsys.readouterr().err
    files = set(HfApi().list_repo_files("org/cli-model"))
    assert {"config.json", "model.fwsvd.safetensors", "README.md", "tokenizer.json"} <= files
    card = ModelCard.load("org/cli-model")  # the tokenizer push kept the FWSVD card
    assert "fwsvd" in card.data.tags and "train.csv (16 examples)" in card.text
    reloaded = AutoModelForSequenceClassification.from_pretrained("org/cli-model")
    local = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    encoded = tokenizer()("good fun movie", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**encoded).logits, local(**encoded).logits)
