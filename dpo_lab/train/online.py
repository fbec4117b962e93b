"""Online preference methods since the paper: RLOO, GRPO and online DPO, on PPO's rollout and evaluation code.

All three sample k completions of each prompt from the *current* policy every iteration, score
them with the learned reward r_phi (or the ground truth: ``-gt``), normalise the scores with
PPO's frozen first-rollout statistics (:class:`dpo_lab.train.ppo.ScoreNormaliser`), and need no
value model: the other samples of the same prompt are the baseline. One iteration:

1. **GroupRollout.** ``prompts_per_iteration`` training prompts (PPO's seeded stream,
   :func:`dpo_lab.train.ppo.rollout_prompts`), each repeated ``group_size`` (k) times, sampled at
   temperature 1; one teacher-forced pass gives log pi_old, log pi_ref and the exact per-token KL.
2. **Signal,** per method, with beta its KL knob:

   - ``rloo`` (Ahmadian et al. 2024): reward r_i = s_hat_i - beta * sum_t log(pi / pi_ref) (the
     KL in the reward, as PPO has it), leave-one-out advantages
     (:func:`dpo_lab.losses.rloo_advantages`), REINFORCE: loss -A_i log pi(y_i|x) on the first step
     of a rollout, importance-weighted and clipped at the sequence level on the steps after it
     (:func:`dpo_lab.losses.clipped_sequence_loss`);
   - ``grpo`` (Shao et al. 2024): group-normalised advantages of s_hat
     (:func:`dpo_lab.losses.group_normalised_advantages`), PPO's clipped ratio per token and
     beta times the k3 KL estimator *in the loss* (:func:`dpo_lab.losses.grpo_loss`);
   - ``online-dpo`` (Guo et al. 2024): k = 2 samples per prompt (of k/2 times as many prompts: the
     same samples per iteration), the higher-scored one chosen,
     Eq. 7 against pi_ref = pi_SFT (:func:`dpo_lab.losses.dpo_loss`); tied pairs are skipped.
3. **Optimisation.** ``epochs`` passes over shuffled minibatches of ``minibatch_size`` samples
   (pairs for online DPO), Adam, gradient-norm clipping.

Evaluation, checkpoints, resume and the finite-value guards are PPO's (:mod:`dpo_lab.runs`); the
checkpoint holds the policy, the optimiser and the normaliser's statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpo_lab import lm, processes, runtime, storage
from dpo_lab.guards import check_finite
from dpo_lab.kl import sequence_kl, token_kl_and_logps
from dpo_lab.losses import (
    clipped_sequence_loss,
    dpo_loss,
    group_normalised_advantages,
    grpo_loss,
    masked_sum,
    rloo_advantages,
)
from dpo_lab.profiles import OnlineSpec
from dpo_lab.runs import Checkpointer, Run, start_or_resume, training_run
from dpo_lab.sentiment import score_ids
from dpo_lab.train.ppo import ScoreNormaliser, checked_scores, rollout_batch, rollout_prompts
from dpo_lab.train.reward import load_reward_model

METHODS = ("rloo", "grpo", "online-dpo")
NON_FINITE_CAUSES = "a learning rate too high for the model (--lr), or a reward scorer that returns NaN or extreme values"


@dataclass
class GroupRollout:
    """k samples of each prompt: inputs (N, P + L), per-token tensors (N, L), normalised scores (N,), N = prompts x k."""

    batch: dict[str, Tensor]
    start: int
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    scores: Tensor
    stats: dict[str, float]


@torch.no_grad()
def teacher_forced(policy, reference, batch: dict[str, Tensor], start: int, chunk: int) -> dict[str, Tensor]:
    """``logprobs``, ``ref_logprobs`` of the sampled tokens, ``mask`` and the exact per-token ``kl``, (N, L) each."""
    parts: dict[str, list[Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "mask", "kl")}
    for rows in torch.arange(len(batch["input_ids"])).split(chunk):
        ids, attention, labels = (batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
        logits = lm.forward_logits(policy, ids, attention)[:, start - 1:-1]
        ref_logits = lm.forward_logits(reference, ids, attention)[:, start - 1:-1]
        targets = labels[:, start:]
        mask = targets != lm.IGNORE_INDEX
        kl, logprobs, ref_logprobs = token_kl_and_logps(logits, ref_logits, targets.masked_fill(~mask, 0))
        for key, value in (("logprobs", logprobs * mask), ("ref_logprobs", ref_logprobs * mask),
                           ("mask", mask.float()), ("kl", kl)):
            parts[key].append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


@dataclass
class OnlineSetup:
    """Everything an iteration needs, built by :func:`setup`."""

    method: str
    beta: float
    spec: OnlineSpec
    accelerator: object
    policy: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    ground_truth: object
    score: object
    score_source: str


def setup(world, method: str, beta: float, spec: OnlineSpec, reward_model_path: Path | None,
          policy_dir: Path | None, device) -> OnlineSetup:
    """Policy (from ``policy_dir``, default pi_SFT), frozen pi_ref, scorers and a fresh Adam."""
    accelerator = runtime.make_accelerator(device, world.profile.mixed_precision)
    processes.check_split(accelerator.num_processes, **{"OnlineSpec.prompts_per_iteration": spec.prompts_per_iteration,
                                                        "OnlineSpec.minibatch_size": spec.minibatch_size})
    policy, tokenizer = lm.load_causal_lm(policy_dir or world.sft_dir, accelerator.device)
    reference, _ = lm.load_causal_lm(world.sft_dir, accelerator.device)
    reference.requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=spec.lr)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.eval()  # no dropout: the first minibatch reproduces the rollout's log-probabilities
    ground_truth = world.load_scorer(accelerator.device)
    if reward_model_path is None:
        score, source = functools.partial(score_ids, ground_truth, tokenizer), f"the ground truth {world.ground_truth}"
    else:
        score, source = load_reward_model(reward_model_path, accelerator.device).score, \
            f"the reward model {reward_model_path}"
    return OnlineSetup(method, beta, spec, accelerator, policy, reference, tokenizer, optimizer, ground_truth, score,
                       source)


def collect(online: OnlineSetup, prompts: list[list[int]], normalise: ScoreNormaliser, max_new_tokens: int,
            generation_batch_size: int) -> GroupRollout:
    """Step 1: ``group_size`` samples of each prompt, scored and normalised, with their teacher-forced log-probs."""
    accelerator, tokenizer, spec = online.accelerator, online.tokenizer, online.spec
    repeated = [p for p in prompts for _ in range(spec.group_size)]
    with accelerator.autocast():
        completions = lm.sample_completions(accelerator.unwrap_model(online.policy), repeated,
                                            max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                            pad_id=tokenizer.pad_token_id, batch_size=generation_batch_size)
    scores = checked_scores(accelerator, online.score, online.score_source, tokenizer, repeated, completions)
    pooled = accelerator.gather(scores.to(accelerator.device)).cpu() if normalise.mean is None else None
    batch = {k: v.to(accelerator.device) for k, v in rollout_batch(repeated, completions,
                                                                   tokenizer.pad_token_id).items()}
    start = max(map(len, repeated))
    with accelerator.autocast():
        out = teacher_forced(online.policy, online.reference, batch, start, spec.minibatch_size)
    stats = {"score": scores.mean().item(), "kl": sequence_kl(out["kl"], out["mask"]).mean().item(),
             "length": out["mask"].sum(-1).mean().item()}
    return GroupRollout(batch, start, out["mask"], out["logprobs"], out["ref_logprobs"],
                   normalise(scores, pooled).to(out["mask"].device), stats)


def sample_losses(online: OnlineSetup, rollout: GroupRollout, rows: Tensor, logprobs: Tensor,
                  advantages: Tensor) -> Tensor:
    """The minibatch loss of RLOO or GRPO for the samples ``rows``; ``logprobs``: (b, L) under the current policy."""
    mask = rollout.mask[rows]
    if online.method == "rloo":
        return clipped_sequence_loss(masked_sum(logprobs, mask, dim=-1), masked_sum(rollout.logprobs[rows], mask, dim=-1),
                                     advantages[rows], online.spec.clip_range)
    loss, _ = grpo_loss(logprobs, rollout.logprobs[rows], rollout.ref_logprobs[rows], advantages[rows], mask,
                        online.spec.clip_range, online.beta)
    return loss


def advantages_of(online: OnlineSetup, rollout: GroupRollout) -> Tensor:
    """(N,) advantages: leave-one-out of the KL-penalised reward (RLOO), or group-normalised scores (GRPO)."""
    groups = rollout.scores.view(-1, online.spec.group_size)
    if online.method == "grpo":
        return group_normalised_advantages(groups).flatten()
    penalty = masked_sum(rollout.logprobs - rollout.ref_logprobs, rollout.mask, dim=-1).view_as(groups)
    return rloo_advantages(groups - online.beta * penalty).flatten()


def pairs_of(rollout: GroupRollout, accelerator) -> tuple[Tensor, Tensor]:
    """Online DPO's pairs: (chosen rows, rejected rows) of the two samples of each prompt, ties dropped.

    Under several processes every process keeps as many pairs as the one with the fewest, so all
    take the same number of optimiser steps.
    """
    first, second = torch.arange(0, len(rollout.scores), 2), torch.arange(1, len(rollout.scores), 2)
    a, b = rollout.scores[first].cpu(), rollout.scores[second].cpu()
    keep = a != b
    chosen = torch.where(a > b, first, second)[keep]
    rejected = torch.where(a > b, second, first)[keep]
    fewest = int(processes.min_over_processes(accelerator, float(len(chosen))))
    return chosen[:fewest], rejected[:fewest]


def current_logprobs(online: OnlineSetup, rollout: GroupRollout, rows: Tensor) -> Tensor:
    """(b, L) log-probs of the rollout's tokens ``rows`` under the current policy (with gradients)."""
    ids, attention, labels = (rollout.batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
    logits = lm.forward_logits(online.policy, ids, attention)[:, rollout.start - 1:]
    logprobs, _ = lm.token_logps(logits, labels[:, rollout.start - 1:])
    return logprobs


def minibatch_loss(online: OnlineSetup, rollout: GroupRollout, rows, advantages: Tensor | None) -> Tensor:
    """One minibatch's loss: RLOO / GRPO over samples ``rows``, or Eq. 7 over pairs ``rows`` = (chosen, rejected)."""
    if online.method != "online-dpo":
        return sample_losses(online, rollout, rows, current_logprobs(online, rollout, rows), advantages)
    chosen, rejected = rows
    logprobs = current_logprobs(online, rollout, torch.cat([chosen, rejected]))
    sums = masked_sum(logprobs, rollout.mask[torch.cat([chosen, rejected])], dim=-1)
    ref = masked_sum(rollout.ref_logprobs, rollout.mask, dim=-1)
    losses, _, _ = dpo_loss(sums[:len(chosen)], sums[len(chosen):], ref[chosen], ref[rejected], online.beta)
    return losses.mean()


def optimise(online: OnlineSetup, rollout: GroupRollout) -> dict[str, float]:
    """Step 3: ``epochs`` passes over shuffled minibatches; the mean loss and the number of optimiser steps."""
    accelerator, spec = online.accelerator, online.spec
    advantages = None if online.method == "online-dpo" else advantages_of(online, rollout)
    chosen, rejected = pairs_of(rollout, accelerator) if online.method == "online-dpo" else (None, None)
    units = len(chosen) if chosen is not None else len(rollout.scores)
    if units == 0:
        storage.log.warning("online DPO: every pair of this rollout tied (identical scores), so this iteration "
                            "takes no optimiser step (its logged loss is NaN, its pairs 0)")
    size = max(1, spec.minibatch_size // accelerator.num_processes // (2 if chosen is not None else 1))
    losses = []
    for _ in range(spec.epochs):
        for part in torch.randperm(units).split(size):
            rows = (chosen[part], rejected[part]) if chosen is not None else part.to(rollout.mask.device)
            with accelerator.autocast():
                loss = minibatch_loss(online, rollout, rows, advantages)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(online.policy.parameters(), spec.max_grad_norm)
            mean_loss = processes.mean_over_processes(accelerator, {"loss": loss.item()})["loss"]
            check_finite(loss=mean_loss, grad_norm=runtime.overflow_checked(accelerator, grad_norm))
            online.optimizer.step()
            online.optimizer.zero_grad(set_to_none=True)
            losses.append(mean_loss)
    return {"loss": sum(losses) / len(losses) if losses else math.nan, "optimiser_steps": len(losses),
            **({"pairs": float(units)} if chosen is not None else {})}


def check_method(method: str, beta: float | None) -> None:
    """Raise ``ValueError`` for an unknown method or a bad beta (>= 0; > 0 for online DPO), before any loading."""
    if method not in METHODS:
        raise ValueError(f"unknown online method {method!r}; known: {', '.join(METHODS)}")
    if beta is None or not (math.isfinite(beta) and beta >= 0) or (method == "online-dpo" and beta == 0):
        raise ValueError(f"beta must be a finite number >= 0 (> 0 for online-dpo), got {beta}")


def online_run(world, method: str, beta: float, use_ground_truth: bool, reward_model_path: Path | None, seed: int,
               spec: OnlineSpec) -> Run:
    """The :class:`~dpo_lab.runs.Run` folder of one online configuration."""
    name = f"{method}-gt" if use_ground_truth else method
    return training_run(world, name, ("beta", beta), seed, beta=beta, online=spec,
                        reward=world.ground_truth_key if use_ground_truth else storage.cache_name(reward_model_path),
                        prompts=storage.fingerprint([world.train_prompts, world.test_prompts]))


def train_online(world, method: str, *, beta: float, use_ground_truth: bool, reward_model_path: Path | None = None,
                 seed: int = 0, overrides: OnlineSpec | None = None, device=None, progress: bool = True) -> Run:
    """Train (or resume, or find finished) one RLOO, GRPO or online-DPO run and return its :class:`~dpo_lab.runs.Run`.

    ``beta``: the KL knob (RLOO: in the reward; GRPO: on the k3 term of the loss; online DPO: Eq. 7's).
    ``use_ground_truth``: score with the ground truth (``<method>-gt``) instead of r_phi at
    ``reward_model_path``. Online DPO samples 2 completions of each of ``prompts_per_iteration *
    group_size / 2`` prompts: pairs, from as many samples per iteration as RLOO and GRPO draw.
    """
    spec = overrides or world.profile.online
    check_method(method, beta)
    if method == "online-dpo":  # pairs, from as many samples per iteration as the other methods draw
        spec = dataclasses.replace(spec, group_size=2, prompts_per_iteration=spec.prompts_per_iteration * spec.group_size // 2)
    if not use_ground_truth and reward_model_path is None:
        raise ValueError(f"{method} with the learned reward needs reward_model_path (or use_ground_truth=True)")
    progress = progress and processes.is_main_process()
    run = online_run(world, method, beta, use_ground_truth, None if use_ground_truth else reward_model_path, seed, spec)
    with run.exclusive():
        if run.finished:
            return run
        resume = run.resume_point()
        online = setup(world, method, beta, spec, None if use_ground_truth else reward_model_path,
                       resume[0] if resume else None, device)
        normalise = ScoreNormaliser()
        if resume:
            online.optimizer.load_state_dict(resume[1]["optimizer"])
            normalise.mean, normalise.std = resume[1]["score_mean"], resume[1]["score_std"]
            runtime.load_scaler_state(online.accelerator, resume[1])
        done, wall_before = start_or_resume(run, resume, seed, online.accelerator.device)
        checkpoint = Checkpointer(run, world, online.reference, online.tokenizer, online.ground_truth,
                                  spec.iterations, online.accelerator)
        online_loop(online, checkpoint, normalise, range(done, spec.iterations + 1), wall_before, seed, progress)
    return run


def online_loop(online: OnlineSetup, checkpoint: Checkpointer, normalise: ScoreNormaliser, iterations: range,
                wall_before: float, seed: int, progress: bool) -> None:
    """Iterations from the last finished one: rollout, optimise, log, checkpoint (iteration 0 first); finish."""
    run, world, spec, accelerator = checkpoint.run, checkpoint.world, online.spec, online.accelerator
    policy = accelerator.unwrap_model(online.policy)
    started = time.time()

    def save(iteration: int) -> None:
        state = {"optimizer": online.optimizer.state_dict(), "score_mean": normalise.mean,
                 "score_std": normalise.std, **runtime.scaler_state(accelerator)}
        checkpoint(iteration, policy, wall_before + time.time() - started, lambda: state)

    if iterations.start == 0:
        save(0)
    bar = tqdm(range(iterations.start + 1, iterations.stop), initial=iterations.start, total=iterations.stop - 1,
               desc=f"{run.method} beta={online.beta:g}", disable=not progress)
    for iteration in bar:
        prompts = rollout_prompts(world.train_prompts, iteration, spec.prompts_per_iteration, seed)
        prompts = prompts[accelerator.process_index::accelerator.num_processes]
        with run.stopped_on_non_finite(f"iteration {iteration}", NON_FINITE_CAUSES):
            rollout = collect(online, prompts, normalise, world.profile.sampling.max_new_tokens,
                              world.profile.sampling.batch_size)
            metrics = processes.mean_over_processes(accelerator, {**rollout.stats, **optimise(online, rollout)})
            run.log_metrics(iteration, metrics)
            bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.2f}", refresh=False)
            if iteration % spec.eval_every == 0 or iteration == spec.iterations:
                save(iteration)
    run.finish(policy, online.tokenizer)
    run.log(f"finished after {wall_before + time.time() - started:.0f} s")
