"""How much of each block linear's output energy sits on the first token of a passage (SmolLM2-135M, dense).

A diagnostic for the bias compensation of issue #16 (`sequential_update(intercept=True)`): a least-squares fit is
dominated by whichever tokens carry most of the squared output, and a fitted bias moves every token by the mean
error. Prints, per module kind and layer, the mean over passages of the first token's share of ``sum_t ||y_t||^2``
and of ``||sum_t y_t||`` (one passage has `--length` tokens; a uniform share would be ``1 / length``).

With ``--ratios`` it prints instead the library's sink criterion (`hf_fwsvd.sinks`, statistic
`first_token_output_energy`) for every block linear: the first token's mean output energy over a later token's,
largest first, and the modules above `--threshold` that `FWSVDConfig(sink_threshold=...)` would keep dense;
``--text FILE`` reads the passages from a text file (e.g. the CLI's calibration corpus) instead of the addresses.

Usage (repository root, ``PYTHONPATH=src:.``)::

    python benchmarks/first_token_energy.py --passages 16 --length 256
    python benchmarks/first_token_energy.py --ratios --passages 32 --length 256
    python benchmarks/first_token_energy.py --ratios --passages 64 --length 512 --text corpus.txt
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


def text_passages(tokenizer, path: str, passages: int, length: int) -> list[torch.Tensor]:
    """The first `passages` consecutive `length`-token passages of the text file at `path`."""
    with open(path, encoding="utf-8") as handle:
        ids = tokenizer(handle.read(), return_tensors="pt", verbose=False).input_ids[0]
    if len(ids) < passages * length:
        raise ValueError(f"{path} holds {len(ids)} tokens; {passages} x {length} asked for.")
    return [ids[i * length : (i + 1) * length] for i in range(passages)]


def sink_statistics(model, passages: list[torch.Tensor]):
    """The library's `first_token_output_energy` of every block linear on `passages` (batches of 4)."""
    from hf_fwsvd import FWSVDConfig
    from hf_fwsvd.statistics import collect
    from hf_fwsvd.targets import find_target_modules

    targets = find_target_modules(model, FWSVDConfig(rank=1))
    stacked = torch.stack(passages)
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in stacked.split(4)]
    return collect(model, batches, targets, ["first_token_output_energy"])


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
    parser.add_argument("--ratios", action="store_true", help="the library's sink criterion instead of the shares")
    parser.add_argument("--threshold", type=float, default=50.0, help="sink_threshold to report with --ratios")
    parser.add_argument("--text", help="read the passages from this text file instead of the 1990s addresses")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.assets import smollm2_dir

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    if args.text:
        passages = text_passages(tokenizer, args.text, args.passages, args.length)
    else:
        passages = calibration_passages(tokenizer, args.passages, args.length)
    if args.ratios:
        from hf_fwsvd.sinks import first_token_energy_ratios, sink_modules

        stats = sink_statistics(model, passages)
        ratios = first_token_energy_ratios(stats)
        source = args.text or "the 1990-1999 addresses"
        print(f"first token's mean output energy / a later token's, {args.passages} passages of {args.length} tokens "
              f"from {source}; largest 12 of {len(ratios)} block linears")  # fmt: skip
        for name, ratio in sorted(ratios.items(), key=lambda item: -item[1])[:12]:
            print(f"{name:40s} {ratio:10.1f}")
        above = sink_modules(stats, args.threshold)
        print(f"above {args.threshold:g}: {len(above)}: {', '.join(above)}")
        return
    shares = first_token_shares(model, passages)
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
