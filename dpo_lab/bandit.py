"""A tabular "language model" world where every DPO identity can be checked exactly.

Prompts x in [0, X) and responses y in [0, Y); a policy is an (X, Y) row-stochastic float64
tensor pi(y | x). Equation numbers refer to Rafailov et al. 2023 (arXiv 2305.18290):
Eq. 3 is the KL-regularised RL objective, Eq. 4 its optimum, Eq. 5 the implicit reward,
Eq. 6 the Bradley-Terry model written with the policy and Eq. 7 the DPO loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lab.bradley_terry import bt_probability, lbfgs_minimise
from dpo_lab.losses import check_beta, check_same_shape, dpo_loss

DTYPE = torch.float64


@dataclass(frozen=True, eq=False)
class Bandit:
    """Reference policy ``ref_probs`` (X, Y), true rewards ``rewards`` (X, Y) and prompt
    distribution ``prompt_probs`` (X,) (uniform when omitted). Stored as float64; the
    reference must give every response positive probability."""

    ref_probs: Tensor
    rewards: Tensor
    prompt_probs: Tensor | None = None

    def __post_init__(self) -> None:
        ref = torch.as_tensor(self.ref_probs, dtype=DTYPE)
        rewards = torch.as_tensor(self.rewards, dtype=DTYPE)
        if ref.ndim != 2:
            raise ValueError(f"ref_probs must be (X, Y), got shape {tuple(ref.shape)}")
        check_same_shape(ref_probs=ref, rewards=rewards)
        if bool((ref <= 0).any()) or not torch.allclose(ref.sum(-1), torch.ones((), dtype=DTYPE)):
            raise ValueError("ref_probs rows must be strictly positive and sum to 1")
        if self.prompt_probs is None:
            prompts = torch.full((ref.shape[0],), 1.0 / ref.shape[0], dtype=DTYPE)
        else:
            prompts = torch.as_tensor(self.prompt_probs, dtype=DTYPE)
        if (
            prompts.shape != ref.shape[:1]
            or bool((prompts < 0).any())
            or not torch.isclose(prompts.sum(), torch.ones((), dtype=DTYPE))
        ):
            raise ValueError(f"prompt_probs must be a ({ref.shape[0]},) probability vector")
        object.__setattr__(self, "ref_probs", ref)
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "prompt_probs", prompts)

    @classmethod
    def random(
        cls,
        n_prompts: int,
        n_responses: int,
        seed: int = 0,
        reward_scale: float = 1.0,
        ref_temperature: float = 1.0,
    ) -> Bandit:
        """Random world: ref = softmax(N(0,1) / ``ref_temperature``), rewards ~ N(0, scale^2)."""
        gen = torch.Generator().manual_seed(seed)
        ref_logits = torch.randn(n_prompts, n_responses, generator=gen, dtype=DTYPE) / ref_temperature
        rewards = reward_scale * torch.randn(n_prompts, n_responses, generator=gen, dtype=DTYPE)
        return cls(ref_probs=ref_logits.softmax(-1), rewards=rewards)


def _check_policy(bandit: Bandit, policy: Tensor) -> None:
    if tuple(policy.shape[-2:]) != tuple(bandit.ref_probs.shape):
        raise ValueError(
            f"policy must have shape (..., X, Y) = (..., {tuple(bandit.ref_probs.shape)}), got {tuple(policy.shape)}"
        )


def optimal_policy(bandit: Bandit, beta: float | Tensor) -> Tensor:
    """Eq. 4: pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), as softmax(log pi_ref + r / beta).

    Returns (X, Y) for a number ``beta``, or (N, X, Y) for a tensor of N betas.
    """
    check_beta(beta)
    beta = torch.as_tensor(beta, dtype=DTYPE)[..., None, None]
    return torch.softmax(bandit.ref_probs.log() + bandit.rewards / beta, dim=-1)


def expected_reward(bandit: Bandit, policy: Tensor) -> Tensor:
    """Exact E_{x ~ rho, y ~ pi(.|x)}[r(x, y)] for ``policy`` (..., X, Y). Returns shape (...)."""
    _check_policy(bandit, policy)
    return ((policy * bandit.rewards).sum(-1) * bandit.prompt_probs).sum(-1)


def kl_to_ref(bandit: Bandit, policy: Tensor) -> Tensor:
    """Exact E_{x ~ rho}[KL(pi(.|x) || pi_ref(.|x))] for ``policy`` (..., X, Y). Returns shape (...)."""
    _check_policy(bandit, policy)
    per_prompt = (torch.xlogy(policy, policy) - policy * bandit.ref_probs.log()).sum(-1)
    return (per_prompt * bandit.prompt_probs).sum(-1)


def objective(bandit: Bandit, policy: Tensor, beta: float) -> Tensor:
    """Eq. 3: E[r(x, y)] - beta * KL(pi || pi_ref) for ``policy`` (..., X, Y). Returns shape (...)."""
    check_beta(beta)
    return expected_reward(bandit, policy) - beta * kl_to_ref(bandit, policy)


def implied_reward(policy: Tensor, ref_probs: Tensor, beta: float) -> Tensor:
    """Eq. 5 without the partition term: beta * log(pi(y|x) / pi_ref(y|x)), (X, Y).

    Equals the reward for which ``policy`` is optimal, minus the per-prompt constant
    beta * log Z(x).
    """
    check_same_shape(policy=policy, ref_probs=ref_probs)
    check_beta(beta)
    return beta * (policy.log() - ref_probs.log())


def optimal_frontier(bandit: Bandit, betas: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """Exact reward-vs-KL frontier: (KL(pi*_beta || pi_ref), E_{pi*_beta}[r]) for each beta.

    By Lagrangian duality, pi*_beta (Eq. 4) has the highest expected reward of all policies
    with its KL, so the curve bounds every policy. Returns ``(kls, rewards)``, each
    (len(betas),), in the order of ``betas``.
    """
    policies = optimal_policy(bandit, torch.as_tensor(betas, dtype=DTYPE))
    return kl_to_ref(bandit, policies), expected_reward(bandit, policies)


def preference_probabilities(bandit: Bandit) -> Tensor:
    """Eq. 1 for every response pair: p[x, y1, y2] = sigmoid(r(x, y1) - r(x, y2)), (X, Y, Y)."""
    return bt_probability(bandit.rewards[:, :, None], bandit.rewards[:, None, :])


def sample_preferences(bandit: Bandit, n: int, seed: int = 0, deterministic: bool = False) -> Tensor:
    """Draw ``n`` labelled pairs: x ~ rho, y1, y2 ~ pi_ref(.|x) i.i.d., y1 wins w.p. Eq. 1.

    ``deterministic``: the response with the higher reward always wins instead (the labels of the
    sentiment task, where the higher ground-truth score wins). Returns an (n, 3) LongTensor of rows
    ``(x, y_w, y_l)``. Ties y1 == y2 are kept; they carry no DPO gradient.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(bandit.prompt_probs, n, replacement=True, generator=gen)
    y = torch.multinomial(bandit.ref_probs[x], 2, replacement=True, generator=gen)
    first, second = bandit.rewards[x, y[:, 0]], bandit.rewards[x, y[:, 1]]
    if deterministic:
        first_wins = first > second
    else:
        first_wins = torch.rand(n, generator=gen, dtype=DTYPE) < bt_probability(first, second)
    winner = torch.where(first_wins, y[:, 0], y[:, 1])
    loser = torch.where(first_wins, y[:, 1], y[:, 0])
    return torch.stack([x, winner, loser], dim=1)


def _adam_iterates(
    logits: Tensor, loss_fn: Callable[[Tensor], Tensor], steps: int, lr: float
) -> list[Tensor]:
    """Run Adam on a copy of ``logits`` (X, Y); returns the start and the logits after each step."""
    params = logits.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=lr)
    iterates = [logits]
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(params).backward()
        optimizer.step()
        iterates.append(params.detach().clone())
    return iterates


def _lbfgs_polish(logits: Tensor, loss_fn: Callable[[Tensor], Tensor], max_iter: int) -> Tensor:
    """Refine ``logits`` (X, Y) with L-BFGS to tight tolerances; returns detached logits."""
    return lbfgs_minimise(logits, loss_fn, max_iter, tolerance_grad=1e-12, tolerance_change=1e-15)


def _dpo_tabular_loss(
    logits: Tensor, bandit: Bandit, beta: float, pairs: tuple[Tensor, Tensor] | None, loss_type: str,
    label_smoothing: float
) -> Tensor:
    """Eq. 7 for a tabular policy softmax(``logits``) (X, Y).

    ``pairs=None``: exact expectation over x ~ rho, y1, y2 ~ pi_ref and Bradley-Terry labels,
    i.e. sum over ordered pairs (y1 chosen) weighted by rho(x) pi_ref(y1|x) pi_ref(y2|x)
    p(y1 > y2 | x). Otherwise ``pairs`` is ``(rows, weights)`` of :func:`_distinct_pairs` and the
    loss is the mean over the sampled pairs, computed once per distinct row.
    """
    logp = F.log_softmax(logits, dim=-1)
    logref = bandit.ref_probs.log()
    if pairs is None:
        n_prompts, n_responses = logp.shape
        shape = (n_prompts, n_responses, n_responses)
        chosen, rejected = logp[:, :, None].expand(shape), logp[:, None, :].expand(shape)
        ref_chosen, ref_rejected = logref[:, :, None].expand(shape), logref[:, None, :].expand(shape)
        weights = (
            bandit.prompt_probs[:, None, None]
            * bandit.ref_probs[:, :, None]
            * bandit.ref_probs[:, None, :]
            * preference_probabilities(bandit)
        )
    else:
        rows, weights = pairs
        x, yw, yl = rows.unbind(dim=1)
        chosen, rejected, ref_chosen, ref_rejected = logp[x, yw], logp[x, yl], logref[x, yw], logref[x, yl]
    losses, _, _ = dpo_loss(
        chosen.reshape(-1),
        rejected.reshape(-1),
        ref_chosen.reshape(-1),
        ref_rejected.reshape(-1),
        beta,
        loss_type,
        label_smoothing,
    )
    return (weights.reshape(-1) * losses).sum()


def _check_pairs(bandit: Bandit, pairs: Tensor) -> None:
    n_prompts, n_responses = bandit.ref_probs.shape
    if pairs.ndim != 2 or pairs.shape[1] != 3 or pairs.dtype != torch.long:
        raise ValueError(
            f"pairs must be an (n, 3) LongTensor of (x, y_w, y_l), got {pairs.dtype} {tuple(pairs.shape)}"
        )
    bounds = torch.tensor([n_prompts, n_responses, n_responses])
    if bool((pairs < 0).any()) or bool((pairs >= bounds).any()):
        raise ValueError(f"pairs index outside the bandit: x must be < {n_prompts}, y < {n_responses}")


def _dpo_objective(bandit: Bandit, beta: float, pairs: Tensor | None, loss_type: str,
                   label_smoothing: float) -> Callable[[Tensor], Tensor]:
    """The DPO-family loss as a function of the logits (X, Y), inputs validated."""
    check_beta(beta)
    if pairs is not None:
        _check_pairs(bandit, pairs)
        pairs = _distinct_pairs(pairs)
    return lambda logits: _dpo_tabular_loss(logits, bandit, beta, pairs, loss_type, label_smoothing)


def _distinct_pairs(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows (m, 3) of (n, 3) ``pairs`` (at most X Y^2) and their shares (m,) of the n rows."""
    rows, counts = torch.unique(pairs, dim=0, return_counts=True)
    return rows, counts.to(DTYPE) / pairs.shape[0]


def train_dpo_tabular(
    bandit: Bandit,
    beta: float,
    steps: int = 50,
    lr: float = 0.1,
    pairs: Tensor | None = None,
    polish_steps: int = 100,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Minimise the DPO loss (Eq. 7) over a tabular policy pi = softmax(logits), (X, Y).

    Logits start at log pi_ref. ``pairs=None`` uses the exact expected loss under
    Bradley-Terry labels, whose minimiser is pi* of Eq. 4; an (n, 3) LongTensor of
    ``(x, y_w, y_l)`` (see ``sample_preferences``) uses that finite sample instead (its
    minimiser may not exist: responses that always win are pushed towards probability 1).
    Optimises with ``steps`` Adam steps at learning rate ``lr`` followed by ``polish_steps``
    L-BFGS iterations (0 disables). Returns the detached policy (X, Y).
    """
    loss_fn = _dpo_objective(bandit, beta, pairs, loss_type, label_smoothing)
    logits = _adam_iterates(bandit.ref_probs.log(), loss_fn, steps, lr)[-1]
    if polish_steps > 0:
        logits = _lbfgs_polish(logits, loss_fn, polish_steps)
    return torch.softmax(logits, dim=-1)


def dpo_tabular_path(
    bandit: Bandit,
    beta: float,
    steps: int,
    lr: float = 0.1,
    pairs: Tensor | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Every policy Adam visits while minimising a DPO-family loss (Eq. 7 or a variant of
    :func:`dpo_lab.losses.dpo_loss`), as in :func:`train_dpo_tabular` without the polish.

    Returns (steps + 1, X, Y): pi_ref first, then the policy after each step, so the KL and the
    distance to pi* can be followed over training (where the loss has no finite minimiser, e.g.
    DPO on deterministic labels, they keep moving).
    """
    loss_fn = _dpo_objective(bandit, beta, pairs, loss_type, label_smoothing)
    return torch.softmax(torch.stack(_adam_iterates(bandit.ref_probs.log(), loss_fn, steps, lr)), dim=-1)


class PolicyGradientResult(NamedTuple):
    """Final policy (X, Y) and the exact (KL, reward) of every visited policy, (steps + 1,)."""

    policy: Tensor
    kls: Tensor
    rewards: Tensor


def train_policy_gradient(
    bandit: Bandit, beta: float, steps: int = 300, lr: float = 0.1
) -> PolicyGradientResult:
    """Exact policy-gradient ascent on Eq. 3 for a tabular policy pi = softmax(logits).

    The gradient of E[r] - beta KL(pi || pi_ref) is computed exactly (no sampling) by autograd
    and followed with Adam for ``steps`` steps from logits = log pi_ref. Converges to pi* of
    Eq. 4. Returns the final policy (X, Y) and the (KL, reward) trajectory including the start.
    """
    check_beta(beta)

    def loss_fn(logits: Tensor) -> Tensor:
        return -objective(bandit, torch.softmax(logits, dim=-1), beta)

    iterates = _adam_iterates(bandit.ref_probs.log(), loss_fn, steps, lr)
    policies = torch.softmax(torch.stack(iterates), dim=-1)
    return PolicyGradientResult(
        policy=policies[-1], kls=kl_to_ref(bandit, policies), rewards=expected_reward(bandit, policies)
    )
