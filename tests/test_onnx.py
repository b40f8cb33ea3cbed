"""ONNX export through torch.onnx: the low-rank layers stay two MatMuls, onnxruntime matches PyTorch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_llama, tiny_tokenizer

import hf_fwsvd
from hf_fwsvd import FWSVDConfig
from hf_fwsvd.cli import main

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run(path, input_ids, attention_mask):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return torch.from_numpy(session.run(None, feeds)[0])


def test_export_keeps_two_matmuls_per_low_rank_layer_and_matches_pytorch(tmp_path):
    from hf_fwsvd.onnx_export import export_onnx

    torch.manual_seed(0)
    model = hf_fwsvd.compress(tiny_bert(), FWSVDConfig(rank=4, method="svd"), show_progress=False)
    model.train()
    result = export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tokenizer())
    assert result.low_rank_modules == 12 and result.output_name == "logits"
    assert result.matmuls == 2 * 12 + 2 * 2 + 2  # two per low-rank layer, two attention products per block, head
    assert result.max_abs_diff < 1e-5
    assert {path.name for path in (tmp_path / "onnx").iterdir()} >= {"model.onnx", "config.json", "tokenizer.json"}
    shapes = {tuple(init.dims) for init in onnx.load(result.path).graph.initializer}
    assert (32, 16) not in shapes and (16, 32) not in shapes  # no dense feed-forward weight in the file
    assert model.training and next(model.parameters()).dtype == torch.float32  # left as it was
    model.eval()

    input_ids = torch.randint(3, 64, (4, 13))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(_run(result.path, input_ids, attention_mask), expected, atol=1e-5, rtol=1e-5)


def test_cli_export_onnx_of_a_compressed_causal_lm(tmp_path, capsys):
    torch.manual_seed(0)
    model = hf_fwsvd.compress(tiny_llama(), FWSVDConfig(rank=4, method="svd"), show_progress=False)
    model.save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    assert main(["export-onnx", str(tmp_path / "llama"), str(tmp_path / "out"), "--task", "causal-lm"]) == 0
    out = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'out' / 'model.onnx'} (" in out
    # 2 x 14 for the low-rank modules; the other 5 are attention, rotary embedding and LM head products
    assert "; output `logits`): 14 low-rank modules, 33 MatMul nodes." in out
    assert "onnxruntime vs PyTorch on a 3 x 11 test batch: max abs difference " in out
    input_ids = torch.randint(3, 64, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(_run(tmp_path / "out" / "model.onnx", input_ids, attention_mask), expected)
    assert main(["export-onnx", str(tmp_path / "llama"), str(tmp_path / "out"), "--task", "causal-lm"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
