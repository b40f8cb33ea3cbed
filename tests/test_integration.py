"""The transformers integration: registration, kwargs, calibration inputs, Trainer, device maps, plugin-less load."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import calibration_data, sentences, tiny_bert, tiny_tokenizer
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)
from transformers.quantizers import auto as quantizers_auto

import hf_fwsvd
from hf_fwsvd import FWSVDConfig, LowRankLinear


def low_rank_names(model):
    return {name for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def test_import_registers_once_and_is_idempotent():
    wrapped = BertForSequenceClassification.from_pretrained
    importlib.reload(importlib.import_module("hf_fwsvd.integration")).install()
    hf_fwsvd.integration.install()
    assert quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["fwsvd"].__name__ == "FWSVDConfig"
    assert quantizers_auto.AUTO_QUANTIZER_MAPPING["fwsvd"].__name__ == "FWSVDHfQuantizer"
    assert BertForSequenceClassification.from_pretrained.__func__ is wrapped.__func__


def test_both_kwargs_rejected(saved_dense):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=2, calibration_dataset=calibration_data("bert"))
    with pytest.raises(ValueError, match="either `fwsvd_config=` or `quantization_config=`"):
        AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config, quantization_config=config)


def test_text_calibration_for_causal_lm_without_pad_token(saved_dense):
    dense_dir, _ = saved_dense("llama")
    tokenizer = tiny_tokenizer(pad=False)
    config = FWSVDConfig(rank=4, calibration_dataset=sentences(), tokenizer=tokenizer, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, fwsvd_config=config)
    assert len(low_rank_names(model)) == 14  # 7 linears per Llama block
    assert model.fwsvd_report.calibration_samples == 12


@pytest.mark.parametrize("kind", ["datasets", "dataloader", "text-dicts"], ids=["datasets", "dataloader", "dicts"])
def test_calibration_input_kinds_agree(kind, saved_dense):
    dense_dir, _ = saved_dense("bert")
    tokenizer = tiny_tokenizer()
    texts = sentences(8)
    records = [{"text": text, "label": i % 2} for i, text in enumerate(texts)]
    reference = hf_fwsvd.compute_importances(
        AutoModelForSequenceClassification.from_pretrained(dense_dir),
        FWSVDConfig(calibration_dataset=records, tokenizer=tokenizer, batch_size=4),
        show_progress=False,
    )
    if kind == "datasets":
        data = datasets.Dataset.from_list(records)
    elif kind == "dataloader":
        from hf_fwsvd.calibration import build_calibration_loader

        data = build_calibration_loader(records, tokenizer, tiny_bert(), batch_size=4)
        assert isinstance(data, DataLoader)
    else:
        data = [{"sentence": r["text"], "labels": r["label"]} for r in records]
    importances = hf_fwsvd.compute_importances(
        AutoModelForSequenceClassification.from_pretrained(dense_dir),
        FWSVDConfig(calibration_dataset=data, tokenizer=tokenizer, batch_size=4),
        show_progress=False,
    )
    assert importances.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(importances[name], reference[name], rtol=1e-5)


def test_regression_and_token_classification(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    regression = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=1,
        )
    )
    data = [{"text": text, "label": float(i) / 3} for i, text in enumerate(sentences(6))]
    hf_fwsvd.compress(
        regression, FWSVDConfig(rank=3, calibration_dataset=data, tokenizer=tokenizer), show_progress=False
    )
    assert len(low_rank_names(regression)) == 6

    token_config = tiny_bert().config
    token_config.num_labels = 3
    model = AutoModelForTokenClassification.from_config(token_config)
    words = [text.split() for text in sentences(6)]
    data = [{"tokens": w, "labels": [k % 3 for k in range(len(w))]} for w in words]
    hf_fwsvd.compress(model, FWSVDConfig(rank=3, calibration_dataset=data, tokenizer=tokenizer), show_progress=False)
    assert len(low_rank_names(model)) == 12


def test_svd_method_needs_no_calibration(saved_dense):
    dense_dir, _ = saved_dense("bert")
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=FWSVDConfig(method="svd"))
    assert model.config.quantization_config.method == "svd" and low_rank_names(model)


def test_config_dict_round_trip_and_unknown_keys(caplog):
    config = FWSVDConfig(param_ratio=0.4, rank_pattern={"query": 3}, target_modules=["query", "value"])
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert FWSVDConfig.from_dict(data) == config
    with caplog.at_level(logging.WARNING, logger="hf_fwsvd.config"):
        loaded = FWSVDConfig.from_dict(data | {"future_option": 1, "hf_fwsvd_version": "9.0.0"})
    assert loaded.param_ratio == 0.4
    assert "future_option" in caplog.text and "9.0.0" in caplog.text


def test_precomputed_importances_file(saved_dense, tmp_path, sample_input):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=3, calibration_dataset=calibration_data("bert"))
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir)
    importances = hf_fwsvd.compute_importances(model, config, show_progress=False)
    hf_fwsvd.save_importances(importances, tmp_path / "fisher.safetensors")
    from_file = AutoModelForSequenceClassification.from_pretrained(
        dense_dir, fwsvd_config=FWSVDConfig(rank=3, importances=str(tmp_path / "fisher.safetensors"))
    )
    fresh = AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config)
    with torch.no_grad():
        assert torch.equal(from_file(**sample_input).logits, fresh(**sample_input).logits)


def test_trainer_fine_tunes_compressed_model(saved_dense, tmp_path):
    dense_dir, _ = saved_dense("bert")
    data = calibration_data("bert", 16)
    model = AutoModelForSequenceClassification.from_pretrained(
        dense_dir, fwsvd_config=FWSVDConfig(rank=4, calibration_dataset=data)
    )
    before = model.bert.encoder.layer[0].attention.self.query.up.weight.detach().clone()
    from hf_fwsvd.calibration import build_calibration_loader

    collate = build_calibration_loader(data, model=model).collate_fn
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[dict(d, labels=d["label"]) for d in data],
        data_collator=lambda rows: collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]),
    )
    trainer.train()
    after = model.bert.encoder.layer[0].attention.self.query.up.weight
    assert not torch.equal(before, after)
    model.save_pretrained(tmp_path / "tuned")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tuned")
    assert torch.equal(reloaded.bert.encoder.layer[0].attention.self.query.up.weight, after.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "auto"], ids=["fp16", "bf16", "auto"])
def test_reload_with_device_map_and_dtype(dtype, saved_dense, tmp_path, sample_input):
    dense_dir, _ = saved_dense("llama")
    config = FWSVDConfig(rank=4, calibration_dataset=calibration_data("llama"))
    AutoModelForCausalLM.from_pretrained(dense_dir, fwsvd_config=config).save_pretrained(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c", device_map="auto", dtype=dtype)
    expected = torch.float32 if dtype == "auto" else dtype
    assert model.model.layers[0].mlp.down_proj.up.weight.dtype == expected
    assert len(low_rank_names(model)) == 14
    with torch.no_grad():
        assert torch.isfinite(model(**sample_input).logits.float()).all()


def test_compress_on_load_refuses_disk_offload(saved_dense, tmp_path):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=2, calibration_dataset=calibration_data("bert"))
    with pytest.raises(ValueError, match="offloading to disk"):
        AutoModelForSequenceClassification.from_pretrained(
            dense_dir, fwsvd_config=config, device_map={"": "disk"}, offload_folder=str(tmp_path / "off")
        )


def test_plain_transformers_refuses_compressed_checkpoint(saved_dense, tmp_path):
    dense_dir, _ = saved_dense("bert")
    config = FWSVDConfig(rank=2, calibration_dataset=calibration_data("bert"))
    AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config).save_pretrained(tmp_path / "c")
    script = (
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"A.from_pretrained({str(tmp_path / 'c')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0, "plain transformers must not load random weights silently"
    assert "Unknown quantization type, got fwsvd" in result.stderr
    assert "no file named model.safetensors" in result.stderr


def test_pipeline_runs_on_reloaded_checkpoint(saved_dense, tmp_path):
    from transformers import pipeline

    dense_dir, _ = saved_dense("bert")
    tokenizer = tiny_tokenizer()
    config = FWSVDConfig(rank=4, calibration_dataset=calibration_data("bert"))
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir, fwsvd_config=config)
    model.save_pretrained(tmp_path / "c")
    tokenizer.save_pretrained(tmp_path / "c")
    classify = pipeline("text-classification", model=str(tmp_path / "c"))
    assert low_rank_names(classify.model) == low_rank_names(model)
    direct = model(**tokenizer(["w3 w4 w5"], return_tensors="pt")).logits.softmax(-1).max().item()
    assert classify("w3 w4 w5")[0]["score"] == pytest.approx(direct, rel=1e-5)
