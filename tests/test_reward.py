"""The reward model r_phi: split by prompt, reading the last real token, training, centring, caching (ci)."""

from __future__ import annotations

import time

import pytest
import torch

from dpo_lab import lm, storage
from dpo_lab.preferences import build_preferences, load_preferences
from dpo_lab.train import reward


@pytest.fixture(scope="module")
def ci_pairs(ci_world):
    """The ci preference folder (shared with test_preferences through the cache)."""
    return build_preferences(ci_world, progress=False)


@pytest.fixture(scope="module")
def ci_reward(ci_world, ci_pairs):
    """The ci reward model folder, trained once."""
    return reward.train_reward_model(ci_world, ci_pairs, progress=False)


def test_split_by_prompt_keeps_every_prompt_on_one_side():
    prompt_ids = [p for p in range(40) for _ in range(6)]
    train, val = reward.split_by_prompt(prompt_ids, 0.1, seed=0)
    assert sorted(train + val) == list(range(len(prompt_ids)))
    val_prompts = {prompt_ids[i] for i in val}
    assert len(val_prompts) == 4
    assert val_prompts.isdisjoint(prompt_ids[i] for i in train)
    assert reward.split_by_prompt(prompt_ids, 0.1, seed=0) == (train, val)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        reward.split_by_prompt([3, 3, 3], 0.5, seed=0)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(ci_world):
    model, _ = reward.init_reward_model(ci_world, ci_world.profile.reward)
    eos = model.pad_id
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[10, 11, eos], [12, 13, 14, 15, 16, 17, 18]]
    alone = torch.cat([model.raw_rewards([p], [c]) for p, c in zip(prompts, completions)])
    together = model.raw_rewards(prompts, completions)
    left = lm.completion_batch(prompts, completions, pad_id=eos, side="left")
    with torch.no_grad():
        left_padded = model(left["input_ids"], left["attention_mask"])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left_padded, alone, atol=1e-5, rtol=1e-5)
    assert reward.last_token_index(torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])).tolist() == [2, 3]


def test_reward_model_beats_chance_on_held_out_prompts(ci_reward, ci_pairs):
    metrics = storage.read_json(ci_reward / reward.METRICS)
    assert metrics["val_accuracy"] > 0.55
    assert metrics["train_accuracy"] > 0.55
    assert metrics["val_accuracy"] == max(h["val_accuracy"] for h in metrics["history"])
    assert metrics["heldout_samples"] > 0 and -1.0 <= metrics["heldout_spearman"] <= 1.0
    assert metrics["train_pairs"] + metrics["val_pairs"] == len(load_preferences(ci_pairs))
    assert not list(ci_reward.rglob("*.bin")) and not list(ci_reward.rglob("*.pt"))


def test_loaded_reward_model_scores_centred_rewards(ci_reward, ci_pairs):
    model = reward.load_reward_model(ci_reward, "cpu")
    assert model.offset == storage.read_json(ci_reward / reward.METRICS)["offset"]
    prompts, completions = reward.sft_samples(load_preferences(ci_pairs))
    scores = model.score(prompts, completions, batch_size=97)
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    assert abs(scores.mean().item()) < 1e-4
    with pytest.raises(FileNotFoundError, match="not a reward model folder"):
        reward.load_reward_model(ci_pairs)


def test_rerun_reuses_the_cache(ci_world, ci_pairs, ci_reward, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the reward model was retrained")

    monkeypatch.setattr(reward, "_train", no_rebuild)
    started = time.time()
    assert reward.train_reward_model(ci_world, ci_pairs, progress=False) == ci_reward
    assert time.time() - started < 1.0


def test_cli_reports_within_prompt_agreement_with_the_cross_prompt_contrast(ci_reward, capsys):
    from dpo_lab import cli
    from dpo_lab.agreement import reward_model_agreement
    from dpo_lab.pipeline import Pipeline
    from dpo_lab.profiles import get_profile

    assert cli.main(["reward", "--profile", "ci"]) == 0
    out = capsys.readouterr().out
    assert "within prompts (4 fresh SFT samples of each test prompt): pairwise accuracy" in out
    assert "across prompts" in out
    agreement = reward_model_agreement(Pipeline(get_profile("ci")).world, ci_reward)
    assert f"pairwise accuracy {agreement['pairwise_accuracy']:.3f}" in out
    assert 0.5 < agreement["pairwise_accuracy"] <= 1.0  # r_phi orders same-prompt completions better than chance
