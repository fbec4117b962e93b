"""Best-of-N: sample N completions from pi_SFT per test prompt, keep the one a reward scores highest.

The inference-time baseline of the frontier. For each test prompt x, draws y_1..y_M ~ pi_SFT(.|x)
with M = max N; draw j uses the evaluation protocol's sampler with seed ``evaluation.seed + j``, so
draw 0 is exactly the sample the protocol gives pi_SFT itself and N = 1 reproduces the SFT point.
Best-of-N for every N takes the first N draws (samples are reused across N) and keeps the one
the *selector* scores highest: the learned reward model r_phi (default) or the ground truth
(``scorer="ground-truth"``, an oracle). The reported reward is always the ground truth of the
kept sample.

KL(pi_N || pi_SFT), two numbers per N:

- ``kl_bound`` = log N - (N - 1) / N, the analytic value when the selector's scores are
  continuous (no ties); it is an upper bound in general (Beirami et al. 2024).
- ``kl``: a plug-in estimate. Per prompt, the M draws define an empirical distribution p_hat over
  score levels (draws with equal scores, e.g. identical completions, form one level, with
  p_hat = count / M and empirical CDF F); best-of-N from it puts mass
  pi_N(level) = F(level)^N - F(level below)^N on each level, and
  KL_hat = sum over levels of pi_N log(pi_N / p_hat) is the exact KL of best-of-N under p_hat.
  It is 0 at N = 1, converges to the true KL as M grows, and, unlike the bound, sees ties (a
  short completion that pi_SFT samples often lowers the KL). With distinct scores it sits slightly
  below the bound as N approaches M (about 0.04 nats at N = M). ``kl_se`` is its standard error
  over prompts, and ``kl_sample`` the single-sample log-ratio log(pi_N / p_hat) at the kept samples
  (mean over prompts), the analogue of the protocol's ``kl_sample``.

Rows follow the results-table layout (method ``best-of-n``, hyperparameter ``n``); ``step`` holds
N (there is no training; step 0 is reserved for the SFT point of trained runs) and ``wall_s`` the
seconds spent sampling and scoring all M draws.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from dpo_lab import lm, runtime, storage
from dpo_lab.evaluate import mean_and_se
from dpo_lab.sentiment import check_finite_scores, score_ids
from dpo_lab.train.reward import load_reward_model

SELECTORS = ("reward-model", "ground-truth")
SCORES_FILE = "scores.safetensors"
TIMING_FILE = "timing.json"
RESULTS_FILE = "results.csv"
ROWS_VERSION = 2
"""In the results' cache key: version 2 added ``selector_score``, so cached rows without it are rebuilt (from the cached draws)."""


def kl_bound(n: int) -> float:
    """The analytic KL of best-of-n from its base policy with continuous scores: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def best_of_n_kl(scores: Tensor, n: int, kept: Tensor) -> tuple[Tensor, Tensor]:
    """Plug-in KL of best-of-``n`` per prompt (see the module docstring), and its log-ratio at ``kept``.

    ``scores``: (P, M) selector scores of M draws per prompt; ``kept``: (P,) index of the kept
    draw. Returns ``(kl, log_ratio)``, both (P,).
    """
    m = scores.shape[1]
    ordered = scores.double().sort(dim=1).values

    def level(values: Tensor) -> tuple[Tensor, Tensor]:
        """For scores (P, K): empirical p_hat of their level and best-of-n mass pi_n on it, both (P, K)."""
        below = torch.searchsorted(ordered, values.contiguous(), right=False).double() / m
        upto = torch.searchsorted(ordered, values.contiguous(), right=True).double() / m
        return upto - below, upto.pow(n) - below.pow(n)

    p_hat, pi_n = level(ordered)
    # each of the M draws carries 1 / (M p_hat) of its level's mass, so the sum runs over levels
    kl = (pi_n / (m * p_hat) * torch.log(pi_n / p_hat)).sum(dim=1)
    p_kept, pi_kept = level(scores.double().gather(1, kept[:, None]))
    return kl, torch.log(pi_kept / p_kept).squeeze(1)


def best_of_n_rows(selector: Tensor, ground_truth: Tensor, lengths: Tensor, ns: Sequence[int]) -> list[dict]:
    """One results row per N from the scores of M draws per prompt, all (P, M) (M >= max N).

    For each N the kept draw of a prompt is the first argmax of ``selector`` over its first N
    draws; the row holds the mean ground truth of the kept draws, the KL numbers of the module
    docstring, the mean length of the kept draws and ``selector_score``, the mean selector score of
    the kept draws (the proxy reward, for the over-optimisation plot of notebook 04).
    """
    if max(ns) > selector.shape[1]:
        raise ValueError(f"N = {max(ns)} needs at least that many draws per prompt, got {selector.shape[1]}")
    rows = []
    for n in ns:
        kept = selector[:, :n].argmax(dim=1)
        reward, reward_se = mean_and_se(ground_truth.gather(1, kept[:, None]).squeeze(1))
        kl, log_ratio = best_of_n_kl(selector, n, kept)
        kl_mean, kl_se = mean_and_se(kl)
        rows.append({"hyperparameter": n, "reward": reward, "reward_se": reward_se, "kl": kl_mean, "kl_se": kl_se,
                     "kl_sample": log_ratio.mean().item(), "kl_bound": kl_bound(n),
                     "length": lengths.gather(1, kept[:, None]).double().mean().item(),
                     "selector_score": selector.gather(1, kept[:, None]).double().mean().item(),
                     "n_prompts": selector.shape[0]})
    return rows


def check_ns(ns: Sequence[int]) -> list[int]:
    """The distinct values of N, sorted; raises ``ValueError`` unless all are integers >= 1."""
    if not ns or any(int(n) != n or n < 1 for n in ns):
        raise ValueError(f"every N must be an integer >= 1, got {list(ns)}")
    return sorted({int(n) for n in ns})


def describe_draw(tokenizer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], draw: int,
                  i: int) -> str:
    """Which sample a non-finite score belongs to: the draw, the test prompt and the decoded text."""
    return f"draw {draw} of test prompt {i} {tokenizer.decode(list(prompts[i]) + list(completions[i]))!r}"


def draw_and_score(world, reward_model_path: Path | None, n_max: int, folder: Path, device: torch.device,
                   progress: bool) -> None:
    """Sample ``n_max`` draws per test prompt from pi_SFT, score them, save the (P, M) scores in ``folder``.

    The selector is the reward model at ``reward_model_path``, or the ground truth if it is ``None``.
    """
    started = time.time()
    profile = world.profile
    policy, tokenizer = world.load_policy(device)
    ground_truth = world.load_scorer(device)
    if reward_model_path is not None:
        reward_model = load_reward_model(reward_model_path, device)
    prompts = world.test_prompts
    columns: dict[str, list[Tensor]] = {"ground_truth": [], "selector": [], "length": []}
    for j in tqdm(range(n_max), desc="best-of-N draws", disable=not progress):
        completions = lm.sample_completions(policy, prompts, max_new_tokens=profile.sampling.max_new_tokens,
                                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                            batch_size=profile.evaluation.batch_size, seed=profile.evaluation.seed + j)
        truth = score_ids(ground_truth, tokenizer, prompts, completions).float()
        selector = truth if reward_model_path is None else reward_model.score(prompts, completions).float().cpu()
        describe = functools.partial(describe_draw, tokenizer, prompts, completions, j)
        for name, scores in (("the ground truth", truth), (f"the selector {reward_model_path}", selector)):
            check_finite_scores(scores, describe, f"best-of-N: {name}")
        columns["ground_truth"].append(truth)
        columns["selector"].append(selector)
        columns["length"].append(torch.tensor([len(c) for c in completions], dtype=torch.float32))
    save_file({k: torch.stack(v, dim=1).contiguous() for k, v in columns.items()}, folder / SCORES_FILE)
    storage.write_json(folder / TIMING_FILE, {"seconds": time.time() - started})


def best_of_n(world, reward_model_path: str | Path | None = None, ns: Sequence[int] | None = None, *,
              scorer: str = "reward-model", device: torch.device | str | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Best-of-N from pi_SFT on the test prompts, one results row per N; cached.

    ``world``: a :class:`dpo_lab.world.World`. ``reward_model_path``: a folder of
    :func:`dpo_lab.train.reward.train_reward_model`, the selector unless ``scorer="ground-truth"``
    (then it is ignored). ``ns``: the values of N (default: the profile's ``sweep.best_of_n``).
    The draws and their scores are cached in a ``best_of_n_samples-*`` folder (keyed by policy,
    selector, max N, sampling and evaluation settings, test prompts), the rows in
    ``best_of_n-*/results.csv``.
    """
    profile = world.profile
    ns = check_ns(profile.sweep.best_of_n if ns is None else ns)
    if scorer not in SELECTORS:
        raise ValueError(f"scorer must be one of {SELECTORS}, got {scorer!r}")
    if scorer == "reward-model" and reward_model_path is None:
        raise ValueError("best-of-N by the learned reward needs reward_model_path (or scorer='ground-truth')")
    model_path = Path(reward_model_path) if scorer == "reward-model" else None
    device = runtime.pick_device(device)
    samples_config = {"policy": storage.cache_name(world.sft_dir),
                      "ground_truth": world.ground_truth_key,
                      "selector": storage.cache_name(model_path) if model_path else "ground-truth",
                      "n_max": ns[-1], "sampling": profile.sampling, "evaluation": profile.evaluation,
                      "prompts": storage.fingerprint(world.test_prompts)}
    samples = storage.cached_artifact(profile.name, "best_of_n_samples", samples_config,
                                      lambda folder: draw_and_score(world, model_path, ns[-1], folder, device,
                                                                    progress))

    def write_results(folder: Path) -> None:
        scores = load_file(samples / SCORES_FILE)
        seconds = storage.read_json(samples / TIMING_FILE)["seconds"]
        rows = [{"profile": profile.name, "run_id": f"best-of-n/{samples.name}", "method": "best-of-n",
                 "hyperparameter_name": "n", "seed": 0, "step": row["hyperparameter"], **row,
                 "selector": scorer, "wall_s": seconds}
                for row in best_of_n_rows(scores["selector"], scores["ground_truth"], scores["length"], ns)]
        with storage.atomic_path(folder / RESULTS_FILE) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)

    folder = storage.cached_artifact(profile.name, "best_of_n", {"samples": samples.name, "ns": ns, "columns": ROWS_VERSION},
                                     write_results)
    return pd.read_csv(folder / RESULTS_FILE)
