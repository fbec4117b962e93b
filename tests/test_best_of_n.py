"""Best-of-N from pi_SFT: the plug-in KL estimator on synthetic scores, and the cached pipeline on the `ci` world."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpo_lab import cli
from dpo_lab.best_of_n import best_of_n, best_of_n_kl, best_of_n_rows, check_ns, kl_bound
from dpo_lab.evaluate import evaluate_policy


def kl(scores, n: int) -> torch.Tensor:
    kept = scores[:, :n].argmax(dim=1)
    return best_of_n_kl(scores, n, kept)[0]


def test_kl_bound_values():
    assert kl_bound(1) == 0.0
    assert kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_plug_in_kl_is_zero_at_n_1_and_near_the_bound_for_continuous_scores():
    scores = torch.rand(200, 512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kl(scores, 1), torch.zeros(200, dtype=torch.float64))
    for n in (4, 16, 64):
        estimate = kl(scores, n).mean().item()
        assert estimate <= kl_bound(n) + 1e-9
        assert estimate == pytest.approx(kl_bound(n), abs=0.05)


def test_plug_in_kl_sees_ties():
    same = torch.full((3, 8), 0.7)
    torch.testing.assert_close(kl(same, 8), torch.zeros(3, dtype=torch.float64))
    # three draws share the low score (p_hat 3/4), one scores high (1/4); best of 2 puts
    # (3/4)^2 = 9/16 on the low level and 7/16 on the high one
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    expected = 9 / 16 * math.log(9 / 16 / (3 / 4)) + 7 / 16 * math.log(7 / 16 / (1 / 4))
    assert kl(scores, 2).item() == pytest.approx(expected)
    assert expected < kl_bound(2)


def test_rows_keep_the_first_best_of_the_first_n_draws():
    selector = torch.tensor([[0.1, 0.9, 0.5, 0.95], [0.8, 0.2, 0.8, 0.1]])
    truth = torch.tensor([[0.0, 1.0, 0.0, 0.5], [0.3, 0.0, 0.9, 0.0]])
    lengths = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    rows = {row["hyperparameter"]: row for row in best_of_n_rows(selector, truth, lengths, [1, 2, 4])}
    assert rows[1]["reward"] == pytest.approx(0.15) and rows[1]["length"] == pytest.approx(3.0)
    assert rows[2]["reward"] == pytest.approx(0.65)
    assert rows[4]["reward"] == pytest.approx(0.4) and rows[4]["length"] == pytest.approx(4.5)
    assert rows[4]["kl_bound"] == pytest.approx(kl_bound(4))
    with pytest.raises(ValueError, match="draws per prompt"):
        best_of_n_rows(selector, truth, lengths, [8])


def test_check_ns():
    assert check_ns((4, 1, 4)) == [1, 4]
    for bad in ((), (0,), (2.5,)):
        with pytest.raises(ValueError):
            check_ns(bad)


@pytest.fixture(scope="module")
def by_ground_truth(ci_world):
    return best_of_n(ci_world, ns=(1, 4, 16), scorer="ground-truth", progress=False)


@pytest.mark.slow
def test_best_of_1_is_the_sft_point(by_ground_truth, ci_world):
    policy, tokenizer = ci_world.load_policy("cpu")
    profile = ci_world.profile
    sft = evaluate_policy(policy, policy, tokenizer, ci_world.load_scorer("cpu"), ci_world.test_prompts,
                          max_new_tokens=profile.sampling.max_new_tokens, seed=profile.evaluation.seed,
                          batch_size=profile.evaluation.batch_size)
    first = by_ground_truth.iloc[0]
    assert first["hyperparameter"] == 1 and first["kl_bound"] == 0.0 and first["kl"] == 0.0
    assert first["reward"] == pytest.approx(sft.reward, abs=1e-6)
    assert first["length"] == pytest.approx(sft.length)


@pytest.mark.slow
def test_larger_n_selected_by_ground_truth_earns_more_reward(by_ground_truth):
    rows = by_ground_truth
    assert rows["hyperparameter"].tolist() == [1, 4, 16]
    assert (rows["method"] == "best-of-n").all() and (rows["hyperparameter_name"] == "n").all()
    assert np.all(np.diff(rows["reward"]) > 0.02)
    assert np.all(np.diff(rows["kl"]) > 0) and np.all(rows["kl"] <= rows["kl_bound"] + 1e-9)
    assert rows["kl_bound"].tolist() == pytest.approx([kl_bound(n) for n in (1, 4, 16)])


@pytest.mark.slow
def test_best_of_n_by_the_learned_reward_model(ci_world):
    from dpo_lab.preferences import build_preferences
    from dpo_lab.train.reward import train_reward_model

    model = train_reward_model(ci_world, build_preferences(ci_world, progress=False), progress=False)
    rows = best_of_n(ci_world, model, ns=(1, 4), progress=False)
    assert (rows["selector"] == "reward-model").all()
    assert np.isfinite(rows[["reward", "kl", "kl_sample", "length"]].to_numpy()).all()
    assert rows["kl"].iloc[0] == 0.0 and rows["kl"].iloc[1] > 0
    with pytest.raises(ValueError, match="reward_model_path"):
        best_of_n(ci_world, None, ns=(1, 4))


def test_a_nan_selector_stops_best_of_n_with_the_sample_named(ci_world, monkeypatch, tmp_path):
    """A reward model that returns NaN used to give rows with a NaN KL and exit code 0."""
    from dpo_lab.preferences import build_preferences
    from dpo_lab.sentiment import NonFiniteScoreError
    from dpo_lab.train.reward import RewardModel, train_reward_model

    model = train_reward_model(ci_world, build_preferences(ci_world, progress=False), progress=False)
    real_score = RewardModel.score

    def one_nan(self, prompts, completions):
        scores = real_score(self, prompts, completions)
        scores[3] = float("nan")
        return scores

    monkeypatch.setattr(RewardModel, "score", one_nan)
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))  # a fresh cache: nothing reused
    with pytest.raises(NonFiniteScoreError, match=r"best-of-N: the selector .* score nan for draw 0 of test prompt 3"):
        best_of_n(ci_world, model, ns=(1, 4), progress=False)
    assert not list((tmp_path / "ci").glob("best_of_n*"))  # no table with NaN rows was written


@pytest.mark.slow
def test_cli_prints_one_row_per_n(by_ground_truth, capsys):
    assert cli.main(["best-of-n", "--profile", "ci", "--n", "16", "4", "1", "--scorer", "ground-truth"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["n", "reward", "reward_se"]
    assert [int(line.split()[0]) for line in lines[1:]] == [1, 4, 16]
    assert float(lines[1].split()[1]) == pytest.approx(by_ground_truth["reward"].iloc[0], abs=1e-5)
