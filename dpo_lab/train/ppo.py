"""PPO for language models: the paper's PPO (learned reward) and PPO-GT (ground-truth reward) baselines.

One algorithm, one file, in the spirit of CleanRL's ``ppo.py``. PPO maximises the KL-regularised
objective of the DPO paper, Eq. 3,

    max_pi  E_{x ~ D, y ~ pi(.|x)} [ r(x, y) ] - beta * D_KL[ pi(y|x) || pi_ref(y|x) ],

as an episodic RL problem in which the state is the prompt plus the tokens generated so far and
an action is one token (Ziegler et al. 2019; Stiennon et al. 2020). One *iteration*:

1. **Rollout.** ``rollout_size`` training prompts (an endless stream of seeded permutations of
   ``world.train_prompts``), one completion each from the current policy (:func:`lm.sample_completions`:
   KV cache, no gradient, temperature 1, ``top_k=0``), then one teacher-forced pass that gives
   log pi, log pi_ref and the values V(s_t) at every completion token.
2. **Reward.** A sequence score s(x, y): the learned reward model r_phi (``ppo``) or the
   ground-truth p(positive) (``ppo-gt``), normalised (:class:`ScoreNormaliser`) as
   s_hat = (s - m) / sd, where m and sd are the mean and standard deviation of the scores of the
   *first* rollout (``rollout_size`` samples of pi_SFT), then frozen, so that beta means the same
   thing for every reward and profile (the paper says "normalised rewards" without saying how).
   Frozen rather than per-batch statistics keep the reward fixed, so PPO optimises Eq. 3 exactly
   (for the raw score with coefficient beta * sd), and the push towards higher score fades as the
   score saturates instead of being re-amplified by every batch's shrinking spread. The per-token
   reward (:func:`per_token_rewards`) is r_t = -beta (log pi(y_t|.) - log pi_ref(y_t|.)) at every
   completion token, plus s_hat at the last one; its sum over the episode is a single-sample
   estimate of the Eq. 3 objective.
3. **Advantages.** GAE with gamma = 1 and lambda = 0.95 (:func:`dpo_lab.losses.gae_advantages`,
   a reversed loop over t), whitened over the rollout's tokens.
4. **Optimisation.** ``ppo_epochs`` passes of shuffled minibatches: the clipped surrogate
   (Schulman et al. 2017, Eq. 7; :func:`dpo_lab.losses.ppo_policy_loss`) plus ``vf_coef`` times
   the clipped value loss (:func:`dpo_lab.losses.ppo_value_loss`), Adam, gradient-norm clipping.
   Dropout is off: the policy stays in eval mode (gradients flow all the same), so the first
   minibatch reproduces the rollout's log-probabilities exactly (ratio 1).
5. **KL control** (:class:`KLController`): beta is fixed, or follows the adaptive controller of
   Ziegler et al. (2019, Section 2.2) towards a target sequence KL.

**Several processes** (``accelerate launch``, DDP). Each of P processes rolls out every P-th
prompt of the iteration and optimises minibatches of ``minibatch_size / P`` of its own samples,
so the global rollout and minibatch are the profile's; gradients are averaged by DDP. What every
process must agree on is computed from all of them: the score normaliser's statistics (gathered
first-rollout scores), the logged metrics and the measured KL (averaged), so the KL controller's
beta is the same on every process (``kl_coef_spread``, logged under several processes, is its
max - min: 0). Advantages are whitened per process. The main process evaluates, logs and saves.

**Value head: shared trunk.** V(s_t) is a linear head (zero-initialised, so V = 0 at the start,
the best constant guess for whitened scores) on the policy's last hidden state, as in Ziegler
et al.'s code and TRL's former PPO trainer. Why not a separate value model: one forward pass
gives log-probabilities and values (half the compute and memory of a second LM, which matters for
``gpt2-large``), and the checkpoint stays one ``save_pretrained`` policy plus a head of
``n_embd + 1`` numbers in the trainer state. The cost: the value loss also moves the policy's
trunk, which ``vf_coef`` and the value clip keep small.

**KL measurements.** The penalty inside the reward uses the sampled log-ratio (k1), whose
expectation is the KL and whose gradient is that of Eq. 3. The controller and the logs use the
*exact* sequence KL, sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) over the full vocabulary at the
sampled contexts (:func:`dpo_lab.kl.token_kl_and_logps`): the same quantity as the evaluation
protocol, with far less variance. The single-sample value is logged beside it as ``kl_sample``.

Checkpoints: at iteration 0 (the SFT point), every ``eval_every`` iterations and at the end, the
policy is evaluated with :func:`dpo_lab.evaluate.evaluate_policy` against the ground truth (for
``ppo`` as well), the row recorded, then the checkpoint saved (:class:`dpo_lab.runs.Run`): policy
weights, and in the trainer state the value head, the optimiser, beta and the RNG state, so an
interrupted run resumes exactly where its last checkpoint left it. A score that is NaN or
infinite stops the run with :class:`NonFiniteScoreError`, naming the prompt, and so does a
non-finite loss or gradient norm (:mod:`dpo_lab.guards`); the last good checkpoint is kept.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpo_lab import lm, processes, runtime, storage
from dpo_lab.guards import check_finite
from dpo_lab.kl import sequence_kl, token_kl_and_logps
from dpo_lab.losses import (
    gae_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from dpo_lab.profiles import PPOSpec
from dpo_lab.runs import Checkpointer, Run, start_or_resume, training_run
from dpo_lab.sentiment import NonFiniteScoreError, check_finite_scores, score_ids
from dpo_lab.train.reward import load_reward_model

ScoreFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]
"""``score(prompts, completions) -> (N,)`` sequence scores of token-id prompts and completions."""


@dataclass
class ScoreNormaliser:
    """s_hat = (s - mean) / std, with mean and std taken from the first rollout (pi_SFT's samples), then frozen.

    So PPO optimises Eq. 3 for the fixed reward s_hat, i.e. for the raw score with coefficient
    beta * std, as Ziegler et al. (2019) normalise their reward model on samples of the initial policy.
    """

    mean: float | None = None
    """Mean raw score of the first rollout (``None`` until then)."""
    std: float | None = None
    """Standard deviation (unbiased) of the raw scores of the first rollout."""

    def __call__(self, scores: Tensor, first_rollout: Tensor | None = None) -> Tensor:
        """Normalise ``scores`` (N,), fixing the statistics on the first call from ``first_rollout``
        (every process's scores of the first rollout, so all processes share them; default: ``scores``)."""
        if self.mean is None:
            pooled = scores if first_rollout is None else first_rollout
            self.mean, self.std = pooled.mean().item(), pooled.std().item()
        return (scores - self.mean) / (self.std + 1e-8)


@dataclass
class KLController:
    """The coefficient beta of the per-token KL penalty: fixed, or adaptive.

    With a ``target``, the controller of Ziegler et al. (2019, Section 2.2) after each rollout of
    ``n`` samples with mean sequence KL ``kl``: e = clip(kl / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n / horizon). Too much KL raises beta, too little lowers it, by at most
    a factor (1 + 0.2 n / horizon) per rollout.
    """

    value: float
    """The current beta."""
    target: float | None = None
    """Target sequence KL (nats); ``None`` keeps beta fixed."""
    horizon: int = 10000
    """In samples: a persistent error e moves log beta by about e every ``horizon`` samples."""

    def __post_init__(self):
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"the KL coefficient must be a finite number >= 0, got {self.value}")
        if self.target is not None and not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target_kl must be a finite number > 0 (or omitted for a fixed coefficient), "
                             f"got {self.target}")
        if self.target is not None and self.value == 0:
            raise ValueError("the adaptive KL controller multiplies its coefficient, so an initial coefficient "
                             "of 0 (init_kl_coef) would stay 0: give it a value > 0, or omit target_kl")

    def update(self, kl: float, n_samples: int) -> None:
        """Adapt beta to the KL ``kl`` measured on a rollout of ``n_samples`` samples (no-op when fixed)."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


class PolicyWithValue(nn.Module):
    """The policy pi_theta and a scalar value head V on its last hidden state (shared trunk)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Logits and values over the completion window of a :func:`rollout_batch`.

        ``input_ids``, ``attention_mask``: (B, P + L) with the completion starting at column
        ``start`` = P. Returns ``logits`` (B, L + 1, V) from position P - 1 on (the input of
        :func:`lm.token_logps` with ``labels[:, P - 1:]``) and ``values`` (B, L) float32, where
        ``values[:, t]`` = V(prompt, y_<t) is read where completion token t is predicted.
        """
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=lm.position_ids(attention_mask), output_hidden_states=True, use_cache=False)
        values = self.value_head(out.hidden_states[-1][:, start - 1:-1]).squeeze(-1)
        return out.logits[:, start - 1:], values.float()


def rollout_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  pad_id: int) -> dict[str, Tensor]:
    """Left-padded prompts followed by right-padded completions, so every completion starts at column P.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (B, P + L), with ``labels`` -100 on
    prompt and padding, so ``token_logps`` of the window from column P - 1 is a right-padded
    (B, L) completion tensor (the layout :func:`gae_advantages` expects).
    """
    prompt_ids = lm.pad(prompts, pad_id, side="left")
    completion_ids = lm.pad(completions, pad_id, side="right")
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": torch.cat([lm.pad([[1] * len(p) for p in prompts], 0, side="left"),
                                     lm.pad([[1] * len(c) for c in completions], 0, side="right")], dim=1),
        "labels": torch.cat([torch.full_like(prompt_ids, lm.IGNORE_INDEX),
                             lm.pad(completions, lm.IGNORE_INDEX, side="right")], dim=1),
    }


def per_token_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                      kl_coef: float) -> Tensor:
    """Per-token rewards of the KL-regularised objective (Eq. 3; Ziegler et al. 2019, Eq. 2).

    ``scores`` (B,): (normalised) sequence scores; ``logprobs``, ``ref_logprobs``, ``mask``: (B, L),
    right-padded completion tokens. Returns (B, L): r_t = -kl_coef (log pi - log pi_ref) at every
    completion token, the score added at the last completion token, 0 on padding.
    """
    lengths = mask.sum(-1).long()
    if bool((lengths == 0).any()):
        raise ValueError("every completion needs at least one token to carry its score")
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    rewards[torch.arange(len(scores)), lengths - 1] += scores.to(rewards.dtype)
    return rewards


def rollout_prompts(prompts: Sequence[Sequence[int]], iteration: int, size: int, seed: int) -> list[list[int]]:
    """The prompts of ``iteration`` (1, 2, ...): the next ``size`` of an endless stream of permutations.

    Pass e over the prompts is ``randperm`` seeded with ``(seed, e)``, so the stream is a pure
    function of its arguments and a resumed run sees the same prompts.
    """
    n = len(prompts)
    first = (iteration - 1) * size
    passes = range(first // n, (first + size - 1) // n + 1)
    stream = [i for e in passes
              for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)).tolist()]
    offset = first - passes[0] * n
    return [list(prompts[i]) for i in stream[offset:offset + size]]


@dataclass
class Rollout:
    """One rollout batch: inputs (N, P + L), per-token tensors (N, L), per-sample scores (N,)."""

    batch: dict[str, Tensor]
    """``input_ids``, ``attention_mask``, ``labels`` of :func:`rollout_batch`, on the training device."""
    start: int
    """Column P where the completions start."""
    mask: Tensor
    """1 on completion tokens (EOS included), 0 on padding."""
    logprobs: Tensor
    """log pi_old(y_t | x, y_<t) of the sampling policy."""
    values: Tensor
    """V_old(x, y_<t)."""
    advantages: Tensor
    """Whitened GAE advantages."""
    returns: Tensor
    """GAE returns (advantages before whitening + values): the value targets."""
    stats: dict[str, float] = field(default_factory=dict)
    """Diagnostics of the rollout (score, KL, entropy, timings...)."""


@torch.no_grad()
def teacher_forced(model: PolicyWithValue, reference: nn.Module, batch: dict[str, Tensor], start: int,
                   chunk: int) -> dict[str, Tensor]:
    """The rollout's per-token quantities, (N, L) each, computed ``chunk`` rows at a time.

    ``logprobs``/``ref_logprobs`` of the sampled tokens, ``values``, ``mask``, the exact per-token
    ``kl`` KL(pi || pi_ref) over the vocabulary and the policy's ``entropy``.
    """
    parts: dict[str, list[Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "values", "mask", "kl",
                                                      "entropy")}
    for rows in torch.arange(len(batch["input_ids"])).split(chunk):
        ids, attention, labels = (batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
        logits, values = model(ids, attention, start)
        ref_logits = lm.forward_logits(reference, ids, attention)[:, start - 1:]
        targets = labels[:, start:]  # the tokens that logits[:, :-1] predict
        mask = targets != lm.IGNORE_INDEX
        kl, logprobs, ref_logprobs = token_kl_and_logps(logits[:, :-1], ref_logits[:, :-1],
                                                        targets.masked_fill(~mask, 0))
        log_p = F.log_softmax(logits[:, :-1].float(), dim=-1)
        for key, value in (("logprobs", logprobs * mask), ("ref_logprobs", ref_logprobs * mask), ("values", values),
                           ("mask", mask.float()), ("kl", kl), ("entropy", -(log_p.exp() * log_p).sum(-1))):
            parts[key].append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


def checked_scores(accelerator: Accelerator, score: ScoreFn, source: str, tokenizer,
                   prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> Tensor:
    """``score(prompts, completions)`` as float32 (N,) on the CPU, every one finite on every process.

    A NaN or infinite score raises :class:`NonFiniteScoreError` naming the sample (``source`` names
    the scorer); under several processes every process raises at the same iteration.
    """
    scores = score(prompts, completions).float().cpu()
    finite = processes.mean_over_processes(accelerator, {"finite": float(torch.isfinite(scores).all())})["finite"]
    check_finite_scores(scores, lambda i: f"prompt {tokenizer.decode(prompts[i])!r} with completion "
                                          f"{tokenizer.decode(completions[i])!r}", source)
    if finite < 1.0:
        raise NonFiniteScoreError(f"{source}: a non-finite score on another process of this launch")
    return scores


def collect_rollout(ppo: PPOSetup, prompts: list[list[int]], normalise: ScoreNormaliser, kl_coef: float,
                    max_new_tokens: int, generation_batch_size: int) -> Rollout:
    """Steps 1-3 of the module docstring for one batch of ``prompts``: sample, score, reward, GAE.

    With a learned reward, the rollouts are also scored by the ground truth (``gold_score`` in the
    stats; it does not enter training): r_phi and r* on the same samples, for over-optimisation.
    """
    model, reference, tokenizer, spec, accelerator = ppo.model, ppo.reference, ppo.tokenizer, ppo.spec, ppo.accelerator
    policy = accelerator.unwrap_model(model).policy
    timer = time.perf_counter()
    with accelerator.autocast():
        completions = lm.sample_completions(policy, prompts, max_new_tokens=max_new_tokens,
                                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                            batch_size=generation_batch_size)
    time_generation = time.perf_counter() - timer
    scores = checked_scores(accelerator, ppo.score, ppo.score_source, tokenizer, prompts, completions)
    time_scoring = time.perf_counter() - timer - time_generation
    gold = {} if ppo.uses_ground_truth else {"gold_score": score_ids(ppo.ground_truth, tokenizer, prompts,
                                                                     completions).float().mean().item()}

    pooled = accelerator.gather(scores.to(accelerator.device)).cpu() if normalise.mean is None else None
    batch = rollout_batch(prompts, completions, tokenizer.pad_token_id)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    start = max(map(len, prompts))
    with accelerator.autocast():
        out = teacher_forced(model, reference, batch, start, spec.minibatch_size)
    mask = out["mask"]
    rewards = per_token_rewards(normalise(scores, pooled).to(mask.device), out["logprobs"], out["ref_logprobs"], mask,
                                kl_coef)
    advantages, returns = gae_advantages(rewards, out["values"], mask, gamma=spec.gamma, lam=spec.lam)
    residual_var = masked_var(returns - out["values"], mask)
    time_logprobs = time.perf_counter() - timer - time_generation - time_scoring

    lengths = mask.sum(-1)
    stats = {
        "score": scores.mean().item(),
        "score_std": scores.std().item(),
        **gold,
        "kl": sequence_kl(out["kl"], mask).mean().item(),
        "kl_sample": sequence_kl(out["logprobs"] - out["ref_logprobs"], mask).mean().item(),
        "kl_coef": kl_coef,
        "entropy": masked_mean(out["entropy"], mask).item(),
        "length": lengths.mean().item(),
        "explained_variance": (1.0 - residual_var / masked_var(returns, mask)).item(),
        "time_generation": time_generation,
        "time_scoring": time_scoring,
        "time_logprobs": time_logprobs,
        "generated_tokens_per_s": lengths.sum().item() / time_generation,
    }
    return Rollout(batch=batch, start=start, mask=mask, logprobs=out["logprobs"], values=out["values"],
                   advantages=masked_whiten(advantages, mask), returns=returns, stats=stats)


def optimise(model: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout, spec: PPOSpec,
             accelerator: Accelerator) -> dict[str, float]:
    """Step 4: ``ppo_epochs`` passes of shuffled minibatches of the clipped policy and value losses.

    Returns the means over minibatches of ``policy_loss``, ``value_loss``, ``approx_kl`` (k3 of
    KL(old || new)), ``clipfrac`` and ``value_clipfrac``, and ``time_optimisation``.
    """
    timer = time.perf_counter()
    history: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac",
                                                       "value_clipfrac")}
    n = len(rollout.mask)
    for _ in range(spec.ppo_epochs):
        for rows in torch.randperm(n).split(spec.minibatch_size // accelerator.num_processes):
            rows = rows.to(rollout.mask.device)
            ids, attention, labels = (rollout.batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
            mask = rollout.mask[rows]
            with accelerator.autocast():
                logits, values = model(ids, attention, rollout.start)
                logprobs, _ = lm.token_logps(logits, labels[:, rollout.start - 1:])
                policy_loss, policy_stats = ppo_policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows],
                                                            mask, spec.clip_range)
                value_loss, value_stats = ppo_value_loss(values, rollout.values[rows], rollout.returns[rows], mask,
                                                         spec.clip_range_value)
            accelerator.backward(policy_loss + spec.vf_coef * value_loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
            losses = processes.mean_over_processes(accelerator, {"policy_loss": policy_loss.item(),
                                                                 "value_loss": value_loss.item()})
            check_finite(**losses, grad_norm=runtime.overflow_checked(accelerator, grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                               ("approx_kl", policy_stats["approx_kl"]), ("clipfrac", policy_stats["clipfrac"]),
                               ("value_clipfrac", value_stats["clipfrac"])):
                history[key].append(value.item())
    stats = {k: sum(v) / len(v) for k, v in history.items()}
    stats["time_optimisation"] = time.perf_counter() - timer
    return stats


def ppo_iteration(ppo: PPOSetup, prompts: list[list[int]], normalise: ScoreNormaliser, kl_control: KLController,
                  max_new_tokens: int, generation_batch_size: int) -> dict[str, float]:
    """One PPO iteration (rollout, optimisation, KL control); returns its logged metrics."""
    accelerator = ppo.accelerator
    rollout = collect_rollout(ppo, prompts, normalise, kl_control.value, max_new_tokens, generation_batch_size)
    metrics = {**rollout.stats, **optimise(ppo.model, ppo.optimizer, rollout, ppo.spec, accelerator)}
    metrics = processes.mean_over_processes(accelerator, metrics)  # every process: the same KL, the same beta
    samples = len(prompts) * accelerator.num_processes
    kl_control.update(metrics["kl"], samples)
    seconds = sum(v for k, v in metrics.items() if k.startswith("time_"))
    if accelerator.num_processes > 1:
        metrics["kl_coef_spread"] = processes.spread_over_processes(accelerator, kl_control.value)
    return {**metrics, "samples_per_s": samples / seconds}


@dataclass
class PPOSetup:
    """Everything an iteration needs, built by :func:`setup`."""

    accelerator: Accelerator
    model: PolicyWithValue
    """The trained policy with its value head (prepared by the accelerator)."""
    reference: nn.Module
    """pi_ref = pi_SFT, frozen, in fp32 (as for every method: one reference for all evaluations)."""
    tokenizer: object
    optimizer: torch.optim.Optimizer
    ground_truth: object
    """The ground-truth :class:`~dpo_lab.sentiment.Scorer`: every evaluation, and PPO-GT's reward."""
    score: ScoreFn
    """The training reward: ground truth (PPO-GT) or the learned reward model (PPO)."""
    score_source: str
    """Names the training reward in error messages."""
    spec: PPOSpec
    """The run's PPO settings."""
    uses_ground_truth: bool
    """PPO-GT: ``score`` is the ground truth itself."""


def setup(world, spec: PPOSpec, *, use_ground_truth: bool, reward_model_path: Path | None,
          policy_dir: Path | None = None, device=None) -> PPOSetup:
    """Load policy (from ``policy_dir``, default pi_SFT), reference, scorers and a fresh Adam.

    Raises ``ValueError`` unless the rollout and the minibatch split evenly over the processes.
    """
    accelerator = runtime.make_accelerator(device, world.profile.mixed_precision)
    processes.check_split(accelerator.num_processes, **{"PPOSpec.rollout_size": spec.rollout_size,
                                                        "PPOSpec.minibatch_size": spec.minibatch_size})
    policy, tokenizer = lm.load_causal_lm(policy_dir or world.sft_dir, accelerator.device)
    reference, _ = lm.load_causal_lm(world.sft_dir, accelerator.device)  # fp32, like every other method's
    reference.requires_grad_(False)
    model = PolicyWithValue(policy).to(accelerator.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    ground_truth = world.load_scorer(accelerator.device)
    if use_ground_truth:
        score, source = functools.partial(score_ids, ground_truth, tokenizer), f"the ground truth {world.ground_truth}"
    else:
        score, source = load_reward_model(reward_model_path, accelerator.device).score, \
            f"the reward model {reward_model_path}"
    return PPOSetup(accelerator, model, reference, tokenizer, optimizer, ground_truth, score, source, spec,
                    use_ground_truth)


NON_FINITE_CAUSES = ("a learning rate too high for the model (--lr), or a reward scorer that returns NaN or "
                     "extreme values")


def ppo_run(world, *, target_kl: float | None, use_ground_truth: bool, reward_model_path: Path | None, seed: int,
            spec: PPOSpec) -> Run:
    """The :class:`~dpo_lab.runs.Run` folder of one PPO configuration (the same configuration, the same folder)."""
    method = "ppo-gt" if use_ground_truth else "ppo"
    name, value = ("kl_coef", spec.init_kl_coef) if target_kl is None else ("target_kl", target_kl)
    return training_run(world, method, (name, value), seed, hyperparameter_name=name, hyperparameter=value, ppo=spec,
                        reward=world.ground_truth_key if use_ground_truth else storage.cache_name(reward_model_path),
                        prompts=storage.fingerprint([world.train_prompts, world.test_prompts]))


def train_ppo(world, *, target_kl: float | None, use_ground_truth: bool, reward_model_path: Path | None = None,
              seed: int = 0, overrides: PPOSpec | None = None, device=None, progress: bool = True) -> Run:
    """Train (or resume, or find finished) one PPO run and return its :class:`~dpo_lab.runs.Run`.

    ``world``: a :class:`dpo_lab.world.World`. ``target_kl``: target sequence KL of the adaptive
    controller, or ``None`` for the fixed coefficient ``init_kl_coef``. ``use_ground_truth``:
    PPO-GT (reward = ground truth) rather than PPO (reward = the model at ``reward_model_path``).
    ``overrides`` replaces the profile's ``PPOSpec``. Raises :class:`NonFiniteScoreError` if a
    score is NaN or infinite (the last good checkpoint stays in the run folder).
    """
    spec = overrides or world.profile.ppo
    progress = progress and processes.is_main_process()
    kl_control = KLController(spec.init_kl_coef, target_kl, spec.adaptive_kl_horizon)
    if not use_ground_truth and reward_model_path is None:
        raise ValueError("PPO with the learned reward needs reward_model_path (or use_ground_truth=True)")
    run = ppo_run(world, target_kl=target_kl, use_ground_truth=use_ground_truth,
                  reward_model_path=reward_model_path, seed=seed, spec=spec)
    with run.exclusive():
        if run.finished:
            return run
        resume = run.resume_point()
        ppo = setup(world, spec, use_ground_truth=use_ground_truth, reward_model_path=reward_model_path,
                    policy_dir=resume[0] if resume else None, device=device)
        normalise = ScoreNormaliser()
        if resume:
            ppo.accelerator.unwrap_model(ppo.model).value_head.load_state_dict(resume[1]["value_head"])
            ppo.optimizer.load_state_dict(resume[1]["optimizer"])
            kl_control.value = resume[1]["kl_coef"]
            normalise.mean, normalise.std = resume[1]["score_mean"], resume[1]["score_std"]
            runtime.load_scaler_state(ppo.accelerator, resume[1])
        done, wall_before = start_or_resume(run, resume, seed, ppo.accelerator.device)
        checkpoint = Checkpointer(run, world, ppo.reference, ppo.tokenizer, ppo.ground_truth, spec.iterations,
                                  ppo.accelerator)
        ppo_loop(ppo, checkpoint, kl_control, normalise, range(done, spec.iterations + 1), wall_before, seed, progress)
    return run


def ppo_loop(ppo: PPOSetup, checkpoint: Checkpointer, kl_control: KLController, normalise: ScoreNormaliser,
             iterations: range, wall_before: float, seed: int, progress: bool) -> None:
    """Iterations ``iterations`` (from the last finished one): PPO, log, checkpoint (iteration 0 first); finish."""
    run, world, spec = checkpoint.run, checkpoint.world, ppo.spec
    model = ppo.accelerator.unwrap_model(ppo.model)
    started = time.time()

    def save(iteration: int) -> None:
        state = {"value_head": model.value_head.state_dict(), "optimizer": ppo.optimizer.state_dict(),
                 "kl_coef": kl_control.value, "score_mean": normalise.mean, "score_std": normalise.std,
                 **runtime.scaler_state(ppo.accelerator)}
        checkpoint(iteration, model.policy, wall_before + time.time() - started, lambda: state)

    if iterations.start == 0:
        save(0)
    name, value = run.columns["hyperparameter_name"], run.columns["hyperparameter"]
    bar = tqdm(range(iterations.start + 1, iterations.stop), initial=iterations.start, total=iterations.stop - 1,
               desc=f"{run.method} {name}={value:g}", disable=not progress)
    accelerator = ppo.accelerator
    for iteration in bar:
        prompts = rollout_prompts(world.train_prompts, iteration, spec.rollout_size, seed)
        prompts = prompts[accelerator.process_index::accelerator.num_processes]  # one process: all of them
        with run.stopped_on_non_finite(f"iteration {iteration}", NON_FINITE_CAUSES):
            metrics = ppo_iteration(ppo, prompts, normalise, kl_control, world.profile.sampling.max_new_tokens,
                                    world.profile.sampling.batch_size)
            run.log_metrics(iteration, metrics)
            bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.2f}",
                            kl_coef=f"{metrics['kl_coef']:.3g}", refresh=False)
            if iteration % spec.eval_every == 0 or iteration == spec.iterations:
                save(iteration)
    run.finish(model.policy, ppo.tokenizer)
    run.log(f"finished after {wall_before + time.time() - started:.0f} s")
