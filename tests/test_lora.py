"""LoRA recovery on the factors (`finetune(..., lora=...)`, `hf_fwsvd.lora`)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_data, tiny_llama
from peft import LoraConfig

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.finetune import finetune
from hf_fwsvd.layers import LowRankLinear
from hf_fwsvd.lora import attach_lora


def test_lora_recovery_merges_into_the_factors_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = compress(tiny_llama(), FWSVDConfig(method="svd", rank=3), show_progress=False)
    data = calibration_data("llama", 16)
    batch = next(iter(build_calibration_loader(data, model=model, batch_size=16)))
    ranks = dict(model.config.quantization_config.ranks)
    embeddings = model.model.embed_tokens.weight.detach().clone()

    def loss():
        model.eval()
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    result = finetune(model, data, output_dir=tmp_path / "tuned", epochs=8, learning_rate=2e-2, batch_size=16,
                      logging_steps=1, show_progress=False, lora=LoraConfig(r=2, lora_alpha=4))  # fmt: skip
    assert result.model is model
    assert loss() < before - 0.02  # the random tiny model starts near ln(64); the adapters lower it steadily
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # only the adapters trained
    assert not any("lora" in name for name, _ in model.named_modules())
    for name, rank in ranks.items():
        assert model.get_submodule(name).rank == rank
    reloaded = type(model).from_pretrained(tmp_path / "tuned")
    assert reloaded.config.quantization_config.ranks == ranks
    assert isinstance(reloaded.get_submodule(next(iter(ranks))), LowRankLinear)
    state = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_lora_seed_fixes_the_adapters_whatever_the_global_random_state():
    torch.manual_seed(0)
    compressed = compress(tiny_llama(), FWSVDConfig(method="svd", rank=3), show_progress=False)
    data = calibration_data("llama", 8)

    def tuned(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(compressed)
        torch.manual_seed(global_seed)  # a different process state before the call must not matter
        finetune(model, data, epochs=1, learning_rate=2e-2, batch_size=8, show_progress=False, seed=seed,
                 lora=LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0))  # fmt: skip
        return model.state_dict()

    first, again, other = tuned(1, 0), tuned(1, 123), tuned(2, 0)
    factors = [key for key in first if key.endswith((".up.weight", ".down.weight"))]
    assert factors
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in factors)


def test_lora_needs_a_compressed_model():
    with pytest.raises(ValueError) as error:
        attach_lora(tiny_llama())
    assert str(error.value) == (
        "LlamaForCausalLM has no LowRankLinear module: compress it before a LoRA recovery (the adapters go on the "
        "`down` / `up` factors)."
    )


def test_lora_and_train_only_low_rank_are_exclusive():
    model = compress(tiny_llama(), FWSVDConfig(method="svd", rank=3), show_progress=False)
    with pytest.raises(ValueError) as error:
        finetune(model, calibration_data("llama", 4), lora=True, train_only_low_rank=True, show_progress=False)
    assert (
        str(error.value) == "Give `lora=` or `train_only_low_rank=True`, not both: with LoRA only the adapters train."
    )
