"""Does a learned reward rank completions like the ground truth? Measured within prompts.

Both rewards this project learns are defined only up to a per-prompt offset: any Bradley-Terry
reward r_phi(x, y) + f(x) has the same likelihood (Eq. 2; notebook 01, section 3), and DPO's
implicit reward beta log pi(y|x)/pi_ref(y|x) equals r*(x, y) - beta log Z(x) at the optimum
(Eq. 5). A correlation across different prompts therefore mixes in that offset and measures the
wrong thing. The right check compares completions *of the same prompt*:

- **within-prompt pairwise accuracy**: over every pair of the K completions of a prompt whose
  ground-truth scores differ, the share the reward orders the same way (a reward tie counts as
  half; ground-truth ties are left out);
- **within-prompt Spearman**: the rank correlation of reward and ground truth over the K
  completions, averaged over prompts (prompts where either is constant are left out).

:func:`cross_prompt_spearman` is kept as the contrast: one completion per prompt, correlated over
prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr
from torch import Tensor

from dpo_lab import lm, storage
from dpo_lab.sentiment import finite_score_ids

RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]
"""``reward(prompts, completions) -> (N,)``: a reward of token-id prompts and completions."""


def within_prompt_agreement(reward: Tensor | np.ndarray, gold: Tensor | np.ndarray) -> dict[str, float]:
    """Pairwise accuracy and mean Spearman of ``reward`` against ``gold`` within each prompt.

    ``reward``, ``gold``: (P, K), K >= 2 completions for each of P prompts. Returns
    ``pairwise_accuracy`` (ties in ``reward`` count half), ``pairs`` (pairs with distinct gold
    scores), ``spearman_within`` (mean over prompts with non-constant scores) and ``prompts``.
    """
    reward, gold = np.asarray(reward, dtype=float), np.asarray(gold, dtype=float)
    if reward.shape != gold.shape or reward.ndim != 2 or reward.shape[1] < 2:
        raise ValueError(f"need two (P, K) arrays with K >= 2, got {reward.shape} and {gold.shape}")
    i, j = np.triu_indices(reward.shape[1], k=1)
    gold_diff, reward_diff = gold[:, i] - gold[:, j], reward[:, i] - reward[:, j]
    counted = gold_diff != 0
    agree = np.where(reward_diff == 0, 0.5, (np.sign(reward_diff) == np.sign(gold_diff)).astype(float))
    varied = (np.ptp(reward, axis=1) > 0) & (np.ptp(gold, axis=1) > 0)
    rho = [np.corrcoef(rankdata(r), rankdata(g))[0, 1] for r, g in zip(reward[varied], gold[varied])]
    return {"pairwise_accuracy": float(agree[counted].mean()) if counted.any() else float("nan"),
            "pairs": int(counted.sum()), "spearman_within": float(np.mean(rho)) if rho else float("nan"),
            "prompts": int(varied.sum())}


def cross_prompt_spearman(reward: Tensor | np.ndarray, gold: Tensor | np.ndarray) -> float:
    """Spearman of ``reward`` and ``gold`` over all samples pooled, (N,) each: the check that mixes in per-prompt offsets."""
    return float(spearmanr(np.asarray(reward, dtype=float).ravel(), np.asarray(gold, dtype=float).ravel()).statistic)


def implicit_reward(policy, reference, beta: float, pad_id: int) -> RewardFn:
    """DPO's implicit reward beta (log pi(y|x) - log pi_ref(y|x)) (Eq. 5 without its beta log Z(x)) as a
    :data:`RewardFn`; ``policy`` and ``reference`` on the same device."""
    device = next(policy.parameters()).device

    @torch.no_grad()
    def reward(prompts, completions) -> Tensor:
        batch = {k: v.to(device) for k, v in lm.completion_batch(prompts, completions, pad_id).items()}
        logps = [lm.sequence_logps(m, batch["input_ids"], batch["attention_mask"], batch["labels"])
                 for m in (policy, reference)]
        return (beta * (logps[0] - logps[1])).float().cpu()
    return reward


def sample_and_score(world, rewards: dict[str, RewardFn], k: int = 4, seed: int = 7,
                     batch_size: int = 64) -> tuple[list[list[int]], dict[str, Tensor]]:
    """K fresh pi_SFT completions of each test prompt, scored by the ground truth and by each of ``rewards``.

    Returns ``(completions, scores)``: the P * K completions (prompt by prompt, K each: completion
    ``p * K + j`` is the j-th of prompt p) and ``{"gold": (P, K), <name>: (P, K), ...}`` for the P
    test prompts of ``world``.
    """
    policy, tokenizer = world.load_policy()
    prompts = [p for p in world.test_prompts for _ in range(k)]
    completions = lm.sample_completions(policy, prompts, max_new_tokens=world.profile.sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                        batch_size=world.profile.sampling.batch_size, seed=seed)
    scores = {"gold": finite_score_ids(world.load_scorer(), tokenizer, prompts, completions).float()}
    for name, reward in rewards.items():
        scores[name] = torch.cat([reward(prompts[s:s + batch_size], completions[s:s + batch_size])
                                  for s in range(0, len(prompts), batch_size)]).float()
    return completions, {name: values.view(-1, k) for name, values in scores.items()}


def reward_model_agreement(world, reward_model_path, k: int = 4, seed: int = 7) -> dict[str, float]:
    """r_phi against r* on K fresh pi_SFT samples of each test prompt: :func:`within_prompt_agreement`,
    plus ``cross_prompt_spearman`` over the first sample of each prompt as the contrast. Cached."""
    from dpo_lab.train.reward import load_reward_model

    profile = world.profile
    config = {"reward": storage.cache_name(reward_model_path), "policy": storage.cache_name(world.sft_dir),
              "ground_truth": world.ground_truth_key, "k": k, "seed": seed,
              "sampling": profile.sampling, "prompts": storage.fingerprint(world.test_prompts)}

    def build(folder) -> None:
        _, scores = sample_and_score(world, {"r_phi": load_reward_model(reward_model_path).score}, k=k, seed=seed)
        metrics = within_prompt_agreement(scores["r_phi"], scores["gold"])
        metrics["cross_prompt_spearman"] = cross_prompt_spearman(scores["r_phi"][:, 0], scores["gold"][:, 0])
        storage.write_json(folder / "metrics.json", {**metrics, "samples_per_prompt": k})

    return storage.read_json(storage.cached_artifact(profile.name, "reward_agreement", config, build) / "metrics.json")
