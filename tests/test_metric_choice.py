"""Choosing the task metric: shipped `evaluate` modules by name, or a local metric script, from the API and CLI."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from cli_assets import save_classifier, sentences, tokenizer, write_csv
from sklearn.metrics import accuracy_score, matthews_corrcoef
from transformers import AutoModelForSequenceClassification

from hf_fwsvd.cli import main
from hf_fwsvd.evaluation import available_metrics, evaluate_classifier, load_metric

SEQ = "sequence-classification"

ERROR_RATE = textwrap.dedent(
    '''
    """Error rate: a local `evaluate` metric script, as a user would write one."""
    import datasets
    import evaluate


    class ErrorRate(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="1 - accuracy",
                citation="",
                features=datasets.Features(
                    {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
                ),
            )

        def _compute(self, predictions, references):
            wrong = sum(int(p != r) for p, r in zip(predictions, references))
            return {"error_rate": wrong / len(references)}
    '''
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    model_dir = save_classifier(root / "model")
    rows = sentences(40, seed=3)
    (root / "error_rate").mkdir()
    (root / "error_rate" / "error_rate.py").write_text(ERROR_RATE)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = tokenizer()
    with torch.no_grad():
        predictions = [model(**tok(row["text"], return_tensors="pt")).logits.argmax(-1).item() for row in rows]
    references = [row["label"] for row in rows]
    return {
        "root": root,
        "model": model_dir,
        "dev": write_csv(root / "dev.csv", rows),
        "rows": rows,
        "script": root / "error_rate",
        "accuracy": accuracy_score(references, predictions),
        "mcc": matthews_corrcoef(references, predictions),
    }


def test_shipped_metrics_are_offline_modules():
    assert available_metrics() == ["accuracy", "f1", "matthews_correlation"]


def test_api_chooses_shipped_and_local_metrics(setup):
    model = AutoModelForSequenceClassification.from_pretrained(setup["model"])
    script = setup["script"] / "error_rate.py"
    result = evaluate_classifier(model, tokenizer(), setup["rows"], metrics=["matthews_correlation", str(script)])
    assert set(result) == {"matthews_correlation", "error_rate", "num_examples"}
    assert result["matthews_correlation"] == pytest.approx(setup["mcc"])
    assert result["error_rate"] == pytest.approx(1 - setup["accuracy"])
    with pytest.raises(FileNotFoundError) as error:
        load_metric("metrics/missing.py")
    assert str(error.value) == (
        "Metric script 'metrics/missing.py' does not exist. Give one of the shipped metrics "
        "(accuracy, f1, matthews_correlation) or the path of an `evaluate` metric script."
    )


def test_cli_metric_option(setup, capsys):
    argv = ["evaluate", str(setup["model"]), "--task", SEQ, "--data", str(setup["dev"]), "--json", "-q"]
    assert main(argv + ["--metric", "matthews_correlation", "--metric", str(setup["script"])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matthews_correlation"] == pytest.approx(setup["mcc"])
    assert result["error_rate"] == pytest.approx(1 - setup["accuracy"])
    assert "accuracy" not in result and "f1" not in result

    assert main(argv + ["--metric", "bleu"]) == 2
    assert (
        "--metric 'bleu' is neither a shipped metric (accuracy, f1, matthews_correlation) nor an existing metric "
        "script path." in capsys.readouterr().err
    )
    causal = ["evaluate", str(setup["model"]), "--task", "causal-lm", "--data", str(setup["dev"]), "--metric", "f1"]
    assert main(causal) == 2
    assert "--metric applies to classification tasks; --task causal-lm is measured by perplexity." in (
        capsys.readouterr().err
    )
