"""Exact checks of the DPO derivation in the tabular world of dpo_lab.bandit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpo_lab.bandit import (
    Bandit,
    dpo_tabular_path,
    expected_reward,
    implied_reward,
    kl_to_ref,
    objective,
    optimal_frontier,
    optimal_policy,
    preference_probabilities,
    sample_preferences,
    train_dpo_tabular,
    train_policy_gradient,
)
from dpo_lab.bradley_terry import bt_probability


@pytest.fixture(scope="module")
def bandit() -> Bandit:
    return Bandit.random(n_prompts=3, n_responses=5, seed=0)


def max_total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Largest per-prompt total-variation distance between two (X, Y) policies."""
    return 0.5 * (p - q).abs().sum(-1).max().item()


def test_bandit_defaults_and_validation(bandit: Bandit) -> None:
    assert bandit.ref_probs.dtype == torch.float64
    assert bandit.prompt_probs.tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="rewards"):
        Bandit(ref_probs=torch.full((2, 3), 1 / 3), rewards=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ref_probs"):
        Bandit(ref_probs=torch.tensor([[1.0, 0.0]]), rewards=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="prompt_probs"):
        Bandit(
            ref_probs=torch.full((2, 2), 0.5),
            rewards=torch.zeros(2, 2),
            prompt_probs=torch.tensor([0.5, 0.6]),
        )


def test_optimal_policy_maximises_objective(bandit: Bandit) -> None:
    beta = 0.5
    star = optimal_policy(bandit, beta)
    assert star.sum(-1).tolist() == pytest.approx([1.0] * 3)
    best = objective(bandit, star, beta)
    # Eq. 3 at the optimum equals E_x[beta log Z(x)].
    log_z = torch.logsumexp(bandit.ref_probs.log() + bandit.rewards / beta, dim=-1)
    assert best.item() == pytest.approx((bandit.prompt_probs * beta * log_z).sum().item())
    for candidate in (bandit.ref_probs, optimal_policy(bandit, 0.4), optimal_policy(bandit, 0.6)):
        assert objective(bandit, candidate, beta) < best
    with pytest.raises(ValueError, match="beta"):
        optimal_policy(bandit, 0.0)


def test_dpo_minimiser_is_the_optimal_policy(bandit: Bandit) -> None:
    for beta in (0.25, 1.0):
        policy = train_dpo_tabular(bandit, beta)
        assert max_total_variation(policy, optimal_policy(bandit, beta)) < 1e-3


def test_implied_reward_recovers_reward_up_to_prompt_constant(bandit: Bandit) -> None:
    beta = 0.5
    for policy in (optimal_policy(bandit, beta), train_dpo_tabular(bandit, beta)):
        offset = implied_reward(policy, bandit.ref_probs, beta) - bandit.rewards  # (X, Y)
        assert (offset - offset.mean(-1, keepdim=True)).abs().max().item() < 1e-4
    # For pi* the per-prompt constant is exactly -beta log Z(x) (Eq. 5).
    log_z = torch.logsumexp(bandit.ref_probs.log() + bandit.rewards / beta, dim=-1)
    offset = implied_reward(optimal_policy(bandit, beta), bandit.ref_probs, beta) - bandit.rewards
    torch.testing.assert_close(offset, (-beta * log_z)[:, None].expand_as(offset))


def test_partition_function_cancels_in_preferences(bandit: Bandit) -> None:
    """Eq. 6: Bradley-Terry with beta log pi*/pi_ref gives the same preferences as with r."""
    beta = 0.3
    implied = implied_reward(optimal_policy(bandit, beta), bandit.ref_probs, beta)
    from_policy = bt_probability(implied[:, :, None], implied[:, None, :])
    torch.testing.assert_close(from_policy, preference_probabilities(bandit))


def test_frontier_is_monotone(bandit: Bandit) -> None:
    betas = torch.logspace(1, -2, 40, dtype=torch.float64)  # decreasing beta
    kls, rewards = optimal_frontier(bandit, betas)
    assert (kls.diff() > 0).all()
    assert (rewards.diff() > 0).all()
    # Large beta keeps pi* close to pi_ref; small beta approaches the best response (KL -log pi_ref(y_best)).
    assert kls[0].item() < 2e-3
    greedy_kl = -(
        bandit.prompt_probs
        * bandit.ref_probs.gather(1, bandit.rewards.argmax(1, keepdim=True)).log().squeeze(1)
    ).sum()
    assert kls[-1].item() == pytest.approx(greedy_kl.item(), rel=1e-2)


def test_policy_gradient_stays_below_frontier_and_converges(bandit: Bandit) -> None:
    beta = 0.5
    result = train_policy_gradient(bandit, beta, steps=300, lr=0.1)
    assert max_total_variation(result.policy, optimal_policy(bandit, beta)) < 1e-3
    betas = torch.logspace(3, -3, 3000, dtype=torch.float64)
    frontier_kls, frontier_rewards = optimal_frontier(bandit, betas)
    assert result.kls.max() < frontier_kls.max()
    interpolated = np.interp(result.kls.numpy(), frontier_kls.numpy(), frontier_rewards.numpy())
    assert (result.rewards.numpy() <= interpolated + 1e-6).all()
    # Exact version: R(pi) - b KL(pi) <= R(pi*_b) - b KL(pi*_b) for every b (pi*_b maximises Eq. 3),
    # so the tangent lines of the frontier bound every policy with no interpolation error.
    tangents = frontier_rewards + betas * (result.kls[:, None] - frontier_kls)
    assert (result.rewards <= tangents.min(dim=1).values + 1e-12).all()
    # The trajectory starts at the reference policy.
    assert result.kls[0].item() == pytest.approx(0.0, abs=1e-12)
    assert result.rewards[0].item() == pytest.approx(expected_reward(bandit, bandit.ref_probs).item())
    assert result.kls[-1].item() == pytest.approx(
        kl_to_ref(bandit, optimal_policy(bandit, beta)).item(), rel=1e-3
    )


def test_sample_preferences_follow_bradley_terry(bandit: Bandit) -> None:
    n = 50_000
    pairs = sample_preferences(bandit, n, seed=0)
    assert pairs.shape == (n, 3) and pairs.dtype == torch.long
    counts = torch.zeros(3, 5, 5, dtype=torch.float64)
    counts.index_put_(tuple(pairs.T), torch.ones(n, dtype=torch.float64), accumulate=True)
    # P(x, y_w = a, y_l = b) = rho(x) * 2 pi_ref(a) pi_ref(b) p(a > b) for a != b, rho(x) pi_ref(a)^2 for a = b.
    ref = bandit.ref_probs
    joint = 2 * ref[:, :, None] * ref[:, None, :] * preference_probabilities(bandit)
    exact = bandit.prompt_probs[:, None, None] * joint
    stderr = (exact * (1 - exact) / n).sqrt()
    assert ((counts / n - exact).abs() < 5 * stderr + 1e-12).all()


def test_finite_sample_dpo_moves_towards_optimum(bandit: Bandit) -> None:
    beta = 0.5
    pairs = sample_preferences(bandit, 5000, seed=1)
    policy = train_dpo_tabular(bandit, beta, pairs=pairs)
    star = optimal_policy(bandit, beta)
    assert max_total_variation(policy, star) < 0.5 * max_total_variation(bandit.ref_probs, star)


def test_train_dpo_tabular_rejects_bad_input(bandit: Bandit) -> None:
    with pytest.raises(ValueError, match="beta"):
        train_dpo_tabular(bandit, beta=-0.1)
    with pytest.raises(ValueError, match="loss_type"):
        train_dpo_tabular(bandit, beta=0.1, loss_type="nope", steps=1)
    with pytest.raises(ValueError, match="pairs"):
        train_dpo_tabular(bandit, beta=0.1, pairs=torch.tensor([[0, 9, 1]]))


def test_deterministic_labels_let_the_higher_reward_win(bandit: Bandit) -> None:
    pairs = sample_preferences(bandit, 2000, seed=3, deterministic=True)
    x, winner, loser = pairs.unbind(1)
    distinct = winner != loser
    assert bool((bandit.rewards[x, winner][distinct] > bandit.rewards[x, loser][distinct]).all())


def test_dpo_path_starts_at_the_reference_and_ends_where_training_does(bandit: Bandit) -> None:
    pairs = sample_preferences(bandit, 500, seed=4)
    path = dpo_tabular_path(bandit, 0.5, steps=30, pairs=pairs)
    assert path.shape == (31, *bandit.ref_probs.shape)
    torch.testing.assert_close(path[0], bandit.ref_probs)
    torch.testing.assert_close(path[-1], train_dpo_tabular(bandit, 0.5, steps=30, pairs=pairs, polish_steps=0))


def test_on_deterministic_labels_dpo_drifts_and_ipo_settles(bandit: Bandit) -> None:
    """Eq. 7 has no finite minimiser on separable labels; IPO's squared loss has one (notebook 05, section 8)."""
    pairs = sample_preferences(bandit, 1000, seed=1, deterministic=True)
    kl = {loss: kl_to_ref(bandit, dpo_tabular_path(bandit, 0.5, steps=400, lr=0.05, pairs=pairs, loss_type=loss))
          for loss in ("sigmoid", "ipo")}
    assert kl["sigmoid"][400] > kl["sigmoid"][200] + 0.1
    assert abs(kl["ipo"][400] - kl["ipo"][200]) < 1e-3
