"""Preference pairs: the pairing rule, the dataset layout, caching, and bad input (ci profile)."""

from __future__ import annotations

import dataclasses
import time

import datasets
import pytest
import torch

from dpo_lab import preferences, storage
from dpo_lab.plots import plot_score_gaps
from dpo_lab.preferences import PreferenceDataError, load_preferences, pairs_from_scores, validate_preferences
from dpo_lab.world import World


@pytest.fixture(scope="module")
def ci_pairs(ci_world):
    """The ci preference folder, built once."""
    return preferences.build_preferences(ci_world, progress=False)


def small_world(world: World, n_prompts: int = 12) -> World:
    """``world`` with preference data for only its first ``n_prompts`` prompts (fast stub builds)."""
    spec = dataclasses.replace(world.profile.preferences, n_prompts=n_prompts)
    return dataclasses.replace(world, profile=world.profile.replace(preferences=spec))


@pytest.fixture
def stub_home(monkeypatch, tmp_path):
    """A private cache home, so a build with a stubbed model never lands under the real cache key."""
    monkeypatch.setenv(storage.HOME_ENV_VAR, str(tmp_path))
    return tmp_path


class RoundedScorer:
    """Wraps a scorer and rounds its scores to ``digits`` decimals: many exact ties."""

    def __init__(self, scorer, digits: int = 1):
        self.scorer, self.digits = scorer, digits

    def score(self, texts):
        return torch.round(self.scorer.score(texts), decimals=self.digits)


class NaNScorer:
    """Returns p(positive) = 0.5 except NaN for the third text."""

    def score(self, texts):
        scores = torch.full((len(texts),), 0.5)
        scores[2] = float("nan")
        return scores


def test_pairs_from_scores_ranks_every_pair_and_counts_ties():
    pairs, ties = pairs_from_scores([0.9, 0.1, 0.5, 0.5])
    assert pairs == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]
    assert ties == 1
    pairs, ties = pairs_from_scores([0.2, 0.7, 0.4], keys=["same", "other", "same"])
    assert pairs == [(1, 0), (1, 2)] and ties == 1
    assert pairs_from_scores([0.3]) == ([], 0)


def test_rank_samples_skips_blank_completions_and_drops_ties():
    scores = torch.tensor([0.9, 0.2, 0.2, 0.4, 0.6, 0.1, 0.3, 0.5])
    texts = [" good", " bad", " meh", "", " fine", " ", " ok", " ok"]
    rows, counts = preferences.rank_samples([0] * 4 + [1] * 4, [[5]] * 8, [[7, i] for i in range(8)],
                                            ["x"] * 8, texts, scores, samples_per_prompt=4)
    # prompt 0: sample 3 blank; ties (1, 2). prompt 1: sample 5 blank; samples 6, 7 have the same text.
    assert counts == {"skipped_blank": 2, "ties_dropped": 2, "prompts_without_pairs": 0}
    assert list(zip(rows["chosen"], rows["rejected"])) == [(" good", " bad"), (" good", " meh"), (" fine", " ok"),
                                                           (" fine", " ok")]
    assert rows["prompt_id"] == [0, 0, 1, 1]
    assert rows["chosen_ids"][2] == [7, 4] and rows["rejected_ids"][3] == [7, 7]


def test_dataset_layout_and_ranking(ci_world, ci_pairs):
    ds = load_preferences(ci_pairs)
    assert ds.column_names == list(preferences.COLUMNS)
    assert ds.features == preferences.FEATURES
    summary = storage.read_json(ci_pairs / preferences.SUMMARY)
    spec = ci_world.profile.preferences
    k = spec.samples_per_prompt
    assert summary["completions"] == spec.n_prompts * k
    assert summary["pairs"] == len(ds) > 0
    assert len(ds) <= summary["pairs_possible"] == spec.n_prompts * k * (k - 1) // 2
    figure = plot_score_gaps(preferences.score_gaps(ds))
    assert sum(patch.get_height() for patch in figure.axes[0].patches) == len(ds)
    assert all(chosen > rejected for chosen, rejected in zip(ds["score_chosen"], ds["score_rejected"]))
    tokenizer = ci_world.load_policy("cpu")[1]
    for row in ds.select(range(0, len(ds), max(1, len(ds) // 25))):
        assert row["prompt_ids"] == ci_world.train_prompts[row["prompt_id"]]
        assert row["chosen"] == tokenizer.decode(row["chosen_ids"], skip_special_tokens=True)
        assert row["prompt"] == tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)
        assert row["chosen_ids"] != row["rejected_ids"]


def test_rerun_reuses_the_cache(ci_world, ci_pairs, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the preference data was rebuilt")

    monkeypatch.setattr(preferences, "_build", no_rebuild)
    started = time.time()
    assert preferences.build_preferences(ci_world, progress=False) == ci_pairs
    assert time.time() - started < 1.0


def test_ties_from_a_coarse_ground_truth_are_dropped_and_counted(ci_world, stub_home, monkeypatch):
    scorer = RoundedScorer(ci_world.load_scorer("cpu"))
    monkeypatch.setattr(World, "load_scorer", lambda self, device=None: scorer)
    world = small_world(ci_world)
    summary = storage.read_json(preferences.build_preferences(world, progress=False) / preferences.SUMMARY)
    assert summary["ties_dropped"] > 0
    k = world.profile.preferences.samples_per_prompt
    blank_pairs_bound = summary["skipped_blank"] * (k - 1)
    assert summary["pairs"] + summary["ties_dropped"] <= summary["pairs_possible"]
    assert summary["pairs"] + summary["ties_dropped"] + blank_pairs_bound >= summary["pairs_possible"]


def test_non_finite_ground_truth_is_a_clear_error(ci_world, stub_home, monkeypatch):
    monkeypatch.setattr(World, "load_scorer", lambda self, device=None: NaNScorer())
    world = small_world(ci_world)
    k = world.profile.preferences.samples_per_prompt
    with pytest.raises(PreferenceDataError, match=rf"score nan for training prompt {2 // k} "):
        preferences.build_preferences(world, progress=False)
    assert not any(storage.is_done(p) for p in (stub_home / "ci").iterdir())


def test_policy_emitting_only_eos_is_a_clear_error(ci_world, stub_home, monkeypatch):
    load_policy = World.load_policy

    def eos_only_policy(self, device=None):
        model, tokenizer = load_policy(self, device)
        eos = tokenizer.eos_token_id
        model.lm_head.register_forward_hook(lambda module, args, logits: torch.full_like(logits, -1e4)
                                            .index_fill(-1, torch.tensor([eos]), 0.0))
        return model, tokenizer

    monkeypatch.setattr(World, "load_policy", eos_only_policy)
    world = small_world(ci_world)
    n = world.profile.preferences.n_prompts * world.profile.preferences.samples_per_prompt
    with pytest.raises(PreferenceDataError, match=rf"no usable preference pairs.*{n} completions were blank"):
        preferences.build_preferences(world, progress=False)


def toy_dataset(**changes) -> datasets.Dataset:
    """Three valid pairs, with ``changes`` (column -> {row: value}) applied."""
    columns = {"prompt": ["A film", "The plot", "It"], "chosen": [" shines", " works", " is fun"],
               "rejected": [" drags", " fails", " is dull"], "score_chosen": [0.9, 0.8, 0.7],
               "score_rejected": [0.1, 0.2, 0.3], "prompt_id": [0, 1, 2], "prompt_ids": [[1, 2], [3, 4], [5]],
               "chosen_ids": [[6], [7], [8, 9]], "rejected_ids": [[10], [11], [12, 13]]}
    for column, rows in changes.items():
        for row, value in rows.items():
            columns[column][row] = value
    return datasets.Dataset.from_dict(columns)


def test_validate_preferences_names_column_and_row():
    validate_preferences(toy_dataset())
    with pytest.raises(PreferenceDataError, match=r"toy: missing column\(s\) 'rejected'"):
        validate_preferences(toy_dataset().remove_columns("rejected"), source="toy")
    with pytest.raises(PreferenceDataError, match=r"toy: column 'chosen', row 1: empty completion"):
        validate_preferences(toy_dataset(chosen={1: ""}), source="toy")
    with pytest.raises(PreferenceDataError, match=r"toy: column 'rejected', row 2: chosen and rejected are the same"):
        validate_preferences(toy_dataset(rejected={2: " is fun"}), source="toy")
    with pytest.raises(PreferenceDataError, match=r"column 'score_chosen', row 0: chosen scores below rejected"):
        validate_preferences(toy_dataset(score_chosen={0: 0.05}))
    with pytest.raises(PreferenceDataError, match=r"column 'score_rejected', row 1: a score that is not a finite"):
        validate_preferences(toy_dataset(score_rejected={1: None}))
    with pytest.raises(PreferenceDataError, match=r"column 'prompt_ids', row 0: a negative token id \(-5\)"):
        validate_preferences(toy_dataset(prompt_ids={0: [-5]}))
    validate_preferences(toy_dataset(prompt={2: ""}))  # a prompt of out-of-vocabulary words decodes blank: allowed
    with pytest.raises(PreferenceDataError, match="not a preference dataset folder"):
        load_preferences(storage.home())
