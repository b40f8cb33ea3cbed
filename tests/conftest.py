"""Tiny models built inline from configs (no Hub), shared by the tests."""

from __future__ import annotations

import pytest
import torch
from hub_stub.fixtures import hub_endpoint  # noqa: F401  (local Hugging Face Hub stand-in, see tests/hub_stub)
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import hf_fwsvd  # noqa: F401  (registers the fwsvd quantization method)

VOCAB = 64


def tiny_bert(vocab_size: int = VOCAB, **kwargs):
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        **kwargs,
    )
    return BertForSequenceClassification(config)


def tiny_distilbert(vocab_size: int = VOCAB, **kwargs):
    config = DistilBertConfig(
        vocab_size=vocab_size,
        dim=16,
        n_layers=2,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=64,
        num_labels=2,
        **kwargs,
    )
    return DistilBertForSequenceClassification(config)


def tiny_roberta(vocab_size: int = VOCAB, **kwargs):
    config = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=72,
        num_labels=2,
        pad_token_id=1,
        **kwargs,
    )
    return RobertaForSequenceClassification(config)


def tiny_gpt2(vocab_size: int = VOCAB, **kwargs):
    config = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=64, **kwargs)
    return GPT2LMHeadModel(config)


def tiny_llama(vocab_size: int = VOCAB, **kwargs):
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **kwargs,
    )
    return LlamaForCausalLM(config)


ARCHITECTURES = {
    "bert": tiny_bert,
    "distilbert": tiny_distilbert,
    "roberta": tiny_roberta,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
}
CAUSAL = {"gpt2", "llama"}


def calibration_data(arch: str, count: int = 12, seed: int = 0) -> list[dict]:
    """Token-id examples (with labels for classifiers) of varied lengths."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 4 + index % 5
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        example = {"input_ids": ids}
        if arch not in CAUSAL:
            example["label"] = index % 2
        examples.append(example)
    return examples


def gpt2_equal_length_setup(batch_size: int = 2) -> tuple:
    """A seeded tiny GPT-2 in eval mode, its calibration examples of 6 tokens (no padding, so per-example sums equal
    per-batch ones), two target names and a loader of `batch_size`: the setting of the brute-force statistic tests."""
    from hf_fwsvd.calibration import build_calibration_loader

    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    examples = [example for example in calibration_data("gpt2", 20) if len(example["input_ids"]) == 6]
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    return model, examples, names, build_calibration_loader(examples, model=model, batch_size=batch_size)


def compressed_with_loader(build, method: str) -> tuple:
    """A seeded tiny model from `build`, a rank-2 copy compressed with `method`, its targets and a loader of 8 random
    sequences of 16 tokens (batches of 4): the setting of the sequential-update tests."""
    import copy

    from hf_fwsvd import FWSVDConfig, compress
    from hf_fwsvd.calibration import build_calibration_loader
    from hf_fwsvd.targets import find_target_modules

    torch.manual_seed(0)
    dense = build().eval()
    data = [{"input_ids": torch.randint(3, 64, (16,)).tolist()} for _ in range(8)]
    extra = {} if method == "svd" else {"calibration_dataset": data, "batch_size": 4, "max_length": 16}
    config = FWSVDConfig(method=method, rank=2, **extra)
    model = copy.deepcopy(dense)
    compress(model, config, show_progress=False)
    targets = find_target_modules(dense, config)
    loader = build_calibration_loader(data, None, dense, batch_size=4, max_length=16, num_samples=None)
    return dense, model, targets, loader


@pytest.fixture
def sample_input() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, VOCAB, (2, 7), generator=generator),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }


@pytest.fixture
def saved_dense(tmp_path):
    """Factory: save a tiny dense model of `arch` and return (dir, model class)."""

    def make(arch: str, seed: int = 0):
        torch.manual_seed(seed)
        model = ARCHITECTURES[arch]()
        path = tmp_path / f"dense-{arch}"
        model.save_pretrained(path)
        return path, type(model)

    return make


def tiny_tokenizer(pad: bool = True):
    """A word-level fast tokenizer over `VOCAB` ids: "[PAD] [UNK] [CLS] w3 ... w63"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[CLS]", **kwargs)


def sentences(count: int = 12, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (3 + k % 6,), generator=generator).tolist())
        for k in range(count)
    ]


def same_outputs(found: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two forward outputs of the SAME weights agree: exactly, or to float rounding.

    A reloaded model's weights are memory-mapped from the safetensors file at offsets that are not 64-byte aligned,
    while in-memory tensors are; on some CPUs (seen on an AMD EPYC with AVX-512) the BLAS kernels then sum in another
    order, and identical weights give logits that differ by ~1e-9. Tests that load weights check the weights bit for
    bit (`torch.equal` on the state dict) and the outputs with this helper: any wrong or stale weight moves a logit
    by orders of magnitude more than the tolerance.
    """
    return found.shape == expected.shape and torch.allclose(found, expected, rtol=1e-5, atol=1e-6)
