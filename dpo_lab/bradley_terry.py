"""Bradley-Terry and Plackett-Luce preference models.

Equation numbers refer to Rafailov et al. 2023 (arXiv 2305.18290): Eq. 1 is the
Bradley-Terry preference probability, Eq. 2 its negative log-likelihood, and Appendix A.3
(Eq. 18) the Plackett-Luce model over full rankings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dpo_lab.losses import bradley_terry_loss


def bt_probability(r_a: Tensor | float, r_b: Tensor | float) -> Tensor:
    """Eq. 1: p(a > b) = exp(r_a) / (exp(r_a) + exp(r_b)) = sigmoid(r_a - r_b).

    ``r_a``, ``r_b``: rewards (scores) of broadcastable shapes; returns their broadcast shape.
    """
    return torch.sigmoid(torch.as_tensor(r_a) - torch.as_tensor(r_b))


def _as_comparisons(n_items: int, comparisons: Tensor | Sequence[tuple[int, int]]) -> Tensor:
    pairs = torch.as_tensor(comparisons, dtype=torch.long)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(
            f"comparisons must be a non-empty (M, 2) list of (winner, loser), got {tuple(pairs.shape)}"
        )
    if bool((pairs < 0).any()) or bool((pairs >= n_items).any()):
        raise ValueError(f"comparisons contain an item index outside [0, n_items={n_items})")
    return pairs


def lbfgs_minimise(initial: Tensor, loss_fn: Callable[[Tensor], Tensor], max_iter: int,
                   tolerance_grad: float = 1e-10, tolerance_change: float = 1e-14) -> Tensor:
    """Minimise ``loss_fn`` from ``initial`` (any shape) by L-BFGS with a strong-Wolfe line search.

    Returns the detached minimiser, same shape as ``initial``. Shared by the Bradley-Terry fit and
    the tabular DPO/PG solvers of :mod:`dpo_lab.bandit`.
    """
    params = initial.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=tolerance_change, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    optimizer.step(closure)
    return params.detach()


def fit_bradley_terry(
    n_items: int,
    comparisons: Tensor | Sequence[tuple[int, int]],
    l2: float = 1e-4,
    steps: int = 200,
) -> Tensor:
    """Maximum-likelihood Bradley-Terry scores from pairwise outcomes (Eq. 2), by L-BFGS.

    ``comparisons``: (M, 2) LongTensor or list of ``(winner, loser)`` item indices in
    [0, n_items). Minimises mean_i -log sigmoid(s_w,i - s_l,i) + l2 * ||s||^2 / 2; the small
    ``l2`` keeps the optimum finite when an item never loses. Scores are identified only up
    to a shift, so they are returned centred to mean 0: (n_items,) float64.
    """
    if n_items < 2:
        raise ValueError(f"n_items must be >= 2, got n_items={n_items}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got l2={l2}")
    pairs = _as_comparisons(n_items, comparisons)

    def loss_fn(scores: Tensor) -> Tensor:
        return bradley_terry_loss(scores[pairs[:, 0]], scores[pairs[:, 1]]) + 0.5 * l2 * scores.pow(2).sum()

    fitted = lbfgs_minimise(torch.zeros(n_items, dtype=torch.float64), loss_fn, steps)
    return fitted - fitted.mean()


def _check_ranking(ranking: Sequence[int] | Tensor) -> list[int]:
    items = [int(i) for i in ranking]
    if len(set(items)) != len(items):
        raise ValueError(f"ranking must not repeat items, got ranking={items}")
    return items


def plackett_luce_log_likelihood(scores: Tensor, ranking: Sequence[int] | Tensor) -> Tensor:
    """Log-likelihood of a ranking under Plackett-Luce (Appendix A.3, Eq. 18).

    ``scores``: (N,) item scores; ``ranking``: (K,) distinct item indices, best first (K <= N;
    a partial ranking is scored as a full ranking of those K items). Returns the scalar
    sum_k [s_{tau(k)} - log sum_{j >= k} exp(s_{tau(j)})]. For K = 2 this is log of Eq. 1.
    """
    items = _check_ranking(ranking)
    ordered = scores[torch.as_tensor(items, dtype=torch.long)]
    tail_logsumexp = torch.logcumsumexp(ordered.flip(0), dim=0).flip(0)
    return (ordered - tail_logsumexp).sum()


def ranking_to_pairs(ranking: Sequence[int] | Tensor) -> list[tuple[int, int]]:
    """All K(K-1)/2 ``(winner, loser)`` pairs implied by a ranking (best first), in order."""
    items = _check_ranking(ranking)
    return [(items[i], items[j]) for i in range(len(items)) for j in range(i + 1, len(items))]
