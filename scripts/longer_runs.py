"""Two checks beyond the sweep that the README reports, on a profile's world (default `tiny`):

- DPO trained four times as long (``--epochs 2`` at beta 0.05 and 0.1): is DPO simply under-trained?
- PPO at target KLs beyond the sweep's (24 and 48): do r_phi and r* part when PPO is let run further?

    python scripts/longer_runs.py [--profile tiny]

Trains the four runs (or reuses them from the cache) and writes ``data/results/<profile>/dpo_2_epochs.csv``
(each run's evaluation rows) and ``ppo_high_targets.csv`` (the same, plus the training rollouts' mean r_phi, r*
and KL at each checkpoint's iteration: ``rollout_r_phi``, ``rollout_r_star``, ``rollout_kl``).
"""

from __future__ import annotations

import argparse
import dataclasses

import pandas as pd

from dpo_lab import storage
from dpo_lab.methods import RunRequest, get_method
from dpo_lab.pipeline import Pipeline
from dpo_lab.profiles import get_profile
from dpo_lab.runs import Run
from dpo_lab.train.ppo import train_ppo

DPO_BETAS = (0.05, 0.1)
DPO_EPOCHS = 2.0
PPO_TARGETS = (24.0, 48.0)


def with_rollouts(run: Run) -> pd.DataFrame:
    """One PPO run's evaluation rows with the rollout statistics logged at each checkpoint's iteration."""
    rollouts = run.metrics()[["step", "score", "gold_score", "kl"]].rename(
        columns={"score": "rollout_r_phi", "gold_score": "rollout_r_star", "kl": "rollout_kl"})
    return run.evaluations().merge(rollouts, on="step", how="left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()
    profile = get_profile(args.profile)
    pipeline = Pipeline(profile)
    results = storage.results_dir(profile.name)
    dpo = get_method("dpo")
    longer = dataclasses.replace(profile.offline, epochs=DPO_EPOCHS)
    frames = [dpo.train(pipeline, RunRequest(beta, spec=longer)) for beta in DPO_BETAS]
    pd.concat(frames).to_csv(results / "dpo_2_epochs.csv", index=False)
    frames = [with_rollouts(train_ppo(pipeline.world, target_kl=target, use_ground_truth=False,
                                      reward_model_path=pipeline.reward_model)) for target in PPO_TARGETS]
    pd.concat(frames).to_csv(results / "ppo_high_targets.csv", index=False)
    print(f"wrote {results / 'dpo_2_epochs.csv'} and {results / 'ppo_high_targets.csv'}")


if __name__ == "__main__":
    main()
