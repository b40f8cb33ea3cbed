"""The collapse guard (`hf_fwsvd.collapse`): warns on a destroyed model, stays silent on a healthy one."""

from __future__ import annotations

import pytest
import torch
from cli_assets import WORDS, save_causal_lm, tokenizer
from huggingface_hub import ModelCard
from transformers import GPT2LMHeadModel

from hf_fwsvd.cli import main
from hf_fwsvd.collapse import check_collapse

TRY_CAUSAL = (
    'Try `method="kfac_svdllm"` with `param_budget=` (global allocation, `allocation_power=1.0`), which is the '
    "default for causal LMs when no method is given (CLI: `--method kfac_svdllm --param-budget 0.8 "
    "--allocation-power 1`), keep more weights, or run a recovery fine-tune (`hf_fwsvd.finetune(..., lora=True)`)."
)


def test_perplexity_collapse_text():
    assert check_collapse({"perplexity": 24.2}, {"perplexity": 25853.0}) == (
        "Compression collapsed the model: perplexity 2.585e+04 is 1068.3x the dense model's 24.2 (the guard fires "
        "above 3x). " + TRY_CAUSAL
    )


def test_perplexity_collapse_of_the_default_does_not_suggest_the_default_again():
    assert check_collapse({"perplexity": 24.7}, {"perplexity": 91.25}, method="kfac_svdllm") == (
        "Compression collapsed the model: perplexity 91.25 is 3.7x the dense model's 24.7 (the guard fires above 3x). "
        "The method is already the causal-LM default (`kfac_svdllm`). Calibrate on more text of the kind the model "
        "will serve (thousands of tokens; CLI: `--num-samples`, `--max-length`), keep more weights, or run a recovery "
        "fine-tune (`hf_fwsvd.finetune(..., lora=True)`)."
    )
    assert check_collapse({"perplexity": 24.7}, {"perplexity": 91.25}, method="svd").endswith(TRY_CAUSAL)
    assert check_collapse({"perplexity": 24.7}, {"perplexity": 91.25}, method="fisher_svdllm").endswith(TRY_CAUSAL)


@pytest.mark.parametrize(
    "before, after",
    [
        ({"perplexity": 24.2}, {"perplexity": 72.5}),
        (None, {"perplexity": 1e6}),
        ({"accuracy": 0.9}, {"accuracy": 0.8}),
    ],
    ids=["perplexity-2.99x", "no-dense-reference", "accuracy-healthy"],
)
def test_silent_when_healthy_or_unknown(before, after):
    assert check_collapse(before, after, num_labels=2) is None


def test_accuracy_at_chance_text():
    assert check_collapse({"accuracy": 0.8037}, {"accuracy": 0.5}, num_labels=2) == (
        "Compression collapsed the model: accuracy 0.5000 (dense 0.8037) is at chance level (0.5000 for 2 labels). "
        'Try keeping more weights, `method="whiten"`, or `param_budget=` with the Fisher allocation, and run a '
        "recovery fine-tune (`hf_fwsvd.finetune`)."
    )
    assert check_collapse({"accuracy": 0.52}, {"accuracy": 0.5}, num_labels=2) is None  # the dense one was at chance


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """A tiny GPT-2 trained to predict a repeating word sequence (dense perplexity close to 1)."""
    root = tmp_path_factory.mktemp("collapse")
    path = save_causal_lm(root / "gpt2")
    model = GPT2LMHeadModel.from_pretrained(path)
    text = " ".join(WORDS * 3)
    ids = tokenizer()(text, return_tensors="pt").input_ids
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join([text] * 4) + "\n")
    return path, corpus


def _compress(path, corpus, out, rank, *extra):
    args = ["compress", str(path), "--task", "causal-lm", "--data", str(corpus), "--eval-data", str(corpus)]
    return main(args + ["--method", "svd", "--rank", str(rank), "--output", str(out), "-q", *extra])


def test_guard_fires_on_a_destroyed_model_and_the_card_says_so(trained_lm, tmp_path, capsys):
    path, corpus = trained_lm
    assert _compress(path, corpus, tmp_path / "rank1", 1) == 0
    err = capsys.readouterr().err
    assert "WARNING: Compression collapsed the model: perplexity " in err
    assert err.rstrip().endswith(TRY_CAUSAL)
    card = (tmp_path / "rank1" / "README.md").read_text()
    assert "> **Warning: this compression collapsed the model.** Compression collapsed the model: perplexity" in card


def test_fail_on_collapse_exits_1_and_saves_nothing(trained_lm, tmp_path, capsys):
    path, corpus = trained_lm
    assert _compress(path, corpus, tmp_path / "failed", 1, "--fail-on-collapse") == 1
    err = capsys.readouterr().err
    assert "hf-fwsvd compress: error: Compression collapsed the model: perplexity " in err
    assert "Nothing was saved (--fail-on-collapse)." in err
    assert not (tmp_path / "failed").exists()


def test_guard_is_silent_on_a_healthy_compression(trained_lm, tmp_path, capsys):
    path, corpus = trained_lm
    assert _compress(path, corpus, tmp_path / "rank15", 15, "--fail-on-collapse") == 0
    assert "collapsed" not in capsys.readouterr().err
    card = ModelCard.load(tmp_path / "rank15" / "README.md")
    assert "Warning" not in card.text and card.data.eval_results[0].metric_type == "perplexity"
