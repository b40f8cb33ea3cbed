"""`benchmarks/saved_perplexity.py`: a saved compressed folder scores what the in-memory model scored."""

from __future__ import annotations

import pytest
import torch
from conftest import sentences, tiny_llama, tiny_tokenizer

from benchmarks.causal_lm import EVAL_TOKENS, WINDOW
from benchmarks.saved_perplexity import TEXTS, folder_perplexities
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.evaluation import evaluate_perplexity


def test_a_saved_compressed_folder_scores_like_the_model_it_saved(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    compress(model, FWSVDConfig(method="svd", rank=2), show_progress=False)
    model.save_pretrained(tmp_path / "saved")
    tokenizer = tiny_tokenizer()
    data = {key: " ".join(sentences(6, seed=index)) for index, key in enumerate(TEXTS.values())}
    found = folder_perplexities(str(tmp_path / "saved"), tokenizer, data)
    assert list(found) == ["dev", "SOTU 2000-2021", "Moby 116-135", "Hamlet"]
    expected = {
        label: evaluate_perplexity(model, tokenizer, data[key], window=WINDOW, max_tokens=EVAL_TOKENS)
        for label, key in TEXTS.items()
    }
    assert found == pytest.approx(expected, rel=1e-6)
    assert len(set(found.values())) == 4  # each text scored on its own
