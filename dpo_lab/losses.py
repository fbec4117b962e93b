"""Preference-learning and RL losses as pure tensor functions.

Equation numbers refer to Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model" (arXiv 2305.18290). Shapes use ``B`` for the
batch and ``T`` for completion tokens; masks are 1 on real completion tokens and 0 on
padding. Sequence log-probabilities are *sums* of token log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "ipo", "cdpo", "hinge", "robust")

# Smallest distance from 0 allowed for a token log-prob inside log(1 - p); keeps the
# unlikelihood term finite (and its gradient bounded) when the policy puts p ~= 1 on a token.
_LOG1MEXP_MAX = -1e-6


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` naming the arguments unless all tensors share one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listing} must all have the same shape")


def check_beta(beta: float | Tensor) -> None:
    """Raise ``ValueError`` unless the KL coefficient ``beta`` (a number or tensor) is > 0."""
    if not bool(torch.all(torch.as_tensor(beta) > 0)):
        raise ValueError(f"beta must be > 0, got beta={beta}")


# ---------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` is nonzero.

    ``x`` and ``mask`` have the same shape (e.g. (B, T)). Padded entries are replaced by 0
    before summing, so NaN/inf in padding never leaks into the result or its gradient.
    Returns a scalar for ``dim=None`` else ``x`` reduced over ``dim`` (e.g. (B,) for dim=1).
    """
    check_same_shape(x=x, mask=mask)
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero (scalar, or reduced over ``dim``).

    ``x``, ``mask``: same shape, e.g. (B, T). Raises ``ValueError`` if the mask selects no
    entry (in some slice, when ``dim`` is given).
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    if bool((count == 0).any()):
        raise ValueError("mask selects no entries; masked_mean is undefined")
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance (scalar) of the valid entries of ``x`` (same shape as ``mask``, e.g. (B, T)).

    ``unbiased=True`` applies Bessel's correction n / (n - 1) and needs at least two valid
    entries.
    """
    centred = x - masked_mean(x, mask)
    var = masked_mean(centred**2, mask)
    if not unbiased:
        return var
    n = masked_sum(torch.ones_like(x), mask)
    if n < 2:
        raise ValueError("mask must select at least 2 entries for an unbiased masked_var")
    return var * n / (n - 1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Standardise ``x`` (e.g. advantages, (B, T)) using statistics of the valid entries only.

    Returns (x - mean) / std over entries with ``mask`` != 0; with ``shift_mean=False`` the
    mean is added back (only the scale is normalised). Padded entries are returned as 0.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------
# Reward modelling and DPO
# ---------------------------------------------------------------------------------------


def ordered_share(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Share of pairs a reward orders right, r_w > r_l, a tie counting half (0-d tensor; inputs (B,)).

    At the start of DPO every implicit reward is 0 (pi = pi_ref): all ties, so 0.5, not 0.
    """
    return ((reward_chosen > reward_rejected).float() + 0.5 * (reward_chosen == reward_rejected).float()).mean()


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Reward-model negative log-likelihood, Eq. 2: mean_i -log sigmoid(r_w,i - r_l,i).

    ``reward_chosen``, ``reward_rejected``: (B,) rewards of preferred / dispreferred
    completions. Returns a scalar.
    """
    check_same_shape(reward_chosen=reward_chosen, reward_rejected=reward_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def _sigmoid_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    return -F.logsigmoid(beta * h)


def _ipo_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    return (h - 1.0 / (2.0 * beta)) ** 2


def _cdpo_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    return -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _hinge_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    return torch.relu(1.0 - beta * h)


def _robust_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    return (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)


_LOSS_FNS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid_loss,
    "ipo": _ipo_loss,
    "cdpo": _cdpo_loss,
    "hinge": _hinge_loss,
    "robust": _robust_loss,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example DPO-family losses and the implicit rewards of Eq. 5.

    All four inputs are (B,) *summed* completion log-probabilities. With
    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)) and eps =
    ``label_smoothing``:

    - ``sigmoid``: Eq. 7, -log sigmoid(beta h).
    - ``ipo``: Azar et al. 2023, (h - 1 / (2 beta))^2. Computed on the SUMMED log-probs
      given here; other libraries often length-normalise h first, which changes the scale.
    - ``cdpo``: conservative DPO, -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      (DPO under labels flipped with probability eps).
    - ``hinge``: SLiC, relu(1 - beta h).
    - ``robust``: Chowdhury et al. 2024, (-(1 - eps) log sigmoid(beta h)
      + eps log sigmoid(-beta h)) / (1 - 2 eps), unbiased under label-flip rate eps.

    ``label_smoothing`` must lie in [0, 0.5); only ``cdpo`` and ``robust`` use it (both equal
    ``sigmoid`` at eps = 0). Returns ``(losses, chosen_rewards, rejected_rewards)``, each
    (B,), where the rewards beta (log pi - log pi_ref) are detached.
    """
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    check_beta(beta)
    if loss_type not in _LOSS_FNS:
        raise ValueError(f"unknown loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = _LOSS_FNS[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def plackett_luce_dpo_loss(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Per-example DPO loss for full rankings (the paper's Appendix A.3): the Plackett-Luce model of
    Eq. 18 with the implicit reward of Eq. 5 in place of r, as a negative log-likelihood.

    ``policy_logps``, ``ref_logps``: (B, K) summed log-probabilities of K completions of each prompt,
    **ranked best first**. With the implicit rewards u_k = beta (log pi(y_k) - log pi_ref(y_k)),
    the loss is -log prod_k exp(u_k) / sum_{j >= k} exp(u_j): the negative log-likelihood of the
    ranking when the policy's implicit reward plays the Plackett-Luce scores. Returns (B,). For
    K = 2 it equals Eq. 7, -log sigmoid(u_1 - u_2).
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    check_beta(beta)
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"need (B, K) log-probabilities with K >= 2 ranked completions, got {tuple(policy_logps.shape)}")
    rewards = beta * (policy_logps - ref_logps)
    remaining = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)  # log sum_{j >= k} exp(u_j), (B, K)
    return -(rewards - remaining).sum(-1)


# ---------------------------------------------------------------------------------------
# Preference objectives since the paper: SimPO, ORPO, KTO
# ---------------------------------------------------------------------------------------


def check_lengths(**lengths: Tensor) -> None:
    """Raise ``ValueError`` unless every completion length (token count, (B,)) is at least 1."""
    for name, value in lengths.items():
        if bool((value < 1).any()):
            raise ValueError(f"{name} must be >= 1 token for every completion, got {value.tolist()}")


def simpo_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor, policy_rejected_logps: Tensor,
               rejected_lengths: Tensor, beta: float, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): reference-free, length-normalised, with a margin.

    The implicit reward is the policy's average token log-probability, scaled:
    r(x, y) = (beta / |y|) log pi(y|x), and the loss is -log sigmoid(r(x, y_w) - r(x, y_l) - gamma),
    gamma >= 0 the target reward margin. No pi_ref: nothing keeps the policy near pi_SFT but the
    loss's own saturation (and early stopping). ``policy_*_logps``: (B,) summed completion
    log-probabilities; ``*_lengths``: (B,) completion token counts. Returns ``(losses,
    chosen_rewards, rejected_rewards)``, each (B,), the rewards detached. At gamma = 0 and equal
    lengths L it is Eq. 7 with pi_ref uniform and beta / L in place of beta.
    """
    check_same_shape(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                     policy_rejected_logps=policy_rejected_logps, rejected_lengths=rejected_lengths)
    check_beta(beta)
    check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if gamma < 0:
        raise ValueError(f"gamma (the target margin) must be >= 0, got gamma={gamma}")
    chosen = beta * policy_chosen_logps / chosen_lengths
    rejected = beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


def orpo_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor, policy_rejected_logps: Tensor,
              rejected_lengths: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eq. 6-7): SFT on y_w plus an odds-ratio penalty on y_l.

    With the length-normalised likelihood P(y|x) = exp(log pi(y|x) / |y|) and the odds
    odds(y|x) = P / (1 - P), the loss is L_SFT + lam * L_OR, where L_SFT = -log pi(y_w|x) / |y_w|
    (the mean token negative log-likelihood of the chosen completion) and
    L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x)). No pi_ref and no separate SFT stage:
    ORPO starts from the base model in the paper; here it starts from pi_SFT like every method.
    ``policy_*_logps``: (B,) summed log-probabilities; ``*_lengths``: (B,) token counts. Returns
    ``(losses, log_odds_ratio)``, each (B,), the ratio detached. lam = 0 is Preferred-FT with
    per-token averaging.
    """
    check_same_shape(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                     policy_rejected_logps=policy_rejected_logps, rejected_lengths=rejected_lengths)
    check_lengths(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got lam={lam}")
    chosen_mean = policy_chosen_logps / chosen_lengths
    rejected_mean = policy_rejected_logps / rejected_lengths
    log_odds_ratio = (chosen_mean - log1mexp(chosen_mean)) - (rejected_mean - log1mexp(rejected_mean))
    return -chosen_mean - lam * F.logsigmoid(log_odds_ratio), log_odds_ratio.detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, reference_point: Tensor | float,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8): unpaired desirable and undesirable completions.

    With r(x, y) = log pi(y|x) - log pi_ref(y|x) and the reference point z0 (an estimate of
    KL(pi || pi_ref), detached, clamped at 0), the value of a completion is
    v = lam_D sigmoid(beta (r - z0)) if it is desirable, lam_U sigmoid(beta (z0 - r)) if not, and the
    loss is lam_y - v: a desirable completion is pushed above the reference point, an undesirable
    one below, each with a saturating (prospect-theory) value. ``policy_logps``, ``ref_logps``:
    (B,) summed log-probabilities; ``desirable``: (B,) bool; ``reference_point``: z0, a number or
    0-d tensor. Returns ``(losses, rewards)``, each (B,), the rewards beta r detached. From
    preference pairs, each pair gives one desirable (y_w) and one undesirable (y_l) example.
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    check_beta(beta)
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(f"the weights must be > 0, got {desirable_weight} and {undesirable_weight}")
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratio = policy_logps - ref_logps
    sign = torch.where(desirable.bool(), 1.0, -1.0).to(policy_logps.dtype)
    weight = torch.where(desirable.bool(), desirable_weight, undesirable_weight).to(policy_logps.dtype)
    return weight * (1.0 - torch.sigmoid(sign * beta * (logratio - z0))), beta * logratio.detach()


# ---------------------------------------------------------------------------------------
# Baselines of the paper's experiments
# ---------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """Numerically stable log(1 - exp(x)) for log-probabilities ``x`` <= 0 (any shape).

    Uses log(-expm1(x)) near 0 and log1p(-exp(x)) further away (Maechler 2012); ``x`` is
    first clamped to at most -1e-6 so a token with p ~= 1 gives a large finite value.
    """
    x = x.clamp(max=_LOG1MEXP_MAX)
    near_zero = x > -0.6931471805599453
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preferred_ft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Preferred-FT baseline: negative log-likelihood of the chosen completion.

    ``token_logps``: (B, T) log pi(y_w,t | x, y_w,<t); ``mask``: (B, T). Returns (B,)
    losses -sum_t log pi(y_w,t), summed over completion tokens of each example.
    """
    return -masked_sum(token_logps, mask, dim=-1)


def unlikelihood_loss(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    alpha: float = 1.0,
) -> Tensor:
    """Unlikelihood baseline (Welleck et al. 2019) in its token-level form.

    Per example: loss = -sum_t log p(y_w,t) - alpha * sum_t log(1 - p(y_l,t)), i.e. the
    likelihood of the chosen completion is maximised while every token of the rejected
    completion is pushed towards probability 0. Both sums run over the completion tokens of
    that example (no length normalisation). ``chosen_token_logps``/``chosen_mask``: (B, T_w);
    ``rejected_token_logps``/``rejected_mask``: (B, T_l); per-token log-probs are required
    because log(1 - p) does not factor over a summed log-prob. log(1 - p) is computed by
    ``log1mexp``. Returns (B,) losses.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got alpha={alpha}")
    if chosen_token_logps.shape[0] != rejected_token_logps.shape[0]:
        raise ValueError(
            "batch size mismatch: chosen_token_logps has "
            f"{chosen_token_logps.shape[0]} rows, rejected_token_logps has {rejected_token_logps.shape[0]}"
        )
    unlikelihood = masked_sum(log1mexp(rejected_token_logps), rejected_mask, dim=-1)
    return preferred_ft_loss(chosen_token_logps, chosen_mask) - alpha * unlikelihood


# ---------------------------------------------------------------------------------------
# PPO (Ziegler et al. 2019 / CleanRL conventions), token level with (B, T) masks
# ---------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective of PPO (Schulman et al. 2017), as a loss to minimise.

    All inputs are (B, T). With ratio = exp(logprobs - old_logprobs), the loss is the masked
    mean of max(-A ratio, -A clip(ratio, 1 - c, 1 + c)). Stats (detached scalars):
    ``clipfrac`` = fraction of valid tokens with |ratio - 1| > c, and ``approx_kl`` = masked
    mean of (ratio - 1) - log ratio, the k3 estimator of KL(old || new).
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got clip_range={clip_range}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2).

    All inputs are (B, T); V_clip = V_old + clip(V - V_old, -c, c). Stats (detached scalar):
    ``clipfrac`` = fraction of valid tokens where the clipped error is the larger one.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be > 0, got clip_range_value={clip_range_value}")
    values_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask)}
    return loss, stats


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) with right padding.

    ``rewards``, ``values``, ``mask``: (B, T); each row's valid tokens must be a contiguous
    prefix. Backwards over t: delta_t = r_t + gamma V_{t+1} - V_t and
    A_t = delta_t + gamma lam A_{t+1}, where V and A after the last valid token are 0 (the
    episode ends) and padded positions contribute nothing. Inputs are detached (the outputs
    are regression / policy-gradient targets). Returns ``(advantages, returns)``, both (B, T),
    with returns = advantages + values on valid tokens and 0 on padding.
    """
    check_same_shape(rewards=rewards, values=values, mask=mask)
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("mask must be right-padded: each row's valid tokens form a contiguous prefix")
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(valid, rewards.detach(), zero)
    values = torch.where(valid, values.detach(), zero)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zero)
        next_value = values[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, torch.where(valid, advantages + values, zero)


# ---------------------------------------------------------------------------------------
# Online methods since the paper: RLOO and GRPO (group baselines instead of a value model)
# ---------------------------------------------------------------------------------------


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, arXiv 2402.14740, Eq. 5).

    ``rewards``: (P, k), the sequence rewards of k >= 2 completions of each of P prompts. Sample i's
    baseline is the mean reward of the other k - 1 samples of its prompt, so the advantage
    r_i - mean_{j != i} r_j is unbiased and needs no value model. Returns (P, k); each row sums to 0.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"need (P, k) rewards with k >= 2 samples per prompt, got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def clipped_sequence_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """REINFORCE with a clipped sequence-level ratio: RLOO's update when one rollout feeds several steps.

    ``logprobs``, ``old_logprobs``: (B,) summed completion log-probabilities under the current and the
    sampling policy; ``advantages``: (B,). Loss: mean of -min(ratio A, clip(ratio, 1 - c, 1 + c) A),
    ratio = pi(y|x) / pi_old(y|x). At ratio 1 (the first step on a rollout) its gradient is exactly
    REINFORCE's, -A grad log pi(y|x) (Ahmadian et al. 2024); later steps on the same samples are
    importance-weighted and clipped, as in PPO, instead of silently off-policy.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got clip_range={clip_range}")
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages).mean()


def group_normalised_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Shao et al. 2024, arXiv 2402.03300, Section 4.1.2): rewards standardised per prompt.

    ``rewards``: (P, k) sequence rewards of k >= 2 completions per prompt. Returns (P, k):
    (r_i - mean(r)) / (std(r) + eps), the unbiased std of the row; a row of equal rewards gives 0.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"need (P, k) rewards with k >= 2 samples per prompt, got {tuple(rewards.shape)}")
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + eps)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """The per-token KL estimator of GRPO (arXiv 2402.03300, Eq. 4; Schulman's k3), elementwise.

    pi_ref / pi - log(pi_ref / pi) - 1 at the sampled token: >= 0, 0 where pi = pi_ref, and an
    unbiased estimate of KL(pi || pi_ref) under samples of pi. Inputs: log-probs of any one shape.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              clip_range: float, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (arXiv 2402.03300, Eq. 3) as a loss to minimise.

    ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask``: (B, T) over the completion tokens;
    ``advantages``: (B,), one per completion (:func:`group_normalised_advantages`), shared by its
    tokens. Per token: -min(ratio A, clip(ratio, 1 - c, 1 + c) A) + beta k3(pi, pi_ref), with
    ratio = pi / pi_old; averaged over each completion's tokens, then over completions. The KL
    sits in the loss, not in the reward as in PPO: it pulls every token towards pi_ref directly.
    Stats (detached): ``kl`` (mean per-token k3), ``clipfrac``.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got clip_range={clip_range}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got beta={beta}")
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * a)
    kl = k3_kl(logprobs, ref_logprobs)
    per_completion = masked_mean(-surrogate + beta * kl, mask, dim=-1)
    with torch.no_grad():
        stats = {"kl": masked_mean(kl, mask), "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype),
                                                                        mask)}
    return per_completion.mean(), stats
