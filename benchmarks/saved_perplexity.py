"""Perplexity of saved causal-LM folders on the texts of `benchmarks/causal_lm.py` (issue #16).

For a model compressed elsewhere (e.g. by ``hf-fwsvd compress --task causal-lm``), this measures what the benchmark
measures for its own rows: the development text (1980-1989 addresses, the only text choices are made on), SOTU
2000-2021, Moby Dick chapters 116-135 and Hamlet, each on its first 8,192 tokens in 512-token windows. Run from the
repository root: ``PYTHONPATH=src:. python benchmarks/saved_perplexity.py FOLDER [FOLDER ...]``; it prints a markdown
table, one row per folder.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fwsvd  # noqa: F401  (registers the quantization method)
from benchmarks.assets import smollm2_dir
from benchmarks.causal_lm import EVAL_TOKENS, WINDOW, benchmark_texts
from hf_fwsvd.evaluation import evaluate_perplexity

TEXTS = {"dev": "dev", "SOTU 2000-2021": "sotu", "Moby 116-135": "moby", "Hamlet": "extra"}


def folder_perplexities(folder: str, tokenizer, data: dict) -> dict[str, float]:
    """Perplexity of the model saved in `folder` on each of `TEXTS`, as the benchmark measures it.

    Args:
        folder (`str`): A folder `from_pretrained` loads (dense or FWSVD-compressed).
        tokenizer: The benchmark model's tokenizer.
        data (`dict`): `benchmarks.causal_lm.benchmark_texts(tokenizer)`.
    """
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return {
        label: evaluate_perplexity(model, tokenizer, data[key], window=WINDOW, max_tokens=EVAL_TOKENS)
        for label, key in TEXTS.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="Saved model folders.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    data = benchmark_texts(tokenizer)
    print("| folder | " + " | ".join(TEXTS) + " |")
    print("|---|" + "---|" * len(TEXTS))
    for folder in args.folders:
        values = folder_perplexities(folder, tokenizer, data)
        print(f"| {folder} | " + " | ".join(f"{value:.3f}" for value in values.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
