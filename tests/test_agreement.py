"""Within-prompt reward agreement: exact on constructed cases, and wired to the real models on `ci`."""

import numpy as np
import pytest

from dpo_lab.agreement import (
    cross_prompt_spearman,
    implicit_reward,
    sample_and_score,
    within_prompt_agreement,
)


def test_within_prompt_agreement_is_exact_on_a_constructed_example():
    gold = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.1], [0.1, 0.2, 0.3, 0.4]])
    reward = np.array([[1.0, 2.0, 3.0, 4.0],   # perfect: 6 of 6 pairs
                       [0.0, 0.0, 0.0, 1.0],   # 5 counted pairs (one gold tie): two reward ties (1/2 each), 3 wrong
                       [4.0, 3.0, 2.0, 1.0]])  # reversed: 0 of 6
    result = within_prompt_agreement(reward, gold)
    assert result["pairs"] == 17
    assert result["pairwise_accuracy"] == pytest.approx(7 / 17)
    assert result["spearman_within"] == pytest.approx((1.0 - 3 / np.sqrt(13.5) - 1.0) / 3)
    assert result["prompts"] == 3


def test_a_per_prompt_offset_fools_the_cross_prompt_check_only():
    """A reward that ranks every prompt's completions perfectly, plus a large random offset per prompt."""
    rng = np.random.default_rng(0)
    gold = rng.uniform(size=(200, 4))
    reward = gold + rng.normal(scale=10.0, size=(200, 1))
    assert within_prompt_agreement(reward, gold)["pairwise_accuracy"] == 1.0
    assert abs(cross_prompt_spearman(reward[:, 0], gold[:, 0])) < 0.2


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="K >= 2"):
        within_prompt_agreement(np.zeros((3, 1)), np.zeros((3, 1)))


def test_the_implicit_reward_of_pi_ref_against_itself_is_all_ties(ci_world):
    policy, tokenizer = ci_world.load_policy("cpu")
    reward = implicit_reward(policy, policy, beta=0.1, pad_id=tokenizer.pad_token_id)
    completions, scores = sample_and_score(ci_world, {"implicit": reward}, k=4)
    assert len(completions) == 4 * len(ci_world.test_prompts)
    assert scores["gold"].shape == scores["implicit"].shape == (len(ci_world.test_prompts), 4)
    assert (scores["implicit"] == 0).all()
    assert within_prompt_agreement(scores["implicit"], scores["gold"])["pairwise_accuracy"] == 0.5
