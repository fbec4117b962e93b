"""PPO and PPO-GT (dpo_lab.train.ppo) on the ci profile.

The two PPO-GT runs of the ci sweep (a low and a high KL target) are trained once per module and
shared; the NaN test trains a short run of its own and resumes it.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from dpo_lab import cli, lm
from dpo_lab.guards import NonFiniteError
from dpo_lab.profiles import PPOSpec
from dpo_lab.sentiment import NonFiniteScoreError, Scorer
from dpo_lab.train.ppo import (
    KLController,
    PolicyWithValue,
    ScoreNormaliser,
    per_token_rewards,
    ppo_run,
    rollout_batch,
    rollout_prompts,
    train_ppo,
)
from dpo_lab.world import World


@pytest.fixture(scope="module")
def one_thread():
    """Run these tiny models on one thread: two threads on a shared, busy CPU are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gt_runs(ci_world, one_thread):
    """``{target: Run}`` for the ci sweep's two KL targets, PPO-GT with the adaptive controller."""
    targets = ci_world.profile.sweep.ppo_target_kls
    assert len(targets) == 2 and targets[0] < targets[1]
    return {t: train_ppo(ci_world, target_kl=t, use_ground_truth=True, progress=False) for t in targets}


def test_per_token_rewards_hand_example():
    # Row 0: three completion tokens; row 1: two tokens and one padding position.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -3.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = per_token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.5)
    # -0.5 * (log pi - log pi_ref) at every token, the score added at the last real token, 0 on padding.
    expected = torch.tensor([[-0.25, 0.5, 0.0 + 2.0], [0.25, -1.0 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="at least one token"):
        per_token_rewards(torch.zeros(1), logprobs[:1], ref_logprobs[:1], torch.zeros(1, 3), kl_coef=0.5)


def test_kl_controller_follows_ziegler():
    fixed = KLController(0.2)
    fixed.update(kl=100.0, n_samples=64)
    assert fixed.value == 0.2
    adaptive = KLController(0.2, target=4.0, horizon=256)
    adaptive.update(kl=6.0, n_samples=64)  # e = clip(6/4 - 1) = 0.2
    assert adaptive.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 256))
    adaptive.value = 0.2
    adaptive.update(kl=3.0, n_samples=64)  # e = -0.25, clipped to -0.2
    assert adaptive.value == pytest.approx(0.2 * (1 - 0.2 * 64 / 256))


def test_score_normaliser_freezes_first_rollout_statistics():
    normalise = ScoreNormaliser()
    first = normalise(torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(first, torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(normalise(torch.tensor([3.0])), torch.tensor([2.0]))


def test_rollout_prompts_cycle_through_every_prompt():
    prompts = [[i] for i in range(10)]
    first_pass = rollout_prompts(prompts, 1, 4, seed=0) + rollout_prompts(prompts, 2, 4, seed=0) \
        + rollout_prompts(prompts, 3, 4, seed=0)[:2]
    assert sorted(first_pass) == prompts
    assert rollout_prompts(prompts, 3, 4, seed=0) == rollout_prompts(prompts, 3, 4, seed=0)
    assert rollout_prompts(prompts, 1, 10, seed=0) != rollout_prompts(prompts, 1, 10, seed=1)


def test_rollout_layout_matches_sequence_logps(ci_world, one_thread):
    """Left-padded prompts + right-padded completions give the same log-probs as lm's right-padded batch."""
    policy, tokenizer = ci_world.load_policy("cpu")
    prompts = ci_world.test_prompts[:6]
    completions = lm.sample_completions(policy, prompts, max_new_tokens=5, eos_id=tokenizer.eos_token_id,
                                        pad_id=tokenizer.pad_token_id, seed=0)
    batch = rollout_batch(prompts, completions, tokenizer.pad_token_id)
    start = max(map(len, prompts))
    with torch.no_grad():
        logits, values = PolicyWithValue(policy)(batch["input_ids"], batch["attention_mask"], start)
        logps, mask = lm.token_logps(logits, batch["labels"][:, start - 1:])
        reference = lm.completion_batch(prompts, completions, tokenizer.pad_token_id)
        expected = lm.sequence_logps(policy, reference["input_ids"], reference["attention_mask"], reference["labels"])
    torch.testing.assert_close(logps.sum(-1), expected, atol=1e-5, rtol=1e-5)
    assert mask.sum(-1).tolist() == [len(c) for c in completions]
    assert values.shape == mask.shape and not values.any()  # the value head starts at zero


def test_ppo_gt_raises_reward_and_tracks_the_target(gt_runs):
    low, high = sorted(gt_runs)
    final = {}
    for target, run in gt_runs.items():
        table = run.evaluations()
        assert table["step"].tolist() == [0, 10, 20, 30]
        sft, last = table.iloc[0], table.iloc[-1]
        assert last["reward"] > sft["reward"], (target, table)
        assert target / 2 <= last["kl"] <= 2 * target, (target, table)
        final[target] = last
    assert final[low]["kl"] < final[high]["kl"]
    # With the larger KL budget the gain is well beyond the noise of 48 test prompts.
    sft = gt_runs[high].evaluations().iloc[0]
    assert final[high]["reward"] > sft["reward"] + 2 * sft["reward_se"]


def test_rows_and_metrics_are_complete(gt_runs):
    run = gt_runs[min(gt_runs)]
    row = run.evaluations().iloc[-1]
    assert row["method"] == "ppo-gt" and row["hyperparameter_name"] == "target_kl"
    assert row["hyperparameter"] == min(gt_runs) and row["run_id"] == run.run_id and row["wall_s"] > 0
    metrics = run.metrics()
    assert metrics["step"].tolist() == list(range(1, 31))
    for column in ("score", "kl", "kl_sample", "kl_coef", "policy_loss", "value_loss", "approx_kl", "clipfrac",
                   "explained_variance", "entropy", "samples_per_s", "time_generation", "time_scoring",
                   "time_optimisation"):
        assert metrics[column].notna().all(), column
    # The low target pushes beta up, the high target lets it fall.
    high = gt_runs[max(gt_runs)].metrics()
    assert metrics["kl_coef"].iloc[-1] > high["kl_coef"].iloc[-1]


def test_finished_run_is_not_retrained(gt_runs, capsys):
    target = max(gt_runs)
    run = gt_runs[target]
    assert run.finished and not (run.path / "checkpoint").exists()
    before = (run.path / "metrics.jsonl").read_text(), (run.path / "evaluations.csv").read_text()
    assert cli.main(["train", "ppo-gt", "--profile", "ci", "--target-kl", str(target)]) == 0
    assert run.run_id in capsys.readouterr().out
    assert ((run.path / "metrics.jsonl").read_text(), (run.path / "evaluations.csv").read_text()) == before


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_a_bad_target_kl_is_rejected_before_loading(bad, monkeypatch, capsys):
    monkeypatch.setattr(cli, "get_profile", lambda name: pytest.fail("the profile was loaded"))
    assert cli.main(["train", "ppo", "--target-kl", bad]) == 2
    assert "target_kl must be a finite number > 0" in capsys.readouterr().err


def test_every_ppo_setting_is_a_cli_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "ppo", "--help"])
    help_text = capsys.readouterr().out
    for spec_field in dataclasses.fields(PPOSpec):
        assert f"--{spec_field.name}" in help_text
    assert "Adam learning rate of policy and value head" in help_text  # the field's docstring
    assert cli.main(["train", "ppo-gt", "--profile", "ci", "--iterations", "0"]) == 2
    assert "PPOSpec.iterations must be an integer >= 1, got 0" in capsys.readouterr().err


class PoisonedScorer(Scorer):
    """The ground truth, except that one sample of the 4th rollout (``rollout_size`` texts) scores NaN."""

    def __init__(self, scorer: Scorer, rollout_size: int):
        self.scorer, self.rollout_size, self.rollouts = scorer, rollout_size, 0

    def score(self, texts):
        scores = self.scorer.score(texts)
        if len(texts) == self.rollout_size:  # a rollout, not an evaluation of the test prompts
            self.rollouts += 1
            if self.rollouts == 4:
                scores[3] = float("nan")
        return scores


class PoisonedWorld(World):
    """The ci world with a :class:`PoisonedScorer` as its ground truth."""

    def load_scorer(self, device=None):
        return PoisonedScorer(super().load_scorer(device), self.profile.ppo.rollout_size)


def test_nan_score_stops_the_run_and_it_resumes(ci_world, one_thread, monkeypatch, tmp_path):
    spec = dataclasses.replace(ci_world.profile.ppo, iterations=6, eval_every=2)
    options = {"target_kl": 4.0, "use_ground_truth": True, "reward_model_path": None, "seed": 0}
    poisoned = PoisonedWorld(**{f.name: getattr(ci_world, f.name) for f in dataclasses.fields(ci_world)})
    with pytest.raises(NonFiniteScoreError) as caught:
        train_ppo(poisoned, **options, overrides=spec, progress=False)
    _, tokenizer = ci_world.load_policy("cpu")
    prompt = tokenizer.decode(rollout_prompts(ci_world.train_prompts, 4, spec.rollout_size, seed=0)[3])
    assert "iteration 4" in str(caught.value) and "nan" in str(caught.value) and repr(prompt) in str(caught.value)

    run = ppo_run(ci_world, **options, spec=spec)
    assert not run.finished and run.latest_checkpoint()[1]["step"] == 2
    assert run.evaluations()["step"].tolist() == [0, 2]
    assert repr(prompt) in (run.path / "log.txt").read_text()

    with pytest.raises(NonFiniteError, match="delete it to retry anyway"):  # a rerun says so at once
        train_ppo(ci_world, **options, overrides=spec, progress=False)
    (run.path / "FAILED").unlink()  # the scorer is fixed: retry
    resumed = train_ppo(ci_world, **options, overrides=spec, progress=False)
    assert resumed.path == run.path and resumed.finished
    assert "resumed from the checkpoint of step 2" in (run.path / "log.txt").read_text()
    assert resumed.evaluations()["step"].tolist() == [0, 2, 4, 6]

    # Resuming reproduces an uninterrupted run exactly (same weights, optimiser, beta and random numbers).
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    fresh = train_ppo(ci_world, **options, overrides=spec, progress=False)
    assert fresh.path != run.path
    timing = ["wall_s", "samples_per_s", "generated_tokens_per_s", "run_id"]  # run_id: the key names the folder
    pd.testing.assert_frame_equal(fresh.evaluations().drop(columns=timing, errors="ignore"),
                                  resumed.evaluations().drop(columns=timing, errors="ignore"))
    metrics = [m.drop(columns=[c for c in m.columns if c.startswith("time_") or c in timing])
               for m in (fresh.metrics(), resumed.metrics())]
    pd.testing.assert_frame_equal(*metrics)


def test_ppo_logs_the_gold_score_of_its_rollouts(ci_world, gt_runs, one_thread):
    """r_phi and r* on the same rollouts, every iteration: the data of the over-optimisation plot (notebook 04)."""
    from dpo_lab.pipeline import Pipeline

    spec = dataclasses.replace(ci_world.profile.ppo, iterations=2, eval_every=2)
    run = train_ppo(ci_world, target_kl=4.0, use_ground_truth=False, reward_model_path=Pipeline(ci_world.profile)
                    .reward_model, overrides=spec, progress=False)
    metrics = run.metrics()
    assert metrics["gold_score"].between(0.0, 1.0).all() and len(metrics) == 2
    assert not metrics["gold_score"].equals(metrics["score"])  # r_phi is not on the scale of p(positive)
    assert "gold_score" not in gt_runs[min(gt_runs)].metrics()  # PPO-GT's score already is r*


def test_an_adaptive_controller_cannot_start_from_zero():
    with pytest.raises(ValueError, match="would stay 0"):
        KLController(0.0, target=4.0)
    assert KLController(0.0).value == 0.0  # a fixed coefficient of 0 is allowed: no KL penalty
