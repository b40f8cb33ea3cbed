"""peft on compressed models: LoRA on a whole `LowRankLinear` by its usual name, and on its factors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import hf_fwsvd
from hf_fwsvd import FWSVDConfig, LowRankLinear

peft = pytest.importorskip("peft")

SRC = Path(hf_fwsvd.__file__).resolve().parents[1]


def _compressed_llama():
    torch.manual_seed(0)
    return hf_fwsvd.compress(tiny_llama(), FWSVDConfig(rank=4, method="svd"), show_progress=False)


def _train(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, 64, (4, 9), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_on_q_and_v_proj_trains_saves_and_merges_in_a_fresh_process(tmp_path):
    from peft import LoraConfig, get_peft_model

    _compressed_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped).__name__ == "LowRankLoraLinear" and isinstance(wrapped.base_layer, LowRankLinear)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    _train(model)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import torch
        import hf_fwsvd
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            adapted = model(input_ids=expected["ids"]).logits
            merged = model.merge_and_unload()
            merged_logits = merged(input_ids=expected["ids"]).logits
        merged.save_pretrained({str(tmp_path / "merged")!r})
        again = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})
        with torch.no_grad():
            again_logits = again(input_ids=expected["ids"]).logits
        q_proj = again.model.layers[0].self_attn.q_proj
        print(type(q_proj).__name__, q_proj.rank)
        for logits in (adapted, merged_logits, again_logits):
            print(float((logits - expected["logits"]).abs().max()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert lines[0] == "LowRankLinear 6"  # rank 4 + LoRA r 2: the merge is exact and stays low-rank
    assert all(float(line) < 1e-5 for line in lines[1:4]), result.stdout


@pytest.mark.parametrize("targets", [["down", "up"], "all-linear"], ids=["factors", "all-linear"])
def test_lora_on_the_factors(targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_compressed_llama(), LoraConfig(r=2, target_modules=targets, use_dora=True))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LowRankLinear) and type(q_proj.down).__name__ == "Linear"
    assert hasattr(q_proj.down, "lora_A") and hasattr(q_proj.up, "lora_A")
    assert not hasattr(model.base_model.model.lm_head, "lora_A")
    _train(model, steps=1)
    ids = torch.randint(3, 64, (2, 7))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert merged.model.layers[0].self_attn.q_proj.rank == 4
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_variants_on_a_whole_low_rank_layer_are_refused_clearly():
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError) as error:
        get_peft_model(_compressed_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert str(error.value) == (
        "Invalid or unsupported variant combination: ('use_dora',): a whole LowRankLinear takes plain LoRA only. "
        "Drop the variant option (e.g. `use_dora=True`), or target the layer's factors instead "
        "(`target_modules=['down', 'up']` or 'all-linear'), which are nn.Linear and take every LoRA variant."
    )
