"""Bradley-Terry and Plackett-Luce models in dpo_lab.bradley_terry."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lab.bradley_terry import (
    bt_probability,
    fit_bradley_terry,
    plackett_luce_log_likelihood,
    ranking_to_pairs,
)


def test_bt_probability_is_eq1() -> None:
    expected = math.exp(2.0) / (math.exp(2.0) + math.exp(1.0))
    assert bt_probability(2.0, 1.0).item() == pytest.approx(expected)
    assert bt_probability(torch.tensor([0.3]), torch.tensor([0.3])).item() == pytest.approx(0.5)


def test_fit_recovers_true_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    n_items, n_comparisons = 8, 4000
    true = torch.randn(n_items, generator=gen, dtype=torch.float64)
    a = torch.randint(n_items, (n_comparisons,), generator=gen)
    b = (a + torch.randint(1, n_items, (n_comparisons,), generator=gen)) % n_items  # b != a
    a_wins = torch.rand(n_comparisons, generator=gen, dtype=torch.float64) < bt_probability(true[a], true[b])
    comparisons = torch.stack([torch.where(a_wins, a, b), torch.where(a_wins, b, a)], dim=1)
    scores = fit_bradley_terry(n_items, comparisons)
    assert scores.mean().abs().item() < 1e-10
    correlation = torch.corrcoef(torch.stack([scores, true]))[0, 1].item()
    assert correlation > 0.95


def test_fit_accepts_list_and_orders_items() -> None:
    scores = fit_bradley_terry(3, [(0, 1), (0, 1), (1, 0), (1, 2), (1, 2), (2, 1), (0, 2)])
    assert scores[0] > scores[1] > scores[2]


@pytest.mark.parametrize(
    ("n_items", "comparisons", "name"),
    [(3, [(0, 3)], "n_items"), (1, [(0, 0)], "n_items"), (3, [(0, 1, 2)], "comparisons")],
)
def test_fit_rejects_bad_input(n_items: int, comparisons: list, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fit_bradley_terry(n_items, comparisons)


def test_ranking_to_pairs_four_items() -> None:
    pairs = ranking_to_pairs([2, 0, 3, 1])
    assert pairs == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    with pytest.raises(ValueError, match="ranking"):
        ranking_to_pairs([1, 1])


def test_plackett_luce_two_items_is_bradley_terry() -> None:
    scores = torch.tensor([0.7, -0.4, 2.0], dtype=torch.float64)
    log_likelihood = plackett_luce_log_likelihood(scores, [1, 2])
    assert log_likelihood.exp().item() == pytest.approx(bt_probability(scores[1], scores[2]).item())


def test_plackett_luce_three_items_hand_value() -> None:
    scores = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    e = math.e
    expected = math.log(e**2 / (e**2 + e + 1)) + math.log(e / (e + 1))
    assert plackett_luce_log_likelihood(scores, torch.tensor([1, 0, 2])).item() == pytest.approx(expected)
