"""Time PPO iterations: generation / scoring / log-probs / optimisation, and generated tokens per second.

    python benchmarks/ppo_iteration.py                          # tiny profile, ground-truth reward
    python benchmarks/ppo_iteration.py --profile gpt2 --device cuda --reward learned

Builds (or reuses) the profile's world (and, with ``--reward learned``, its preference pairs and
reward model), then runs ``--iterations`` PPO iterations of the profile's ``PPOSpec`` from pi_SFT
with the code of :mod:`dpo_lab.train.ppo` and prints one row per iteration. The first iteration
includes one-time warm-up costs; read the last row for the steady state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from dpo_lab import runtime
from dpo_lab.cli import parse
from dpo_lab.pipeline import Pipeline
from dpo_lab.profiles import get_profile
from dpo_lab.train.ppo import KLController, ScoreNormaliser, ppo_iteration, rollout_prompts, setup


@dataclass
class BenchmarkArgs:
    """Options of the benchmark."""

    reward: str = field(default="ground-truth", metadata={"help": "ground-truth (PPO-GT) or learned (PPO)."})
    iterations: int = field(default=2, metadata={"help": "PPO iterations to time."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})


def main(argv: list[str]) -> None:
    common, args = parse("benchmarks/ppo_iteration.py", argv, BenchmarkArgs)
    if args.reward not in ("ground-truth", "learned"):
        raise ValueError(f"--reward must be ground-truth or learned, got {args.reward!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = get_profile(common.profile)
    pipeline = Pipeline(profile, device=common.device)
    use_ground_truth = args.reward == "ground-truth"
    ppo = setup(pipeline.world, profile.ppo, use_ground_truth=use_ground_truth,
                reward_model_path=None if use_ground_truth else pipeline.reward_model, device=common.device)
    spec, sampling = profile.ppo, profile.sampling
    kl_control, normalise = KLController(spec.init_kl_coef), ScoreNormaliser()
    runtime.seed_everything(0)
    print(f"profile {profile.name}, {args.reward} reward, device {ppo.accelerator.device}, "
          f"{torch.get_num_threads()} CPU threads: {spec.rollout_size} samples of <= {sampling.max_new_tokens} "
          f"tokens, {spec.ppo_epochs} epochs of minibatches of {spec.minibatch_size}")
    print(f"{'iteration':>9} {'generation s':>12} {'scoring s':>9} {'log-probs s':>11} {'optimisation s':>14} "
          f"{'total s':>7} {'gen tokens/s':>12} {'samples/s':>9}")
    for iteration in range(1, args.iterations + 1):
        prompts = rollout_prompts(pipeline.world.train_prompts, iteration, spec.rollout_size, seed=0)
        m = ppo_iteration(ppo, prompts, normalise, kl_control, sampling.max_new_tokens, sampling.batch_size)
        total = m["time_generation"] + m["time_scoring"] + m["time_logprobs"] + m["time_optimisation"]
        print(f"{iteration:>9} {m['time_generation']:>12.2f} {m['time_scoring']:>9.2f} {m['time_logprobs']:>11.2f} "
              f"{m['time_optimisation']:>14.2f} {total:>7.2f} {m['generated_tokens_per_s']:>12.0f} "
              f"{m['samples_per_s']:>9.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
