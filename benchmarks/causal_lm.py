"""Causal LMs side by side: every low-rank setting vs dense and int8 on SmolLM2-135M (issue #16).

Setup (fixed; nothing is tuned on the evaluation texts):

- Model: SmolLM2-135M-Instruct, fp32, dequantised from the 4-bit GGUF (``benchmarks/assets.py``). Targets: the 210
  Linear layers of the 30 decoder blocks (the tied embedding / LM head is never touched).
- Calibration: the first 8,192 tokens of the 1990-1999 State of the Union addresses, as 32 chunks of 256 tokens. All
  statistics (row Fisher, activation moments) are collected once on the dense model and shared by every setting.
- Recovery fine-tune (``+lora``): the next 32 chunks of 256 tokens of the same 1990s addresses.
- Evaluation: perplexity (``exp`` of the mean token NLL over 16 non-overlapping 512-token windows) on the first 8,192
  tokens of the 2000-2021 addresses and on the first 8,192 tokens of Moby Dick chapters 116-135 (never calibrated or
  trained on).
- Budgets: 80% and 60% of the block-linear weights kept (``param_ratio`` for uniform settings, ``param_budget`` for
  allocated ones).
- Time: ``compress_s`` is the wall time of compression from the shared statistics (plus the update / fine-tune when
  the setting has one); ``calib_s`` (the shared statistics, once per run) is reported separately. ``peak_rss_mb`` is
  the process's peak resident memory sampled every 20 ms during that compression.

Settings are ``method[+alloc|+alloc1|+v2][+update][+lora][+int8]``: ``+alloc`` / ``+alloc1`` is our global Fisher
allocation at ``allocation_power`` 0.5 / 1, ``+v2`` SVD-LLM V2's loss-based per-matrix ratios
(`hf_fwsvd.truncation_loss`), ``+update`` SVD-LLM's sequential least-squares update of the `up` factors
(`hf_fwsvd.lstsq_update`), ``+lora`` a LoRA recovery fine-tune (``finetune(..., lora=True)``: rank 8 on every
factor, 2 epochs over the 32 fine-tune chunks at lr 2e-4, batch 4) merged back into the factors, ``+int8`` the factors
stored in int8 through the library (``FWSVDConfig(factor_dtype="int8")``: torchao per-channel weight-only int8 on
`down` / `up` after a ``sqrt(S)`` split), saved with ``save_pretrained`` and reloaded with ``from_pretrained`` before
the evaluation (needs a method that refines inside `compress`, e.g. ``svdllm``, rather than ``+update``).
``+bytes`` makes the budget a fraction of the block linears' fp32 BYTES (``budget_unit="bytes"``); ``+int8bytes`` a
fraction of the bytes the same linears take as dense int8 (torchao ``Int8WeightOnlyConfig``: int8 data plus an fp32
scale and an int8 zero point per row). ``dense`` and ``int8`` (torchao ``Int8WeightOnlyConfig``: per-channel
weight-only int8 of every Linear, LM head included) are the references; ``int8-blocks`` quantises only the block
linears (the exact equal-bytes reference for the ``+int8bytes`` rows). ``block_mb`` is what the block linears take
as stored (int8 data, scales and zero points counted).

Run from the repository root: ``PYTHONPATH=src python benchmarks/causal_lm.py --budgets 0.8 0.6`` (rows append to
``benchmarks/results/causal_lm.csv``, or the file given with ``--csv``; a rerun skips rows already there; ``--table``
prints the markdown table; ``--runs setting@budget ...`` runs exactly those pairs, in that order).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import logging
import math
import platform
import sys
import threading
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fwsvd  # noqa: F401  (registers the quantization method)
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.evaluation import evaluate_perplexity
from hf_fwsvd.lstsq_update import sequential_update
from hf_fwsvd.methods import required_statistics
from hf_fwsvd.pipeline import weighted_matrix
from hf_fwsvd.statistics import Statistics, collect
from hf_fwsvd.targets import find_target_modules
from hf_fwsvd.truncation_loss import heterogeneous_ranks

logger = logging.getLogger("causal_lm")

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "causal_lm.csv"
FIELDS = [
    "setting", "budget", "kept", "model_params", "ppl_sotu", "ppl_moby", "compress_s", "calib_s", "peak_rss_mb",
    "eval_s", "date", "machine", "block_mb",
]  # fmt: skip
CALIB_CHUNKS, CHUNK_TOKENS, EVAL_TOKENS, WINDOW = 32, 256, 8192, 512
MOBY_CHAPTERS = range(116, 136)
FLAGS = ("alloc", "alloc1", "v2", "update", "lora", "int8", "bytes", "int8bytes")
# LoRA recovery (rank 8 on every factor, see `hf_fwsvd.lora`): 2 epochs over the 32 fine-tune chunks, batch 4.
LORA_EPOCHS, LORA_LEARNING_RATE = 2.0, 2e-4
DEFAULT_SETTINGS = [
    "whiten+alloc1+update", "whiten+alloc1", "whiten+update", "whiten", "whiten+v2", "whiten+v2+update",
    "fisher_whiten+alloc1", "asvd+alloc1", "fwsvd+alloc1", "fwsvd", "svd", "asvd",
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
    """Calibration chunks, fine-tune chunks, SOTU evaluation text, Moby Dick evaluation text."""
    from benchmarks.assets import moby_dick_chapters, sotu_split

    calib_years, eval_years = sotu_split()
    ids = tokenizer("\n\n".join(calib_years[y] for y in sorted(calib_years)), verbose=False).input_ids
    chunks = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids) - CHUNK_TOKENS, CHUNK_TOKENS)]
    calibration = [{"input_ids": chunk} for chunk in chunks[:CALIB_CHUNKS]]
    train = [{"input_ids": chunk} for chunk in chunks[CALIB_CHUNKS : 2 * CALIB_CHUNKS]]
    sotu = "\n\n".join(eval_years[y] for y in sorted(eval_years))
    chapters = moby_dick_chapters()
    moby = "\n\n".join(chapters[c] for c in MOBY_CHAPTERS)
    return calibration, train, sotu, moby


def parse_setting(setting: str) -> dict:
    method, *flags = setting.split("+")
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise ValueError(f"Unknown setting flag(s) {sorted(unknown)} in {setting!r}.")
    spec = {"method": method, **{flag: flag in flags for flag in FLAGS}}
    if spec["int8"] and (spec["update"] or spec["lora"]):
        raise ValueError(
            f"{setting!r}: `+int8` quantises the factors inside `compress`, before `+update` / `+lora` would run; use "
            "a method that refines inside `compress` (svdllm) and no `+lora`."
        )
    if (spec["bytes"] or spec["int8bytes"]) and not (spec["alloc"] or spec["alloc1"]):
        raise ValueError(f"{setting!r}: byte budgets need the global allocation (`+alloc` or `+alloc1`).")
    return spec


def int8_block_bytes(targets) -> int:
    """Bytes of the block linears as dense torchao int8 weight-only: int8 data, an fp32 scale and an int8 zero point
    per output row (the biases, absent in SmolLM2, would stay fp32)."""
    return sum(m.weight.numel() + m.weight.shape[0] * 5 for m in targets.values())


def block_bytes(model, targets) -> int:
    """Bytes the block linears of `model` take as stored (int8 factors: data, scales and zero points)."""
    from hf_fwsvd.factor_storage import storage_bytes

    return sum(storage_bytes(p) for name in targets for p in model.get_submodule(name).parameters())


def setting_config(spec: dict, budget: float, stats: Statistics, dense, targets, base: dict) -> FWSVDConfig:
    if spec["int8"]:
        base = {**base, "factor_dtype": "int8"}
    if spec["alloc"] or spec["alloc1"]:
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


def _scale(stats: Statistics, name: str) -> float:
    """`weighted_matrix` normalises ``C`` by its largest diagonal entry; undo it so the losses are on one scale."""
    return float(stats["activation_second_moment"][name].diagonal().max().sqrt())


def kept_fraction(model, targets) -> float:
    report = model.fwsvd_report
    before = sum(targets[name].weight.numel() for name in targets)
    after = sum(row.params_after for row in report.modules) + sum(
        targets[name].weight.numel() for name in report.dense_modules
    )
    return after / before


def collect_statistics(dense, loader, targets, configs: list[FWSVDConfig]) -> Statistics:
    """Every statistic the settings' configs need, in one calibration pass on the dense model."""
    needed = list(dict.fromkeys(name for config in configs for name in required_statistics(config)))
    return collect(dense, loader, targets, needed, show_progress=False)


def lora_recover(model, train: list[dict], tokenizer) -> None:
    from hf_fwsvd.finetune import finetune

    finetune(model, train, tokenizer, epochs=LORA_EPOCHS, learning_rate=LORA_LEARNING_RATE, batch_size=4,
             max_length=CHUNK_TOKENS, show_progress=False, logging_steps=4, lora=True)  # fmt: skip


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
    if not CSV_PATH.exists():
        return set()
    return {(row["setting"], row["budget"]) for row in csv.DictReader(CSV_PATH.open())}


def write_row(row: dict) -> None:
    new = not CSV_PATH.exists()
    fields = FIELDS if new else next(csv.reader(CSV_PATH.open()))  # an older CSV keeps its columns
    with CSV_PATH.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def run(args: argparse.Namespace) -> None:
    from benchmarks.assets import smollm2_dir

    directory = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    calibration, train, sotu, moby = texts(tokenizer)
    machine = f"{platform.machine()} {torch.get_num_threads()} thread(s), shared 2-core box"
    date = datetime.date.today().isoformat()
    done = read_done()

    def evaluate(model) -> tuple[float, float, float]:
        started = time.perf_counter()
        a = evaluate_perplexity(model, tokenizer, sotu, window=WINDOW, max_tokens=EVAL_TOKENS)
        b = evaluate_perplexity(model, tokenizer, moby, window=WINDOW, max_tokens=EVAL_TOKENS)
        return a, b, time.perf_counter() - started

    targets = find_target_modules(dense, FWSVDConfig(method="svd", rank=1))

    def record(setting, budget, model, kept, compress_s, calib_s, peak_mb):
        ppl_sotu, ppl_moby, eval_s = evaluate(model)
        logger.info("%s @ %s: kept %.3f, ppl SOTU %.2f, Moby %.2f (compress %.0f s, peak %.0f MB)", setting, budget,
                    kept, ppl_sotu, ppl_moby, compress_s, peak_mb)  # fmt: skip
        write_row(dict(setting=setting, budget=budget, kept=round(kept, 4),
                       model_params=sum(p.numel() for p in model.parameters()), ppl_sotu=round(ppl_sotu, 3),
                       ppl_moby=round(ppl_moby, 3), compress_s=round(compress_s, 1), calib_s=round(calib_s, 1),
                       peak_rss_mb=round(peak_mb), eval_s=round(eval_s, 1), date=date, machine=machine,
                       block_mb=round(block_bytes(model, targets) / 2**20, 2)))  # fmt: skip

    if ("dense", "1.0") not in done and not args.skip_references:
        record("dense", 1.0, dense, 1.0, 0.0, 0.0, PeakRSS.current_kb() / 1024)
    for name, only_blocks in (("int8", False), ("int8-blocks", True)):
        if (name, "1.0") in done or args.skip_references:
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
    base = {"calibration_dataset": calibration, "tokenizer": tokenizer, "batch_size": 4, "max_length": CHUNK_TOKENS,
            "num_samples": None}  # fmt: skip
    loader = build_calibration_loader(calibration, tokenizer, dense, batch_size=4, max_length=CHUNK_TOKENS,
                                      num_samples=None)  # fmt: skip
    stats, calib_s = None, 0.0
    runs = [(setting, budget) for budget in args.budgets for setting in args.settings]
    if args.runs:
        runs = [(item.rsplit("@", 1)[0], float(item.rsplit("@", 1)[1])) for item in args.runs]
    for setting, budget in runs:
        if (setting, str(budget)) in done:
            continue
        if stats is None:
            started = time.perf_counter()
            probes = [FWSVDConfig(method=parse_setting(x)["method"], param_budget=0.5) for x, _ in runs]
            stats = collect_statistics(dense, loader, targets, probes)
            calib_s = time.perf_counter() - started
            logger.info("statistics collected in %.0f s", calib_s)
        spec = parse_setting(setting)
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        with PeakRSS() as rss:
            config = setting_config(spec, budget, stats, dense, targets, base)
            compress(model, config, statistics=stats, show_progress=False)
            if spec["update"]:
                compressed = {row.name: targets[row.name] for row in model.fwsvd_report.modules}
                report = sequential_update(model, compressed, loader)
                logger.info("update rejected for %d modules", len(report.rejected))
            if spec["lora"]:
                lora_recover(model, train, tokenizer)
        compress_s = time.perf_counter() - started
        if spec["int8"]:
            kept = kept_fraction(model, targets)
            model = save_and_reload(model, tokenizer)
            record(setting, budget, model, kept, compress_s, calib_s, rss.peak_mb)
            del model
            continue
        record(setting, budget, model, kept_fraction(model, targets), compress_s, calib_s, rss.peak_mb)
        del model


def _cell(value: str) -> str:
    number = float(value)
    return f"{number:.1f}" if number < 1e4 else f"{number:.2g}"


def table() -> str:
    """Markdown: one row per setting, perplexity on both texts at each budget, compress time and peak memory."""
    rows = list(csv.DictReader(CSV_PATH.open()))
    latest = {(r["setting"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "1.0"}, key=float, reverse=True)
    header = "| setting | " + " | ".join(
        f"{float(b):.0%} kept: SOTU | {float(b):.0%}: Moby | {float(b):.0%}: compress s | {float(b):.0%}: peak MB"
        for b in budgets
    )
    lines = [header + " |", "|---" * (1 + 4 * len(budgets)) + "|"]
    for name in ("dense", "int8", "int8-blocks"):
        row = latest.get((name, "1.0"))
        if row:
            lines.append(f"| {name} | {_cell(row['ppl_sotu'])} | {_cell(row['ppl_moby'])} | "
                         f"{row['compress_s']} | {row['peak_rss_mb']} |" + " |" * (4 * len(budgets) - 4))  # fmt: skip
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["budget"] != "1.0"))
    for setting in settings:
        cells = []
        for budget in budgets:
            row = latest.get((setting, budget))
            cells += (
                [_cell(row["ppl_sotu"]), _cell(row["ppl_moby"]), row["compress_s"], row["peak_rss_mb"]]
                if row
                else [""] * 4
            )
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(CSV_PATH.open()))
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, column, title in zip(axes, ("ppl_sotu", "ppl_moby"), ("SOTU 2000-2021", "Moby Dick ch. 116-135"),
                                   strict=True):  # fmt: skip
        for name, style in (("dense", ":"), ("int8", "--")):
            ref = [float(r[column]) for r in rows if r["setting"] == name]
            if ref:
                axis.axhline(ref[-1], color="black", linestyle=style, label=name)
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["budget"] != "1.0"))
        for index, setting in enumerate(settings):
            points = sorted((float(r["kept"]), float(r[column])) for r in rows if r["setting"] == setting)
            values = [v for _, v in points]
            if all(math.isfinite(v) and v < 1e4 for v in values):
                axis.plot(*zip(*points, strict=True), "-o", color=f"C{index % 10}", label=setting)
        axis.set_yscale("log")
        axis.set_xlabel("fraction of block-linear weights kept")
        axis.set_ylabel("perplexity (log scale)")
        axis.set_title(f"SmolLM2-135M, {title}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    global CSV_PATH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, help="none: the references only")
    parser.add_argument("--runs", nargs="+", default=None, help="setting@budget pairs to run, in this order")
    parser.add_argument("--csv", type=Path, default=None, help=f"results file (default {CSV_PATH})")
    parser.add_argument("--skip-references", action="store_true", help="do not run the dense and int8 rows")
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
    run(args)
    print(table())


if __name__ == "__main__":
    main()
