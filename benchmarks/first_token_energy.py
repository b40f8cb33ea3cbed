"""How much of each block linear's output energy sits on the first token of a passage (SmolLM2-135M, dense).

A diagnostic for the bias compensation of issue #16 (`sequential_update(intercept=True)`): a least-squares fit is
dominated by whichever tokens carry most of the squared output, and a fitted bias moves every token by the mean
error. Prints, per module kind and layer, the mean over passages of the first token's share of ``sum_t ||y_t||^2``
and of ``||sum_t y_t||`` (one passage has `--length` tokens; a uniform share would be ``1 / length``).

Usage (repository root, ``PYTHONPATH=src:.``)::

    python benchmarks/first_token_energy.py --passages 16 --length 256
"""

from __future__ import annotations

import argparse
import logging

import torch

logger = logging.getLogger("first_token_energy")

MODULE_KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def calibration_passages(tokenizer, passages: int, length: int) -> list[torch.Tensor]:
    """The first `passages` consecutive `length`-token passages of the 1990-1999 addresses (the calibration years)."""
    from benchmarks.assets import SOTU_CALIBRATION_YEARS, sotu_texts

    texts = sotu_texts()
    joined = "\n\n".join(texts[year] for year in SOTU_CALIBRATION_YEARS if year in texts)
    ids = tokenizer(joined, return_tensors="pt", verbose=False).input_ids[0]
    if len(ids) < passages * length:
        raise ValueError(f"The calibration addresses hold {len(ids)} tokens; {passages} x {length} asked for.")
    return [ids[i * length : (i + 1) * length] for i in range(passages)]


def first_token_shares(model, passages: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per module: the mean over `passages` of the first token's share of the squared output and of the output sum."""
    totals: dict[str, list[float]] = {}
    current: dict[str, tuple[float, float]] = {}

    def record(name: str):
        def hook(module, inputs, output):
            output = output[0].double()
            squared = output.square().sum(-1)
            energy = float(squared[0] / squared.sum())
            mean_share = float(output[0].norm() / output.sum(0).norm().clamp_min(1e-30))
            current[name] = (energy, mean_share)

        return hook

    handles = [
        layer.get_submodule(kind).register_forward_hook(record(f"{index}.{kind}"))
        for index, layer in enumerate(model.model.layers)
        for kind in MODULE_KINDS
    ]
    try:
        with torch.no_grad():
            for passage in passages:
                model(passage.unsqueeze(0))
                for name, (energy, mean_share) in current.items():
                    totals.setdefault(name, [0.0, 0.0])
                    totals[name][0] += energy / len(passages)
                    totals[name][1] += mean_share / len(passages)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (energy, mean_share) for name, (energy, mean_share) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.assets import smollm2_dir

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    shares = first_token_shares(model, calibration_passages(tokenizer, args.passages, args.length))
    layers = len(model.model.layers)
    print(f"first token's share of sum_t ||y_t||^2 (uniform: {1 / args.length:.4f}), {args.passages} passages")
    print("| layer | " + " | ".join(MODULE_KINDS) + " |")
    print("|---|" + "---|" * len(MODULE_KINDS))
    for index in range(layers):
        row = " | ".join(f"{shares[f'{index}.{kind}'][0]:.3f}" for kind in MODULE_KINDS)
        print(f"| {index} | {row} |")
    print("\n||y_first|| / ||sum_t y_t||, per module kind: median and max over layers")
    for kind in MODULE_KINDS:
        values = torch.tensor([shares[f"{index}.{kind}"][1] for index in range(layers)])
        print(f"{kind:18s} median {float(values.median()):.3f}  max {float(values.max()):.3f}")


if __name__ == "__main__":
    main()
