"""The headline benchmark's paired tests and its head fit, on small inputs with known answers."""

from __future__ import annotations

import math

import torch
from conftest import tiny_roberta

from benchmarks.headline_report import bootstrap_pearson, mcnemar, sign_flip_p
from benchmarks.task_model import fit_head


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
