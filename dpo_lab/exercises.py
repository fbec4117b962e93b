"""Checkers for the notebooks' implementation exercises: the learner writes a function, a checker
compares it with the package's own implementation on fixed cases and answers pass or fail.

Each ``check_*`` function takes the learner's function, prints one line and returns ``True`` when it
agrees with the reference on every case (to ``1e-6``). A function that still raises
``NotImplementedError`` gets a "not written yet" line; a wrong answer gets the first failing
case, what was expected, what came back, and a hint. The reference implementations are the ones
the rest of the package uses, so an exercise can never drift from what the notebooks compute.
Worked solutions live in ``notebooks/solutions/``, not here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from dpo_lab.analysis import pareto_frontier
from dpo_lab.bandit import Bandit, optimal_policy
from dpo_lab.bradley_terry import plackett_luce_log_likelihood
from dpo_lab.losses import dpo_loss, gae_advantages, k3_kl, rloo_advantages
from dpo_lab.preferences import pairs_from_scores

NOT_WRITTEN = "not written yet: replace `raise NotImplementedError` with your code, then run this cell again"
TOLERANCE = 1e-6


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    return np.asarray(value, dtype=float)


def _same(expected, got) -> bool:
    """Numbers or arrays equal to ``TOLERANCE``, of the same shape."""
    expected, got = _as_array(expected), _as_array(got)
    return expected.shape == got.shape and bool(np.allclose(expected, got, rtol=TOLERANCE, atol=TOLERANCE))


def run_checks(name: str, candidate: Callable, reference: Callable, cases: Sequence[tuple], hint: str,
               same: Callable[[object, object], bool] = _same) -> bool:
    """Call ``candidate(*case)`` and ``reference(*case)`` on every case; print one verdict line and return it.

    The reference answers first, and each function gets its own copy of the case, so a learner's
    function that writes into its inputs (``adv = rewards; adv[t] = ...``) can neither change the
    expected answer nor the next case. ``same(expected, got)`` decides agreement (default: same
    shape, values equal to ``TOLERANCE``).
    """
    for number, case in enumerate(cases, start=1):
        expected = reference(*copy.deepcopy(case))
        try:
            got = candidate(*copy.deepcopy(case))
        except NotImplementedError:
            print(f"{name}: {NOT_WRITTEN}")
            return False
        except Exception as error:  # the learner's code: report any failure as a hint, never crash
            print(f"✗ {name}: case {number} raised {type(error).__name__}: {error}\n  hint: {hint}")
            return False
        if not same(expected, got):
            shown = ", ".join(_short(arg) for arg in case)
            print(f"✗ {name}: case {number} ({shown})\n  expected {_short(expected)}\n  got      {_short(got)}"
                  f"\n  hint: {hint}")
            return False
    print(f"✓ {name}: correct on all {len(cases)} cases")
    return True


def _short(value) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return np.array2string(_as_array(value), precision=4, threshold=12, separator=", ")
    return repr(value)


def _scores(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_plackett_luce(candidate: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> bool:
    """Notebook 01: ``candidate(scores, ranking)``, the Plackett-Luce log-likelihood (Eq. 18) of a
    ranking (best first) of items with scores (N,); a scalar."""
    cases = [(torch.tensor([1.0, 0.0], dtype=torch.float64), [0, 1]), (_scores(1, 4), [2, 0, 3, 1]),
             (_scores(2, 6), [5, 4, 3, 2, 1, 0]), (_scores(3, 5), [1, 3])]
    return run_checks("plackett_luce", candidate, plackett_luce_log_likelihood, cases,
                      "log p = sum over positions k of s[ranking[k]] - logsumexp of the scores still unranked "
                      "at k (ranking[k:]); for two items it is log sigmoid(s_w - s_l)")


def _same_pairs(expected, got) -> bool:
    return sorted(map(tuple, got)) == sorted(expected)


def check_preference_pairs(candidate: Callable[[list[float]], list[tuple[int, int]]]) -> bool:
    """Notebook 02: ``candidate(scores)``, the ``(winner, loser)`` index pairs of K completions of one
    prompt ranked by their ground-truth scores (K,), ties dropped (Appendix C.1); any order."""
    cases = [([0.9, 0.1],), ([0.2, 0.7, 0.5, 0.9],), ([0.3, 0.3, 0.8, 0.1],), ([0.5, 0.5, 0.5],)]
    return run_checks("preference_pairs", candidate, lambda scores: pairs_from_scores(scores)[0], cases,
                      "every i < j gives one pair, the higher score first; equal scores make no pair "
                      "(K = 4 distinct scores give 6 pairs)", same=_same_pairs)


def _tabular_optimum(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    return optimal_policy(Bandit(ref_probs=ref_probs, rewards=rewards), beta)


def check_optimal_policy(candidate: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> bool:
    """Notebook 03: ``candidate(ref_probs, rewards, beta)``, Eq. 4's pi* (X, Y) for a reference policy
    (X, Y) and a reward table (X, Y)."""
    world = Bandit.random(n_prompts=3, n_responses=5, seed=4)
    cases = [(world.ref_probs, world.rewards, beta) for beta in (0.1, 1.0, 5.0)]
    cases.append((torch.full((1, 4), 0.25, dtype=torch.float64), torch.tensor([[0.0, 1.0, 2.0, 3.0]],
                                                                             dtype=torch.float64), 0.5))
    return run_checks("optimal_policy", candidate, _tabular_optimum, cases,
                      "pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), with Z(x) the sum over y of the numerator "
                      "(normalise each row; softmax(log pi_ref + r / beta, dim=-1) is the stable form)")


def _one_episode_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    mask = torch.ones_like(rewards)[None]
    return gae_advantages(rewards[None], values[None], mask, gamma=gamma, lam=lam)[0][0]


def check_gae(candidate: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]) -> bool:
    """Notebook 04: ``candidate(rewards, values, gamma, lam)``, the GAE advantages (T,) of one episode
    of T tokens with per-token rewards (T,) and values V(s_t) (T,); the value after the last token is 0."""
    rewards, values = _scores(5, 6), _scores(6, 6)
    cases = [(rewards, values, 1.0, 0.95), (rewards, values, 0.9, 0.0), (rewards, values, 1.0, 1.0),
             (_scores(7, 1), _scores(8, 1), 1.0, 0.95)]
    return run_checks("gae", candidate, _one_episode_gae, cases,
                      "go backwards: delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0), "
                      "A_t = delta_t + gamma lam A_{t+1}")


def _ipo_reference(chosen, rejected, ref_chosen, ref_rejected, beta):
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="ipo")[0]


def check_ipo_loss(candidate: Callable[..., torch.Tensor]) -> bool:
    """Notebook 05: ``candidate(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)``, the
    per-pair IPO loss (B,) of Azar et al. 2023 on summed completion log-probabilities (B,) each."""
    logps = [-10.0 - 5.0 * _scores(seed, 4).abs() for seed in range(9, 13)]
    cases = [(*logps, 0.1), (*logps, 1.0), (*(logps[0],) * 4, 0.5)]
    return run_checks("ipo_loss", candidate, _ipo_reference, cases,
                      "with h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the IPO loss is "
                      "(h - 1 / (2 beta))^2 per pair: a regression of h, not a logistic loss")


def _frontier_reference(kl: np.ndarray, reward: np.ndarray) -> list[int]:
    return pareto_frontier(pd.DataFrame({"kl": kl, "reward": reward})).index.tolist()


def _same_indices(expected, got) -> bool:
    return [int(i) for i in got] == list(expected)


def check_pareto_frontier(candidate: Callable[[np.ndarray, np.ndarray], Sequence[int]]) -> bool:
    """Notebook 06: ``candidate(kl, reward)``, the indices of the frontier points of N checkpoints
    (KL (N,), reward (N,)), sorted by KL: each kept point has a higher reward than every point of
    lower or equal KL."""
    rng = np.random.default_rng(0)
    kl = rng.uniform(0, 10, 12)
    cases = [(np.array([0.0, 1.0, 2.0]), np.array([0.5, 0.4, 0.9])), (kl, np.sqrt(kl) + rng.normal(0, 0.3, 12)),
             (np.array([1.0, 1.0, 3.0, 2.0]), np.array([0.6, 0.8, 0.7, 0.7]))]
    return run_checks("pareto_frontier", candidate, _frontier_reference, cases,
                      "sort by KL (ties: higher reward first), walk along it, keep a point only when its reward beats "
                      "the best so far", same=_same_indices)


def check_rloo_advantages(candidate: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Notebook 07: ``candidate(rewards)``, RLOO's leave-one-out advantages (P, k) of the rewards (P, k) of
    k samples of each of P prompts."""
    cases = [(torch.tensor([[1.0, 0.0]], dtype=torch.float64),), (_scores(14, 12).view(3, 4),),
             (_scores(15, 10).view(2, 5),), (torch.full((2, 3), 0.7, dtype=torch.float64),)]
    return run_checks("rloo_advantages", candidate, rloo_advantages, cases,
                      "the baseline of sample i must not contain r_i itself (only the other k - 1 samples of its "
                      "prompt); every row of advantages then sums to 0")


def check_k3_kl(candidate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Notebook 07: ``candidate(logprobs, ref_logprobs)``, GRPO's per-token KL estimate k3, elementwise, from
    the log-probabilities of the sampled tokens under pi and pi_ref (any one shape)."""
    cases = [(torch.tensor([-1.0]), torch.tensor([-1.0])), (-_scores(16, 6).abs(), -_scores(17, 6).abs()),
             (-_scores(18, 8).abs().view(2, 4), -_scores(19, 8).abs().view(2, 4))]
    return run_checks("k3_kl", candidate, k3_kl, cases,
                      "k3 is x - 1 - log x for the right ratio x of the two probabilities (which one over which?); "
                      "case 1, where pi = pi_ref, must give 0, and no case may be negative")
