"""The temperature experiment (Figure 2, right, transferred) on the `ci` world."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from dpo_lab import cli, lm, storage
from dpo_lab.frontier import run_sweep
from dpo_lab.pipeline import Pipeline
from dpo_lab.plots import plot_temperature
from dpo_lab.profiles import get_profile
from dpo_lab.temperature import best_modern_method, best_run, temperature_experiment, win_rate


@pytest.fixture()
def results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_RESULTS", str(tmp_path / "results"))
    return tmp_path


def test_win_rate_counts_ties_half():
    wins, se = win_rate(torch.tensor([1.0, 0.0, 0.5, 0.9]), torch.tensor([0.0, 1.0, 0.5, 0.1]))
    assert wins == pytest.approx(2.5 / 4)
    assert se == pytest.approx(torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64).std().item() / 2)


def test_sampling_temperature_is_checked_and_one_is_plain_sampling(ci_world):
    model, tokenizer = ci_world.load_policy("cpu")
    prompts = ci_world.test_prompts[:8]
    kwargs = dict(max_new_tokens=6, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=3)
    plain = lm.sample_completions(model, prompts, **kwargs)
    assert lm.sample_completions(model, prompts, temperature=1.0, **kwargs) == plain
    assert lm.sample_completions(model, prompts, temperature=0.05, **kwargs) != plain
    with pytest.raises(ValueError, match="temperature"):
        lm.sample_completions(model, prompts, temperature=0.0, **kwargs)


@pytest.mark.slow
def test_the_experiment_samples_the_table_s_best_run_and_is_consistent_with_it(ci_world, results_folder):
    profile = get_profile("ci")
    table = run_sweep(profile, ["dpo"], progress=False)
    pipeline = Pipeline(profile, progress=False)
    frame = temperature_experiment(pipeline, table, ["dpo"], kl_budget=1e3, progress=False)
    temperatures = list(profile.sweep.temperatures)
    assert frame["method"].tolist() == ["sft"] * len(temperatures) + ["dpo"] * len(temperatures)
    assert frame["temperature"].tolist() == temperatures * 2
    sft_at_one = frame[(frame["method"] == "sft") & (frame["temperature"] == 1.0)].iloc[0]
    assert sft_at_one["reward"] == pytest.approx(table.loc[table["step"] == 0, "reward"].iloc[0])  # the protocol
    assert sft_at_one["win_rate"] == 0.5 and sft_at_one["win_rate_se"] == 0.0  # the same samples: all ties
    last = table[table["step"] == table["step"].max()].iloc[0]
    dpo_at_one = frame[(frame["method"] == "dpo") & (frame["temperature"] == 1.0)].iloc[0]
    assert dpo_at_one["run_id"] == last["run_id"] and dpo_at_one["final_kl"] == last["kl"]
    assert dpo_at_one["reward"] == pytest.approx(last["reward"])  # its final checkpoint, as evaluated in the table
    assert dpo_at_one["policy"] == "DPO (beta=0.1)"

    # A fresh clone holds the table but not the model: the best run is trained again, to the same checkpoint.
    shutil.rmtree(storage.profile_dir("ci") / "runs" / last["run_id"])
    again = temperature_experiment(pipeline, table, ["dpo"], kl_budget=1e3, progress=False)
    pd.testing.assert_frame_equal(again, frame)
    assert len(plot_temperature(frame).axes) == 2


def test_best_run_respects_the_kl_budget_and_the_command_needs_a_table(results_folder):
    table = pd.DataFrame({"method": ["dpo"] * 4, "run_id": ["a", "a", "b", "b"], "step": [0, 5, 0, 5],
                          "reward": [0.5, 0.9, 0.5, 0.8], "kl": [0.0, 12.0, 0.0, 3.0]})
    assert best_run(table, "dpo", 10.0)["run_id"] == "b"
    assert best_run(table, "dpo", 20.0)["run_id"] == "a"
    with pytest.raises(ValueError, match="within KL 1"):
        best_run(table, "dpo", 1.0)
    with pytest.raises(ValueError, match="no results table"):
        cli.run_temperature(["--profile", "ci"])


def test_the_best_method_since_the_paper_is_never_an_oracle():
    rows = [("dpo", 0.80, 3.0), ("grpo-gt", 0.99, 4.0), ("grpo", 0.90, 5.0), ("ipo", 0.85, 2.0), ("rloo", 0.95, 30.0)]
    table = pd.DataFrame([{"method": m, "run_id": m, "step": step, "reward": reward if step else 0.5,
                           "kl": kl if step else 0.0} for m, reward, kl in rows for step in (0, 10)])
    assert best_modern_method(table, 10.0) == "grpo"  # grpo-gt trains on the ground truth; rloo ends past the budget
    assert best_modern_method(table[table["method"] == "dpo"], 10.0) is None
