"""Hand-computed checks of the DPO-family, baseline and PPO losses in dpo_lab.losses."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lab.losses import (
    LOSS_TYPES,
    bradley_terry_loss,
    clipped_sequence_loss,
    dpo_loss,
    gae_advantages,
    group_normalised_advantages,
    grpo_loss,
    k3_kl,
    kto_loss,
    log1mexp,
    masked_mean,
    masked_var,
    masked_whiten,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preferred_ft_loss,
    rloo_advantages,
    simpo_loss,
    unlikelihood_loss,
)

BETA, EPS = 0.5, 0.1
# Two examples: policy chosen/rejected and reference chosen/rejected summed log-probs.
PC, PR, RC, RR = [-1.0, -3.0], [-2.0, -1.5], [-1.5, -2.0], [-1.8, -2.5]
# h = (pc - rc) - (pr - rr), worked out by hand.
H = [0.5 - (-0.2), -1.0 - 1.0]


def softplus(z: float) -> float:
    """-log sigmoid(-z) = log(1 + e^z)."""
    return math.log1p(math.exp(z))


def batch(requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for v in (PC, PR, RC, RR)]


EXPECTED = {
    "sigmoid": [softplus(-BETA * h) for h in H],
    "ipo": [(h - 1.0 / (2 * BETA)) ** 2 for h in H],
    "cdpo": [(1 - EPS) * softplus(-BETA * h) + EPS * softplus(BETA * h) for h in H],
    "hinge": [max(0.0, 1.0 - BETA * h) for h in H],
    "robust": [((1 - EPS) * softplus(-BETA * h) - EPS * softplus(BETA * h)) / (1 - 2 * EPS) for h in H],
}


def test_hand_values_are_as_expected() -> None:
    assert EXPECTED["ipo"] == pytest.approx([0.09, 9.0])
    assert EXPECTED["hinge"] == pytest.approx([0.65, 2.0])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_matches_hand_computation(loss_type: str) -> None:
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *batch(), beta=BETA, loss_type=loss_type, label_smoothing=EPS
    )
    assert losses.tolist() == pytest.approx(EXPECTED[loss_type], rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert rejected_rewards.tolist() == pytest.approx([-0.1, 0.5])


@pytest.mark.parametrize("loss_type", ["cdpo", "robust"])
def test_smoothed_losses_reduce_to_sigmoid_without_smoothing(loss_type: str) -> None:
    losses, _, _ = dpo_loss(*batch(), beta=BETA, loss_type=loss_type)
    assert losses.tolist() == pytest.approx(EXPECTED["sigmoid"], rel=1e-12)


def test_implicit_rewards_are_detached() -> None:
    _, chosen_rewards, rejected_rewards = dpo_loss(*batch(requires_grad=True), beta=BETA)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_sigmoid_gradient_matches_paper() -> None:
    """Gradient of Eq. 7 (paper Sec. 4): -beta sigma(r_l - r_w) on y_w, +beta sigma(r_l - r_w) on y_l."""
    pc, pr, rc, rr = batch(requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=BETA)
    losses.sum().backward()
    weight = torch.sigmoid(rejected_rewards - chosen_rewards)
    torch.testing.assert_close(pc.grad, -BETA * weight)
    torch.testing.assert_close(pr.grad, BETA * weight)
    expected_first = BETA / (1 + math.exp(BETA * H[0]))
    assert pr.grad[0].item() == pytest.approx(expected_first)


def test_bradley_terry_loss_hand_value() -> None:
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"beta": 0.1, "loss_type": "kto"}, "loss_type"),
        ({"beta": 0.1, "loss_type": "cdpo", "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
    ],
)
def test_dpo_loss_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        dpo_loss(*batch(), **kwargs)


def test_dpo_loss_rejects_mismatched_shapes() -> None:
    pc, pr, rc, rr = batch()
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(pc, pr, rc, rr[:1], beta=BETA)
    with pytest.raises(ValueError, match="reward_rejected"):
        bradley_terry_loss(pc, rr[:1])


def test_preferred_ft_and_unlikelihood_hand_values() -> None:
    # Padding holds garbage (0.0 = "p = 1", and NaN) that must be ignored.
    chosen = torch.tensor([[math.log(0.5), math.log(0.25), float("nan")]])
    chosen_mask = torch.tensor([[1, 1, 0]])
    rejected = torch.tensor([[math.log(0.8), math.log(0.1), 0.0]])
    rejected_mask = torch.tensor([[1, 1, 0]])
    nll = -(math.log(0.5) + math.log(0.25))
    assert preferred_ft_loss(chosen, chosen_mask).tolist() == pytest.approx([nll])
    loss = unlikelihood_loss(chosen, chosen_mask, rejected, rejected_mask, alpha=0.5)
    assert loss.tolist() == pytest.approx([nll - 0.5 * (math.log(0.2) + math.log(0.9))], rel=1e-5)


def test_unlikelihood_is_stable_when_rejected_token_is_certain() -> None:
    logps = torch.tensor([[-1e-12, -50.0]], dtype=torch.float64, requires_grad=True)
    values = log1mexp(logps)
    assert torch.isfinite(values).all()
    assert values[0, 1].item() == pytest.approx(-math.exp(-50.0), rel=1e-9)
    loss = unlikelihood_loss(torch.zeros(1, 1), torch.ones(1, 1), logps, torch.ones(1, 2), alpha=1.0)
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all()


def test_unlikelihood_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="alpha"):
        unlikelihood_loss(
            torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 2), alpha=-1.0
        )
    with pytest.raises(ValueError, match="batch size"):
        unlikelihood_loss(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(1, 2), torch.ones(1, 2))


def test_ppo_policy_loss_hand_values() -> None:
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), 7.0]])
    old_logprobs = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, -2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    # Token 0: max(-1.5, -1.2) = -1.2; token 1: ratio 0.9 is inside the clip range, 1.8.
    assert loss.item() == pytest.approx((-1.2 + 1.8) / 2, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    k3 = ((0.5 - math.log(1.5)) + (-0.1 - math.log(0.9))) / 2
    assert stats["approx_kl"].item() == pytest.approx(k3, rel=1e-5)


def test_ppo_value_loss_hand_values() -> None:
    values = torch.tensor([[1.0, 2.0, 9.0]])
    old_values = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[0.0, 2.5, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # Token 0: unclipped error 1.0 beats clipped (0.7)^2; token 1: both 0.25.
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    assert stats["clipfrac"].item() == 0.0
    _, stats = ppo_value_loss(values, old_values, torch.tensor([[2.0, 2.5, 0.0]]), mask, clip_range_value=0.2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_ppo_rejects_bad_input() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(2, 2), x, clip_range=0.2)
    with pytest.raises(ValueError, match="clip_range_value"):
        ppo_value_loss(x, x, x, torch.ones(2, 3), clip_range_value=0.0)


def test_gae_matches_hand_computation_with_padding() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.3, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 1.0 - 0.3  # last valid token: V after it is 0
    a1 = (0.9 * 0.3 - 0.4) + 0.9 * 0.8 * a2
    a0 = (0.9 * 0.4 - 0.5) + 0.9 * 0.8 * a1
    assert advantages.tolist() == [pytest.approx([a0, a1, a2, 0.0])]
    assert returns.tolist() == [pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])]


def test_gae_rejects_left_padding() -> None:
    with pytest.raises(ValueError, match="mask"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]))


def test_masked_statistics_ignore_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 1000.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    assert masked_var(x, mask).item() == pytest.approx(valid.var().item())
    whitened = masked_whiten(x, mask)
    expected = (valid - valid.mean()) / valid.std()
    torch.testing.assert_close(whitened[mask.bool()], expected, rtol=1e-6, atol=1e-6)
    assert whitened[~mask.bool()].tolist() == [0.0, 0.0, 0.0]
    unshifted = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(unshifted[mask.bool()], expected + 3.0, rtol=1e-6, atol=1e-6)


def test_masked_mean_rejects_empty_mask() -> None:
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.ones(2, 2), torch.zeros(2, 2))


def test_plackett_luce_dpo_is_dpo_for_two_and_the_ranking_likelihood_for_more() -> None:
    from dpo_lab.bradley_terry import plackett_luce_log_likelihood
    from dpo_lab.losses import plackett_luce_dpo_loss

    policy = torch.tensor([[-3.0, -4.5], [-2.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-3.5, -4.0], [-2.2, -1.5]], dtype=torch.float64)
    pairwise, _, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.5)
    torch.testing.assert_close(plackett_luce_dpo_loss(policy, ref, beta=0.5), pairwise)
    # K = 4: minus the Plackett-Luce log-likelihood of the order 0 > 1 > 2 > 3 under scores beta log pi/pi_ref
    policy4 = torch.tensor([[-1.0, -2.5, -0.5, -3.0]], dtype=torch.float64)
    ref4 = torch.tensor([[-1.2, -2.0, -1.5, -2.0]], dtype=torch.float64)
    scores = 0.3 * (policy4 - ref4)[0]
    expected = -plackett_luce_log_likelihood(scores, [0, 1, 2, 3])
    torch.testing.assert_close(plackett_luce_dpo_loss(policy4, ref4, beta=0.3)[0], expected)
    with pytest.raises(ValueError, match="K >= 2"):
        plackett_luce_dpo_loss(policy4[:, :1], ref4[:, :1], beta=0.3)


# SimPO, ORPO, KTO: closed forms on hand-picked numbers, and their limiting cases.

def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_simpo_is_the_length_normalised_margin_loss():
    losses, chosen, rejected = simpo_loss(t([-6.0, -2.0]), t([3, 1]), t([-4.0, -9.0]), t([1, 3]), beta=2.0, gamma=0.5)
    # rewards beta * logp / |y|: chosen (-4, -4), rejected (-8, -6)
    assert chosen.tolist() == [-4.0, -4.0] and rejected.tolist() == [-8.0, -6.0]
    expected = [-math.log(1 / (1 + math.exp(-(4.0 - 0.5)))), -math.log(1 / (1 + math.exp(-(2.0 - 0.5))))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_simpo_without_margin_at_equal_lengths_is_dpo_with_a_uniform_reference():
    pc, pr, length = t([-5.0, -7.0]), t([-6.0, -4.0]), t([4, 4])
    simpo, _, _ = simpo_loss(pc, length, pr, length, beta=2.0, gamma=0.0)
    dpo, _, _ = dpo_loss(pc, pr, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), beta=0.5)
    assert simpo.tolist() == pytest.approx(dpo.tolist(), rel=1e-12)


def test_simpo_margin_raises_the_loss_and_bad_inputs_are_refused():
    pc, pr, length = t([-2.0]), t([-3.0]), t([2])
    low, high = (simpo_loss(pc, length, pr, length, beta=1.0, gamma=g)[0].item() for g in (0.0, 1.0))
    assert high > low
    with pytest.raises(ValueError, match="gamma"):
        simpo_loss(pc, length, pr, length, beta=1.0, gamma=-0.1)
    with pytest.raises(ValueError, match=">= 1 token"):
        simpo_loss(pc, t([0]), pr, length, beta=1.0, gamma=0.0)


def test_orpo_is_mean_nll_plus_the_odds_ratio_term():
    pc, lc, pr, lr = t([-2.0]), t([4]), t([-3.0]), t([2])  # mean log-probs -0.5 and -1.5
    losses, ratio = orpo_loss(pc, lc, pr, lr, lam=0.25)

    def log_odds(mean):
        return mean - math.log(1 - math.exp(mean))

    expected_ratio = log_odds(-0.5) - log_odds(-1.5)
    assert ratio.item() == pytest.approx(expected_ratio, rel=1e-12)
    assert losses.item() == pytest.approx(0.5 + 0.25 * math.log(1 + math.exp(-expected_ratio)), rel=1e-12)


def test_orpo_limits_sft_alone_and_equal_completions():
    pc, lc = t([-3.0, -1.0]), t([3, 2])
    sft_only, _ = orpo_loss(pc, lc, t([-9.0, -9.0]), t([3, 3]), lam=0.0)
    assert sft_only.tolist() == pytest.approx([1.0, 0.5])  # mean token NLL of y_w
    same, ratio = orpo_loss(pc, lc, pc, lc, lam=1.0)
    assert ratio.tolist() == [0.0, 0.0]
    assert same.tolist() == pytest.approx([1.0 + math.log(2), 0.5 + math.log(2)])


def test_kto_values_desirable_above_and_undesirable_below_the_reference_point():
    policy, ref = t([-1.0, -1.0, -3.0]), t([-2.0, -2.0, -2.0])  # log-ratios 1, 1, -1
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_loss(policy, ref, desirable, reference_point=0.5, beta=2.0, desirable_weight=1.0,
                               undesirable_weight=1.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1.0 - sigmoid(2.0 * (1 - 0.5)), 1.5 * (1 - sigmoid(2.0 * (0.5 - 1))), 1.5 * (1 - sigmoid(2.0 * 1.5))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert rewards.tolist() == [2.0, 2.0, -2.0]


def test_kto_at_the_reference_point_is_half_its_weight_and_the_point_is_clamped_at_zero():
    policy = t([-2.0, -2.0])
    at_point, _ = kto_loss(policy, policy, torch.tensor([True, False]), reference_point=-3.0, beta=1.0,
                           desirable_weight=1.0, undesirable_weight=2.0)
    assert at_point.tolist() == [0.5, 1.0]  # r = 0 = max(0, -3): sigmoid(0) = 1/2 of each weight
    far, _ = kto_loss(t([40.0]), t([0.0]), torch.tensor([True]), reference_point=0.0, beta=1.0)
    assert far.item() < 1e-15  # a desirable completion far above the point costs nothing


# RLOO and GRPO: group baselines, the k3 estimator, the clipped loss with its KL term.

def test_rloo_baseline_is_the_mean_of_the_other_samples():
    rewards = t([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    advantages = rloo_advantages(rewards)
    assert advantages.tolist() == [[1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], [-1.5, -1.5, 3.0]]
    assert advantages.sum(-1).abs().max() < 1e-12  # leave-one-out: each row sums to 0
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(t([[1.0], [2.0]]))


def test_group_normalised_advantages_are_per_prompt_z_scores():
    rewards = t([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    advantages = group_normalised_advantages(rewards, eps=1e-12)
    assert advantages[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], rel=1e-9)  # std 1
    assert advantages[1].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal


def test_k3_is_zero_at_the_reference_nonnegative_and_unbiased():
    logprobs = t([-1.0, -2.0, -0.5])
    assert k3_kl(logprobs, logprobs).tolist() == [0.0, 0.0, 0.0]
    assert bool((k3_kl(logprobs, t([-3.0, 0.0, -0.1])) >= 0).all())
    p, q = t([0.7, 0.2, 0.1]), t([0.4, 0.4, 0.2])  # E_p[k3] = KL(p || q) exactly
    expected = (p * (p / q).log()).sum()
    assert (p * k3_kl(p.log(), q.log())).sum().item() == pytest.approx(expected.item(), rel=1e-12)


def test_grpo_loss_at_the_old_policy_is_minus_the_mean_advantage_plus_beta_kl():
    logprobs, ref = t([[-1.0, -2.0], [-0.5, -9.0]]), t([[-1.5, -2.0], [-0.5, -9.0]])
    mask, advantages = t([[1.0, 1.0], [1.0, 0.0]]), t([2.0, -1.0])
    loss, stats = grpo_loss(logprobs, logprobs, ref, advantages, mask, clip_range=0.2, beta=0.1)
    kl_first = (math.exp(-0.5) - (-0.5) - 1.0) / 2  # the first completion's mean k3 over its two tokens
    assert loss.item() == pytest.approx(((-2.0 + 0.1 * kl_first) + 1.0) / 2, rel=1e-12)
    assert stats["clipfrac"].item() == 0.0


def test_grpo_clips_like_ppo_when_beta_is_zero():
    old, mask = t([[-1.0, -1.0]]), t([[1.0, 1.0]])
    new = old + math.log(2.0)  # ratio 2 on every token
    loss, stats = grpo_loss(new, old, old, t([1.0]), mask, clip_range=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    ppo, _ = ppo_policy_loss(new, old, t([[1.0, 1.0]]), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(ppo.item())


def test_clipped_sequence_loss_is_reinforce_at_ratio_one_and_clips_after():
    logprobs = t([-3.0, -5.0]).requires_grad_()
    advantages = t([2.0, -1.0])
    loss = clipped_sequence_loss(logprobs, logprobs.detach(), advantages, clip_range=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)  # -mean(A) at ratio 1
    assert logprobs.grad.tolist() == pytest.approx([-1.0, 0.5])  # -A / B: REINFORCE's gradient
    moved = clipped_sequence_loss(t([-3.0 + math.log(2.0)]), t([-3.0]), t([1.0]), clip_range=0.2)
    assert moved.item() == pytest.approx(-1.2)  # ratio 2, A > 0: clipped at 1 + c
