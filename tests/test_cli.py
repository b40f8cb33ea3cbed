"""`hf-fwsvd` commands run in-process (`main([...])`) on tiny saved models and small data files."""

from __future__ import annotations

import argparse
import csv
import json
import re

import matplotlib.image
import pytest
import torch
from cli_assets import (
    save_causal_lm,
    save_classifier,
    save_token_classifier,
    sentences,
    tagged_sentences,
    tokenizer,
    write_csv,
    write_jsonl,
)
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from hf_fwsvd import LowRankLinear
from hf_fwsvd.cli import main
from hf_fwsvd.commands.inspect import inspect_checkpoint

SEQ = "sequence-classification"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A dense tiny classifier, train/dev CSVs and one compressed checkpoint made by the CLI (shared, read-only)."""
    root = tmp_path_factory.mktemp("cli")
    dense = save_classifier(root / "dense")
    train = write_csv(root / "train.csv", sentences(40, seed=0))
    dev = write_csv(root / "dev.csv", sentences(30, seed=1))
    out = root / "compressed"
    args = ["compress", str(dense), "--task", SEQ, "--data", str(train), "--rank-ratio", "0.25"]
    args += ["--eval-data", str(dev), "--output", str(out), "--report-json", str(root / "report.json"), "-q"]
    assert main(args) == 0
    return {"root": root, "dense": dense, "train": train, "dev": dev, "out": out}


def _accuracy(model, rows) -> float:
    tok = tokenizer()
    correct = 0
    with torch.no_grad():
        for row in rows:
            logits = model(**tok(row["text"], return_tensors="pt")).logits
            correct += int(logits.argmax(-1).item() == row["label"])
    return correct / len(rows)


def test_compress_saves_a_reloadable_checkpoint_and_prints_the_table(work, capsys):
    model = AutoModelForSequenceClassification.from_pretrained(work["out"])
    low_rank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(low_rank) == 12 and {m.rank for m in low_rank.values()} == {4}  # round(0.25 * 16)
    assert (work["out"] / "tokenizer.json").is_file()
    report = json.loads((work["root"] / "report.json").read_text())
    assert [row["name"] for row in report["modules"]] == list(low_rank)
    assert report["model_params_after"] == sum(p.numel() for p in model.parameters())
    dense = BertForSequenceClassification.from_pretrained(work["dense"])
    assert report["model_params_before"] == sum(p.numel() for p in dense.parameters())
    assert report["calibration_data"] == "train.csv (40 examples)"
    # The evaluation recorded in the card is that of the saved model and of the dense one, computed by hand here.
    rows = sentences(30, seed=1)
    assert report["evaluation"]["after"]["accuracy"] == pytest.approx(_accuracy(model, rows))
    assert report["evaluation"]["before"]["accuracy"] == pytest.approx(_accuracy(dense, rows))


def test_compress_table_has_one_row_per_module_and_totals(tmp_path, work, capsys):
    code = main(
        ["compress", str(work["dense"]), "--task", SEQ, "--method", "svd", "--rank", "3", "--output",
         str(tmp_path / "svd"), "-q"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "settings: method=svd, rank=3"
    rows = [line for line in out.splitlines() if line.startswith("bert.encoder.layer.")]
    assert len(rows) == 12 and all(re.search(r"\s3\s", row) for row in rows)
    assert re.search(r"whole model\s+6,194\s+3,\d{3}\s+\(\d+\.\d% kept\)", out), out
    card = ModelCard.load(tmp_path / "svd" / "README.md")
    assert "plain truncated SVD" in card.text and "none (plain SVD uses no data)" in card.text


def test_evaluate_reports_accuracy_and_parameters_as_json(work, capsys):
    code = main(["evaluate", str(work["out"]), "--task", SEQ, "--data", str(work["dev"]), "--json", "-q"])
    result = json.loads(capsys.readouterr().out)
    model = AutoModelForSequenceClassification.from_pretrained(work["out"])
    assert code == 0
    assert result["accuracy"] == pytest.approx(_accuracy(model, sentences(30, seed=1)))
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["num_examples"] == 30 and result["compression"] == "FWSVD, 12 low-rank modules"


def test_inspect_matches_the_loaded_model_without_loading_it(work, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("inspect must not load a model")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", forbidden)
    assert main(["inspect", str(work["out"])]) == 0
    out = capsys.readouterr().out
    monkeypatch.undo()
    summary = inspect_checkpoint(str(work["out"]))
    model = AutoModelForSequenceClassification.from_pretrained(work["out"])
    dense = BertForSequenceClassification.from_pretrained(work["dense"])
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["dense_parameters"] == sum(p.numel() for p in dense.parameters())
    assert {row["name"]: row["rank"] for row in summary["modules"]} == model.config.quantization_config.ranks
    assert "3,890 stored, 6,194 dense (62.8% kept, compression 1.59x)" in out
    assert "bert.encoder.layer.1.output.dense" in out and "16x32" in out


def test_export_dense_loads_without_the_plugin_and_matches(work, tmp_path, capsys):
    out = tmp_path / "dense-export"
    assert main(["export-dense", str(work["out"]), str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and not (out / "model.fwsvd.safetensors").exists()
    compressed = AutoModelForSequenceClassification.from_pretrained(work["out"])
    exported = BertForSequenceClassification.from_pretrained(out)
    assert not any(isinstance(m, LowRankLinear) for m in exported.modules())
    inputs = tokenizer()(["good movie", "the plot was boring and bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, compressed(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_sweep_writes_csv_and_png(work, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(work["dense"]), "--task", SEQ, "--data", str(work["train"]), "--eval-data", str(work["dev"])]
    assert main(args + ["--ratios", "0.5,0.25", "--output", str(out), "-q"]) == 0
    with open(out / "sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("dense", "1.0"), ("fwsvd", "0.25"), ("fwsvd", "0.5"), ("svd", "0.25"), ("svd", "0.5")
    ]  # fmt: skip
    kept = {(r["method"], r["ratio"]): float(r["params_kept"]) for r in rows}
    assert kept[("fwsvd", "0.25")] == kept[("svd", "0.25")] == pytest.approx(3890 / 6194)
    assert kept[("fwsvd", "0.25")] < kept[("fwsvd", "0.5")] < 1.0
    image = matplotlib.image.imread(out / "sweep.png")
    assert image.shape[0] > 300 and image.shape[1] > 500


def test_causal_lm_compress_and_perplexity(tmp_path, capsys):
    model_dir = save_causal_lm(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(row["text"] for row in sentences(30, seed=2)) + "\n")
    out = tmp_path / "gpt2-fwsvd"
    args = ["compress", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "--param-ratio", "0.5"]
    assert main(args + ["--eval-data", str(corpus), "--output", str(out), "-q"]) == 0
    assert main(["evaluate", str(out), "--task", "causal-lm", "--data", str(corpus), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    card = ModelCard.load(out / "README.md")
    after = card.data.eval_results[0]
    assert card.data.pipeline_tag == "text-generation" and after.metric_type == "perplexity"
    assert after.metric_value == pytest.approx(result["perplexity"])
    assert 1 < result["perplexity"] < 1000


def test_causal_lm_calibrates_on_every_token_of_a_long_line_file(tmp_path):
    model_dir = save_causal_lm(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"  # two documents of 150 words, one a line: 301 tokens joined by a blank line
    lines = [" ".join(row["text"] for row in sentences(40, seed=seed)).split()[:150] for seed in (4, 5)]
    corpus.write_text("\n".join(" ".join(line) for line in lines) + "\n")
    out = tmp_path / "gpt2-fwsvd"
    args = ["compress", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "--param-ratio", "0.5"]
    assert main(args + ["--output", str(out), "-q", "--report-json", str(tmp_path / "r.json")]) == 0
    joined = len(tokenizer()("\n\n".join(" ".join(line) for line in lines))["input_ids"])
    assert joined == 300  # the tiny word-level tokenizer drops the blank line
    # the model's context (n_positions 64) caps the 512-token default block: 300 // 64 = 4 full blocks, not 2 lines
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration_data"] == "corpus.txt (4 blocks of 64 tokens)"
    assert "corpus.txt (4 blocks of 64 tokens)" in ModelCard.load(out / "README.md").text


def test_causal_lm_defaults_are_named_on_the_terminal_and_in_the_card(tmp_path, capsys):
    model_dir = save_causal_lm(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(row["text"] for row in sentences(40, seed=4)) + "\n")
    out = tmp_path / "gpt2-fwsvd"
    assert main(["compress", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "--output", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "settings: method=kfac_svdllm (the default for this model), param_budget=0.8, allocation=fisher, "
        "allocation_power=1, first_token_weight=0.1"
    )
    card = ModelCard.load(out / "README.md").text
    assert (
        "| Rank setting | `param_budget=0.8` (80% of the targeted modules' weights kept in total, allocation `fisher` "
        "with `allocation_power=1`) |"
    ) in card
    assert (
        '(`method="kfac_svdllm"`); `first_token_weight=0.1`: each calibration sequence\'s first token weighted 0.1 '
        "in the gradient-weighted moments |"
    ) in card
    args = ["--method", "kfac_whiten", "--param-budget", "0.7", "--allocation-power", "0.75", "--sink-threshold", "50"]
    assert main(["compress", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "-q", *args,
                 "--output", str(tmp_path / "explicit")]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[0] == (
        "settings: method=kfac_whiten, param_budget=0.7, allocation=fisher, allocation_power=0.75, sink_threshold=50"
    )


def test_first_token_weight_is_named_on_the_terminal_and_in_the_card(tmp_path, capsys):
    model_dir = save_causal_lm(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(row["text"] for row in sentences(40, seed=4)) + "\n")
    out = tmp_path / "weighted"
    args = ["--method", "kfac_whiten", "--param-budget", "0.7", "--first-token-weight", "0.1"]
    assert main(["compress", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "-q", *args,
                 "--output", str(out)]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[0] == (
        "settings: method=kfac_whiten, param_budget=0.7, allocation=fisher, allocation_power=0.5, "
        "first_token_weight=0.1"
    )
    assert (
        '| Method | Kronecker-factored Fisher whitening (two-sided) (`method="kfac_whiten"`); '
        "`first_token_weight=0.1`: each calibration sequence's first token weighted 0.1 in the gradient-weighted "
        "moments |"
    ) in ModelCard.load(out / "README.md").text
    bad = ["--method", "whiten", "--param-budget", "0.7", "--first-token-weight", "0.1"]
    code = main(["compress", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "-q", *bad,
                 "--output", str(tmp_path / "bad")])  # fmt: skip
    assert code != 0 and not (tmp_path / "bad").exists()
    assert "method='whiten' reads neither" in capsys.readouterr().err


def test_causal_lm_sweep_calibrates_on_the_same_blocks_as_compress(tmp_path, monkeypatch):
    import hf_fwsvd.methods as methods

    model_dir = save_causal_lm(tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    lines = [" ".join(row["text"] for row in sentences(40, seed=seed)).split()[:150] for seed in (4, 5)]
    corpus.write_text("\n".join(" ".join(line) for line in lines) + "\n")
    seen = []
    collect = methods.collect_statistics

    def recording_collect(model, config, *args, **kwargs):
        seen.append(list(config.calibration_dataset))
        return collect(model, config, *args, **kwargs)

    monkeypatch.setattr(methods, "collect_statistics", recording_collect)
    args = ["sweep", str(model_dir), "--task", "causal-lm", "--data", str(corpus), "--eval-data", str(corpus)]
    assert main(args + ["--methods", "fwsvd", "--ratios", "0.5", "--output", str(tmp_path / "sweep"), "-q"]) == 0
    # 300 tokens joined, 64-token blocks (the model's context caps the 512 default): 4 full blocks, as compress uses
    assert [len(example["input_ids"]) for example in seen[0]] == [64, 64, 64, 64]


def test_token_classification_compress_and_evaluate(tmp_path, capsys):
    model_dir = save_token_classifier(tmp_path / "ner")
    data = write_jsonl(tmp_path / "tags.jsonl", tagged_sentences(24, seed=3))
    out = tmp_path / "ner-fwsvd"
    args = ["compress", str(model_dir), "--task", "token-classification", "--data", str(data), "--rank", "2"]
    assert main(args + ["--output", str(out), "-q"]) == 0
    assert main(["evaluate", str(out), "--task", "token-classification", "--data", str(data), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["num_tokens"] == sum(len(row["tokens"]) for row in tagged_sentences(24, seed=3))
    assert 0 <= result["accuracy"] <= 1


C = "compress {dense} --task sequence-classification"
S = "sweep {dense} --task sequence-classification --data {train} --eval-data {dev} --output {tmp}/s"
# name -> (command line, exit code, expected message in stderr)
ARGUMENT_ERRORS = {
    "no-task": ("compress {dense} --data {train} --output {tmp}/o", 2, "the following arguments are required: --task"),
    "two-rank-options": (
        C + " --data {train} --rank 2 --rank-ratio 0.5 --output {tmp}/o",
        2,
        "argument --rank-ratio: not allowed with argument --rank",
    ),
    "ratio-out-of-range": (
        C + " --data {train} --rank-ratio 1.5 --output {tmp}/o",
        2,
        "--rank-ratio must be in (0, 1), got 1.5",
    ),
    "default-without-data": (
        C + " --output {tmp}/o",
        2,
        "The default method needs calibration data: pass --data FILE (or use --method svd).",
    ),
    "fwsvd-without-data": (C + " --method fwsvd --output {tmp}/o", 2, "--method fwsvd needs calibration data"),
    "fail-on-collapse-without-eval": (
        C + " --data {train} --fail-on-collapse --output {tmp}/o",
        2,
        "--fail-on-collapse needs an evaluation: pass --eval-data FILE.",
    ),
    "missing-data-file": (C + " --data {tmp}/nope.csv --output {tmp}/o", 2, "Data '{tmp}/nope.csv' does not exist"),
    "missing-model": (
        "compress {tmp}/no-model --task causal-lm --method svd --output {tmp}/o",
        2,
        "Model '{tmp}/no-model' does not exist",
    ),
    "output-not-empty": (C + " --method svd --output {dense}", 2, "already exists and is not empty; pass --overwrite"),
    "unknown-data-format": (C + " --data {tmp}/data.parquet.gz --output {tmp}/o", 1, "unknown file type '.gz'"),
    "bad-label-column": (
        C + " --data {train} --label-column stars --output {tmp}/o",
        1,
        "has no column 'stars' (label); its columns are text, label",
    ),
    "rank-too-large": (
        C + " --method svd --rank 16 --output {tmp}/o",
        1,
        "Rank 16 for `bert.encoder.layer.0.attention.self.query` (16x16) is not below its full rank 16",
    ),
    "rank-multiple-zero": (
        C + " --method svd --rank-multiple 0 --output {tmp}/o",
        2,
        "--rank-multiple must be positive, got 0",
    ),
    "num-workers-zero": (
        C + " --method svd --num-workers 0 --output {tmp}/o",
        2,
        "--num-workers must be positive, got 0",
    ),
    "inspect-dense": ("inspect {dense}", 2, "is not an FWSVD checkpoint"),
    "inspect-missing": ("inspect {tmp}/nothing", 2, "is not a folder"),
    "export-dense-of-dense": ("export-dense {dense} {tmp}/x", 2, "is not an FWSVD checkpoint; it is already dense"),
    "evaluate-masked-lm": ("evaluate {out} --task masked-lm --data {dev}", 2, "Evaluation supports --task"),
    "evaluate-bad-task": (
        "evaluate {out} --task summarization --data {dev}",
        2,
        "argument --task: invalid choice: 'summarization'",
    ),
    "sweep-bad-ratios": (S + " --ratios 0.2,x", 2, "--ratios must be a comma-separated list"),
    "sweep-bad-method": (
        S + " --ratios 0.2 --methods fwsvd,qr",
        2,
        "--methods accepts fwsvd, svd, tfwsvd, whiten, asvd, fisher_whiten, svdllm, fisher_svdllm, whiten_v2, "
        "kfac_whiten, kfac_svdllm; got qr",
    ),
    "no-command": ("", 2, "the following arguments are required: COMMAND"),
}


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS), ids=list(ARGUMENT_ERRORS))
def test_argument_errors_exit_codes_and_messages(case, work, tmp_path, capsys):
    argv, expected_code, message = ARGUMENT_ERRORS[case]
    (tmp_path / "data.parquet.gz").write_bytes(b"x")
    paths = {key: str(work[key]) for key in ("dense", "train", "dev", "out")} | {"tmp": str(tmp_path)}
    argv = argv.format(**paths).split()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert message.format(**paths) in err, err
    if expected_code == 2:  # argparse prints the usage line, our own checks point at --help
        assert "usage: hf-fwsvd" in err or f"Run `hf-fwsvd {argv[0]} --help`" in err
    assert not (tmp_path / "o").exists()


def test_rank_multiple_and_num_workers_reach_the_config(work, tmp_path):
    out = tmp_path / "rounded"
    argv = ["compress", str(work["dense"]), "--task", SEQ, "--method", "svd", "--rank-ratio", "0.25"]
    assert main([*argv, "--rank-multiple", "3", "--num-workers", "2", "--output", str(out), "-q"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    ranks = {m.rank for m in model.modules() if isinstance(m, LowRankLinear)}
    assert ranks == {3}  # round(0.25 * 16) = 4, rounded down to a multiple of 3
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["rank_multiple"] == 3 and "num_workers" not in saved  # a run-time option, not saved
    serial = tmp_path / "serial"
    assert main([*argv, "--rank-multiple", "3", "--output", str(serial), "-q"]) == 0
    reference = AutoModelForSequenceClassification.from_pretrained(serial)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_int8_factors_and_byte_budget_from_the_cli(work, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "int8"
    argv = ["compress", str(work["dense"]), "--task", SEQ, "--data", str(work["train"]), "--param-budget", "0.5"]
    assert main([*argv, "--factor-dtype", "int8", "--budget-unit", "bytes", "--output", str(out), "-q"]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["factor_dtype"] == "int8" and saved["budget_unit"] == "bytes"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    factors = [m.down.weight for m in model.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(weight.qdata.dtype == torch.int8 for weight in factors)


def test_byte_budget_without_param_budget_is_a_usage_error(work, tmp_path, capsys):
    argv = ["compress", str(work["dense"]), "--task", SEQ, "--method", "svd", "--budget-unit", "bytes"]
    assert main([*argv, "--output", str(tmp_path / "o"), "-q"]) == 2
    message = '`budget_unit="bytes"` needs `param_budget=` (the fraction of weight bytes to keep).'
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("compress", "evaluate", "inspect", "export-dense", "export-onnx", "sweep"):
        assert command in out
    assert "exit codes:" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hf-fwsvd ")


@pytest.mark.parametrize(
    ("task", "given", "expected"),
    [
        ("causal-lm", {}, (512, 64)),
        ("causal-lm", {"max_length": 64}, (64, 512)),
        ("causal-lm", {"num_samples": 10}, (512, 10)),
        ("causal-lm", {"max_length": 100000}, (100000, 1)),
        ("sequence-classification", {}, (128, 256)),
        ("token-classification", {"max_length": 64}, (64, 256)),
    ],
)
def test_calibration_size_defaults_to_512_token_blocks_for_causal_lms(task, given, expected):
    from hf_fwsvd.commands.common import resolve_calibration_size

    args = argparse.Namespace(task=task, max_length=given.get("max_length"), num_samples=given.get("num_samples"))
    resolve_calibration_size(args)
    assert (args.max_length, args.num_samples) == expected
