"""How many calibration tokens the gradient-weighted moments of `fisher_whiten` / `kfac_whiten` really rest on.

Their input factor is ``sum_t |g_t|^2 x_t x_t^T``: each token counts with the squared norm of the loss gradient at
the module output. With heavy-tailed weights a few tokens dominate, and the moment is estimated from fewer tokens
than the calibration set holds. The effective sample size of weights ``w`` is ``(sum w)^2 / sum w^2`` (Kish): ``N``
for equal weights, 1 when one token carries all of it. This prints its fraction of the real tokens per module kind,
on the causal-LM benchmark's calibration sets (`benchmarks/causal_lm.py`), for SmolLM2-135M, with and without the first
token of each chunk (where attention sinks form) and the share of the weight that first token carries.

    PYTHONPATH=src:. python benchmarks/token_weight_spread.py            # 8,192 speech tokens, 256-token chunks
    PYTHONPATH=src:. python benchmarks/token_weight_spread.py --mix      # the 8,192-token genre mix
"""

from __future__ import annotations

import argparse
import logging
import statistics as stats
from collections import defaultdict

import torch


def effective_fraction(weights: torch.Tensor) -> float:
    """Kish's effective sample size of nonnegative `weights`, as a fraction of their count.

    Args:
        weights (`torch.Tensor`): One nonnegative weight per token (any shape).

    Returns:
        `float`: ``(sum w)^2 / (N sum w^2)``, in ``[1/N, 1]``; 0 when every weight is 0.
    """
    flat = weights.detach().to(torch.float64).flatten()
    if bool((flat < 0).any()):
        raise ValueError("effective_fraction needs nonnegative weights.")
    squares = float((flat * flat).sum())
    if squares == 0.0:
        return 0.0
    return float(flat.sum()) ** 2 / (flat.numel() * squares)


def module_kind(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``down_proj``."""
    return name.rsplit(".", 1)[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", action="store_true", help="the 8,192-token genre mix instead of the speeches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.assets import smollm2_dir
    from benchmarks.causal_lm import benchmark_texts, chunk_length
    from hf_fwsvd import FWSVDConfig
    from hf_fwsvd.calibration import build_calibration_loader
    from hf_fwsvd.targets import find_target_modules
    from hf_fwsvd.token_weights import output_gradient_token_weights

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    data = benchmark_texts(tokenizer, genres=args.mix)
    chunks = data["mix_calibration" if args.mix else "calibration"]
    targets = find_target_modules(dense, FWSVDConfig(method="svd", rank=1))
    loader = build_calibration_loader(
        chunks, tokenizer, dense, batch_size=4, max_length=chunk_length(chunks), num_samples=None
    )
    weights = output_gradient_token_weights(dense, list(targets), loader, show_progress=True)
    tokens = sum(w.numel() for w in next(iter(weights.values())))
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for name, per_batch in weights.items():
        all_tokens = torch.cat([w.flatten() for w in per_batch])
        later_tokens = torch.cat([w[:, 1:].flatten() for w in per_batch])
        first_share = float(sum(w[:, 0].sum() for w in per_batch) / all_tokens.sum().clamp_min(1e-30))
        rows[module_kind(name)].append((effective_fraction(all_tokens), effective_fraction(later_tokens), first_share))
    print(f"\n{'mix' if args.mix else 'speech'} calibration, {tokens} tokens ({len(chunks)} chunks)\n")
    print(
        "| module kind | input width | effective tokens: median fraction (min-max) | median effective tokens "
        "| without first tokens: median fraction | first tokens' median share of the weight |"
    )
    print("|---|---|---|---|---|---|")
    for kind, values in rows.items():
        width = next(module.in_features for name, module in targets.items() if module_kind(name) == kind)
        every, later, share = ([v[i] for v in values] for i in range(3))
        median = stats.median(every)
        print(
            f"| {kind} | {width} | {median:.3f} ({min(every):.3f}-{max(every):.3f}) | {median * tokens:,.0f} "
            f"| {stats.median(later):.3f} | {stats.median(share):.3f} |"
        )


if __name__ == "__main__":
    main()
