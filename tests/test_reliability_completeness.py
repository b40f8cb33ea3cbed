"""Reliability: a checkpoint loads only when every tensor the model needs is in it (embeddings, heads, every shard),
and keys that transformers renames (base-model prefix, conversion mappings) still round-trip exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import same_outputs, tiny_bert
from reliability_cases import expect_warning, fails_with
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BartForConditionalGeneration,
    BertForSequenceClassification,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hf_fwsvd import FWSVDConfig, LowRankLinear, compress

AUTO = AutoModelForSequenceClassification
WEIGHTS = "model.fwsvd.safetensors"
INDEX = "model.fwsvd.safetensors.index.json"
INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
FIX = (
    "Download or copy it again (`force_download=True`), or re-save it with `save_pretrained` from the compressed "
    "model."
)


def compressed_bert(seed: int = 0):
    torch.manual_seed(seed)
    return compress(tiny_bert(), FWSVDConfig(rank=4, method="svd"), show_progress=False).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One compressed tiny BERT saved as a single file and as shards (each test copies what it breaks)."""
    root = tmp_path_factory.mktemp("complete")
    model = compressed_bert()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="4KB")
    return root, model


@pytest.fixture
def copy(saved, tmp_path):
    root, _ = saved

    def make(kind: str = "single"):
        path = tmp_path / "ckpt"
        shutil.copytree(root / kind, path)
        return path

    return make


def names(path) -> dict[str, str]:
    return {str(path): "<ckpt>"}


MISSING = {
    "word-embeddings": ["bert.embeddings.word_embeddings.weight"],
    "classifier-head": ["classifier.bias", "classifier.weight"],
    "layer-norm": ["bert.encoder.layer.1.output.LayerNorm.weight"],
    "pooler": ["bert.pooler.dense.bias", "bert.pooler.dense.weight"],
}


@pytest.mark.parametrize("dropped", MISSING.values(), ids=MISSING.keys())
def test_missing_non_factor_tensors_are_refused(copy, dropped):
    """transformers would initialise these randomly with only a load report; we refuse the checkpoint."""
    path = copy()
    tensors = load_file(path / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path / WEIGHTS, metadata={"format": "pt"})
    message = (
        f"The FWSVD checkpoint '{path}' is incomplete: {len(dropped)} tensor(s) that BertForSequenceClassification "
        f"needs are not in its weights ({WEIGHTS}): {', '.join(dropped)}. They would be randomly initialised. {FIX}"
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=names(path)):
        AUTO.from_pretrained(path)


def _shards(path) -> list[str]:
    return sorted({*json.loads((path / INDEX).read_text())["weight_map"].values()})


def test_sharded_checkpoint_loads_exactly(saved):
    root, model = saved
    assert len(_shards(root / "sharded")) > 2
    with torch.no_grad():
        assert same_outputs(AUTO.from_pretrained(root / "sharded")(**INPUT).logits, model(**INPUT).logits)


def test_index_that_drops_a_shard_is_refused(copy):
    path = copy("sharded")
    index = json.loads((path / INDEX).read_text())
    dropped = _shards(path)[0]
    keys = sorted(key for key, shard in index["weight_map"].items() if shard == dropped)
    index["weight_map"] = {key: shard for key, shard in index["weight_map"].items() if shard != dropped}
    (path / INDEX).write_text(json.dumps(index))
    shown = ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
    message = (
        f"The FWSVD checkpoint '{path}' is incomplete: {len(keys)} tensor(s) that BertForSequenceClassification "
        f"needs are not in its weights ({INDEX}): {shown}. They would be randomly initialised. The index {INDEX} does "
        f"not list the shard(s) {dropped}. {FIX}"
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=names(path)):
        AUTO.from_pretrained(path)


def test_index_naming_a_missing_shard_is_refused(copy):
    path = copy("sharded")
    shard = _shards(path)[-1]
    (path / shard).unlink()
    message = (
        f"The shard index '{path}/{INDEX}' lists 1 shard(s) missing from '{path}': {shard}. The checkpoint is "
        f"incomplete. {FIX}"
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=names(path)):
        AUTO.from_pretrained(path)


def test_truncated_shard_is_refused(copy):
    path = copy("sharded")
    shard = path / _shards(path)[1]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError) as info:
        AUTO.from_pretrained(path)
    assert str(info.value).startswith(f"Weights file '{shard}' is not a valid safetensors file (")
    assert str(info.value).endswith("download it again (`force_download=True`) or re-save the checkpoint.")


INDEX_CASES = {
    "truncated-json": (
        lambda text: text[: len(text) // 2],
        "The shard index '<ckpt>/model.fwsvd.safetensors.index.json' is not valid JSON (Unterminated string starting "
        "at: line {line} column {column} (char {char})): it is truncated or corrupt. " + FIX,
    ),
    "no-weight-map": (
        lambda text: json.dumps({"metadata": {"total_size": 1}}),
        "The shard index '<ckpt>/model.fwsvd.safetensors.index.json' has no `weight_map` (tensor name -> shard file), "
        "so its shards cannot be found. " + FIX,
    ),
    "empty-weight-map": (
        lambda text: json.dumps({"weight_map": {}}),
        "The shard index '<ckpt>/model.fwsvd.safetensors.index.json' has no `weight_map` (tensor name -> shard file), "
        "so its shards cannot be found. " + FIX,
    ),
    "weight-map-is-a-list": (
        lambda text: json.dumps({"weight_map": ["model.fwsvd-00001-of-00002.safetensors"]}),
        "The shard index '<ckpt>/model.fwsvd.safetensors.index.json' has no `weight_map` (tensor name -> shard file), "
        "so its shards cannot be found. " + FIX,
    ),
}


@pytest.mark.parametrize(("edit", "template"), INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_broken_shard_index(copy, edit, template):
    path = copy("sharded")
    text = edit((path / INDEX).read_text())
    (path / INDEX).write_text(text)
    try:
        json.loads(text)
        position = {}
    except json.JSONDecodeError as error:
        start = text.rfind('"', 0, error.pos + 1)
        line = text.count("\n", 0, start) + 1
        position = {"line": line, "column": start - text.rfind("\n", 0, start), "char": start}
    message = template.format(**position).replace("<ckpt>", str(path))
    with fails_with(ValueError, message, entry="from_pretrained", replacements=names(path)):
        AUTO.from_pretrained(path)


def test_corrupt_config_json_is_refused(copy):
    path = copy()
    (path / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], "quantiz')
    message = (
        f"{path}/config.json is not valid JSON (Unterminated string starting at: line 1 column 54 (char 53)): it is "
        "truncated or corrupt. Restore it from the original checkpoint, or re-save the model with `save_pretrained`."
    )
    with fails_with(ValueError, message, entry="from_pretrained", replacements=names(path)):
        BertForSequenceClassification.from_pretrained(path)  # (Auto classes read config.json first and say so too)


def test_base_model_loads_from_a_task_checkpoint(saved):
    """`AutoModel` on a compressed `*ForSequenceClassification` checkpoint: the `bert.` prefix is dropped, as plain
    transformers does, and the encoder is exactly the compressed one."""
    root, model = saved
    base = AutoModel.from_pretrained(root / "single").eval()
    assert isinstance(base, BertModel)
    assert isinstance(base.encoder.layer[0].attention.self.query, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(base(**INPUT).last_hidden_state, model.bert(**INPUT).last_hidden_state)


def test_task_model_from_a_base_checkpoint_warns_about_the_new_head(tmp_path, caplog):
    torch.manual_seed(0)
    base = compress(BertModel(tiny_bert().config), FWSVDConfig(rank=4, method="svd"), show_progress=False).eval()
    path = tmp_path / "base"
    base.save_pretrained(path)
    with caplog.at_level("WARNING", logger="hf_fwsvd.checkpoint_checks"):
        model = AUTO.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(model.bert(**INPUT).last_hidden_state, base(**INPUT).last_hidden_state)
    expect_warning(
        caplog,
        "hf_fwsvd.checkpoint_checks",
        f"{path} holds a BertModel checkpoint: the BertForSequenceClassification head (classifier.bias, "
        "classifier.weight) is not in it and is newly initialised. Train it before use.",
        entry="from_pretrained",
        replacements=names(path),
    )


def test_renamed_keys_round_trip_vit(tmp_path):
    """ViT (transformers 5.24) renames `vit.layers.0.attention.k_proj` to `vit.encoder.layer.0.attention.attention.key`
    on save; the check and the reload follow the same conversion mapping."""
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
    )
    model = compress(ViTForImageClassification(config).eval(), FWSVDConfig(rank=4, method="svd"), show_progress=False)
    model.save_pretrained(tmp_path / "vit")
    assert any(key.startswith("vit.encoder.layer.0") for key in load_file(tmp_path / "vit" / WEIGHTS))
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "vit").eval()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)


SEQ2SEQ = {
    "t5": lambda: T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    ),
    "bart": lambda: BartForConditionalGeneration(
        BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=64,
        )
    ),
}


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_encoder_decoder_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    model = compress(SEQ2SEQ[arch]().eval(), FWSVDConfig(rank=4, method="svd"), show_progress=False).eval()
    model.save_pretrained(tmp_path / arch)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / arch).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids, decoder_input_ids=ids).logits, expected)
