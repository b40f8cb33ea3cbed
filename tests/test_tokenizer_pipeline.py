"""The tokenizer travels with the compressed model: saved by every save path that knows it, used by `pipeline`."""

from __future__ import annotations

import torch
from conftest import sentences, tiny_bert, tiny_tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import hf_fwsvd  # noqa: F401
from hf_fwsvd import FWSVDConfig


def test_compress_on_load_saves_the_tokenizer_and_pipeline_uses_it(tmp_path):
    torch.manual_seed(0)
    tiny_bert().save_pretrained(tmp_path / "dense")  # a model folder without a tokenizer
    tokenizer = tiny_tokenizer()
    data = [{"text": text, "label": index % 2} for index, text in enumerate(sentences(16))]
    config = FWSVDConfig(rank=4, calibration_dataset=data, tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense", fwsvd_config=config)
    model.save_pretrained(tmp_path / "fwsvd")
    assert (tmp_path / "fwsvd" / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(tmp_path / "fwsvd").get_vocab() == tokenizer.get_vocab()

    classify = pipeline("text-classification", model=str(tmp_path / "fwsvd"), top_k=None)
    text = "w5 w9 w17 w33"
    scores = {row["label"]: row["score"] for row in classify([text])[0]}
    model.eval()
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
    torch.testing.assert_close(torch.tensor([scores["LABEL_0"], scores["LABEL_1"]]), expected)


def test_finetune_saves_the_tokenizer(tmp_path):
    from hf_fwsvd.finetune import finetune

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = hf_fwsvd.compress(tiny_bert(), FWSVDConfig(rank=4, method="svd"), show_progress=False)
    data = [{"text": text, "label": index % 2} for index, text in enumerate(sentences(8))]
    finetune(model, data, tokenizer, output_dir=tmp_path / "tuned", max_steps=1, show_progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "tuned").get_vocab() == tokenizer.get_vocab()
    classify = pipeline("text-classification", model=str(tmp_path / "tuned"))
    assert classify("w3 w4")[0]["label"] in {"LABEL_0", "LABEL_1"}
