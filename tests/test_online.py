"""RLOO, GRPO and online DPO on the `ci` world: each, against the learned reward and against the ground truth,
raises the ground-truth reward over SFT."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dpo_lab.methods import get_method
from dpo_lab.pipeline import Pipeline
from dpo_lab.train.online import METHODS, train_online

pytestmark = pytest.mark.slow

ITERATIONS = 20
"""Iterations of each `ci` run (evaluated at 0 and at the end)."""


@pytest.mark.parametrize("use_ground_truth", [False, True], ids=["learned-reward", "ground-truth"])
@pytest.mark.parametrize("method, beta", [("rloo", 0.1), ("grpo", 0.05), ("online-dpo", 0.1)])
def test_online_methods_raise_the_ground_truth_reward_over_sft(ci_world, method, beta, use_ground_truth):
    spec = dataclasses.replace(ci_world.profile.online, iterations=ITERATIONS, eval_every=ITERATIONS)
    reward_model = None if use_ground_truth else Pipeline(ci_world.profile, progress=False).reward_model
    run = train_online(ci_world, method, beta=beta, use_ground_truth=use_ground_truth, reward_model_path=reward_model,
                       overrides=spec, progress=False)
    rows = run.evaluations()
    assert rows["step"].tolist() == [0, ITERATIONS]
    name = f"{method}-gt" if use_ground_truth else method
    assert (rows["method"] == name).all() and (rows["hyperparameter_name"] == "beta").all()
    sft, last = rows.iloc[0], rows.iloc[-1]
    assert last["reward"] > sft["reward"] + 2 * np.hypot(sft["reward_se"], last["reward_se"])
    metrics = run.metrics()
    assert len(metrics) == ITERATIONS and np.isfinite(metrics[["loss", "score", "kl"]].to_numpy()).all()
    assert metrics["kl"].iloc[-1] > 0  # the policy left pi_ref


def test_online_methods_are_registered_and_refuse_bad_settings(ci_world):
    for method in METHODS:
        for name in (method, f"{method}-gt"):
            assert get_method(name).spec_section == "online"
    with pytest.raises(ValueError, match="beta"):
        get_method("online-dpo").check(0.0)
    with pytest.raises(ValueError, match="unknown online method"):
        train_online(ci_world, "reinforce", beta=0.1, use_ground_truth=True)
    with pytest.raises(ValueError, match="reward_model_path"):
        train_online(ci_world, "rloo", beta=0.1, use_ground_truth=False)
