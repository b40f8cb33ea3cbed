"""accelerate: `load_checkpoint_and_dispatch` into `init_empty_compressed`, and `from_pretrained(device_map=...)`."""

from __future__ import annotations

import pytest
import torch
from accelerate import load_checkpoint_and_dispatch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import hf_fwsvd
from hf_fwsvd import FWSVDConfig, LowRankLinear
from hf_fwsvd.dispatch import init_empty_compressed


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = hf_fwsvd.compress(tiny_llama(), FWSVDConfig(rank=4, method="svd"), show_progress=False).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        return tmp_path / "ckpt", ids, model(input_ids=ids).logits


def test_load_checkpoint_and_dispatch_into_an_empty_compressed_model(checkpoint, tmp_path):
    path, ids, expected = checkpoint
    empty, weights = init_empty_compressed(path)
    assert weights == str(path / "model.fwsvd.safetensors")
    assert empty.model.layers[0].mlp.up_proj.down.weight.device.type == "meta"
    model = load_checkpoint_and_dispatch(empty, weights, device_map="auto")
    assert isinstance(model.model.layers[1].self_attn.o_proj, LowRankLinear) and model.hf_device_map == {"": "cpu"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "again")  # a proper FWSVD model: it saves and reloads
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")(input_ids=ids).logits
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_from_pretrained_with_a_device_map(checkpoint):
    path, ids, expected = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_init_empty_compressed_refuses_a_dense_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError) as error:
        init_empty_compressed(tmp_path / "dense")
    assert str(error.value) == (
        f"{str(tmp_path / 'dense')!r} is not an FWSVD checkpoint (no fwsvd quantization_config with a rank map); load "
        "it with accelerate's usual recipe."
    )
