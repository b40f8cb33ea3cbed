"""Round trips through the local Hub stub: `push_to_hub` uploads, `from_pretrained` downloads via the Hub path."""

import hashlib
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification
from transformers import BertTokenizerFast as BertTokenizer

REPO_ID = "user/tiny-bert"
INPUT_IDS = torch.tensor([[2, 7, 11, 42, 3], [2, 5, 99, 3, 0]])


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def _tiny_tokenizer(tmp_path: Path) -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(vocab_file))


def _logits(model, input_ids=INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits


def _cached_files() -> set[str]:
    repo_cache = Path(constants.HF_HUB_CACHE) / ("models--" + REPO_ID.replace("/", "--"))
    return {p.name for p in (repo_cache / "snapshots").glob("*/*")}


def test_push_then_from_pretrained_round_trip(hub_endpoint, tmp_path):
    model = _tiny_bert()
    tokenizer = _tiny_tokenizer(tmp_path)
    model.push_to_hub(REPO_ID)
    tokenizer.push_to_hub(REPO_ID)
    card = ModelCard("---\nlicense: apache-2.0\n---\n# tiny-bert\n\nA stub-hosted test model.\n")
    card.push_to_hub(REPO_ID)

    files = set(HfApi().list_repo_files(REPO_ID))
    assert {".gitattributes", "config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files
    # push_to_hub fetches the README.md it updates (transformers' model card) but no weights.
    assert "model.safetensors" not in _cached_files()

    reloaded = AutoModelForSequenceClassification.from_pretrained(REPO_ID).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(REPO_ID)

    assert torch.equal(_logits(reloaded), _logits(model))
    assert reloaded_tokenizer("w7 w42")["input_ids"] == tokenizer("w7 w42")["input_ids"]
    # The download went through the stub into the isolated cache, not the user's.
    assert Path(constants.HF_HUB_CACHE).is_relative_to(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= _cached_files()
    # from_pretrained asks for the repo's head commit, then downloads pinned to it.
    head = HfApi().model_info(REPO_ID).sha
    assert ("GET", f"/{REPO_ID}/resolve/{head}/model.safetensors") in hub_endpoint.requests
    readme = Path(hf_hub_download(REPO_ID, "README.md")).read_text()
    assert "A stub-hosted test model." in readme


def test_safetensors_take_the_lfs_path(hub_endpoint):
    model = _tiny_bert()
    model.push_to_hub(REPO_ID)
    weights = model.state_dict()

    requests = hub_endpoint.requests
    assert ("POST", f"/{REPO_ID}.git/info/lfs/objects/batch") in requests
    puts = [path for method, path in requests if method == "PUT" and path.startswith("/__stub_lfs/")]
    assert len(puts) == 1  # model.safetensors; config.json is committed inline

    (info,) = HfApi().get_paths_info(REPO_ID, ["model.safetensors"])
    assert info.lfs is not None and puts == [f"/__stub_lfs/{info.lfs.sha256}"]
    meta = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(REPO_ID, "model.safetensors"))
    assert meta.etag == info.lfs.sha256 and meta.size == info.size
    local = hf_hub_download(REPO_ID, "model.safetensors")
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == info.lfs.sha256

    reloaded = BertForSequenceClassification.from_pretrained(REPO_ID)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in weights.items())

    # Pushing the same weights again uploads nothing: the LFS object is already known to the stub.
    model.push_to_hub(REPO_ID)
    assert [p for m, p in hub_endpoint.requests if m == "PUT"] == puts


def test_missing_repo_and_file_raise_hub_errors(hub_endpoint):
    with pytest.raises(OSError, match="not a valid model identifier"):
        AutoModelForSequenceClassification.from_pretrained("user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "config.json")

    HfApi().create_repo(REPO_ID)
    HfApi().create_repo(REPO_ID, exist_ok=True)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "config.json")

    # Endpoints the stub does not implement fail loudly with the request in the message.
    with pytest.raises(HfHubHTTPError, match="not implemented: GET /api/models/user/tiny-bert/commits/main"):
        HfApi().list_repo_commits(REPO_ID)


def test_subprocess_client_uses_the_stub_through_the_environment(hub_endpoint):
    huggingface_hub.create_repo(REPO_ID)  # the module-level functions are redirected too
    huggingface_hub.upload_file(path_or_fileobj=b"hello", path_in_repo="notes/hello.txt", repo_id=REPO_ID)
    code = (
        "from huggingface_hub import constants, hf_hub_download\n"
        "path = hf_hub_download('user/tiny-bert', 'notes/hello.txt')\n"
        "print(constants.ENDPOINT, path.startswith(constants.HF_HUB_CACHE), open(path).read())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [hub_endpoint.endpoint, "True", "hello"]
