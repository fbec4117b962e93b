"""The offline trainer (DPO and variants, Unlikelihood, Preferred-FT) on the `ci` world.

Each training run is a module-scoped fixture, trained once with the ci profile's
``OfflineTrainSpec`` and shared by the tests that read it.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate import Accelerator

from dpo_lab import cli, runs, storage
from dpo_lab.guards import NonFiniteError
from dpo_lab.methods import get_method
from dpo_lab.preferences import PreferenceDataError, build_preferences, load_preferences
from dpo_lab.train import dpo
from dpo_lab.train.dpo import Objective, offline_run, train_offline

pytestmark = pytest.mark.slow

STEP_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
                "logps/rejected", "dpo_weight", "grad_norm", "lr", "pairs_per_s")
ROW_COLUMNS = ("profile", "run_id", "method", "hyperparameter_name", "hyperparameter", "seed", "step", "reward",
               "reward_se", "kl", "kl_se", "kl_sample", "length", "n_prompts", "wall_s")


@pytest.fixture(scope="module")
def pairs(ci_world):
    return build_preferences(ci_world, progress=False)


@pytest.fixture(scope="module")
def low_beta(ci_world, pairs):
    return train_offline(ci_world, pairs, "dpo", beta=0.05, progress=False)


@pytest.fixture(scope="module")
def high_beta(ci_world, pairs):
    return train_offline(ci_world, pairs, "dpo", beta=5.0, progress=False)


def final_row(run) -> pd.Series:
    rows = run.evaluations()
    return rows.loc[rows["step"].idxmax()]


def expected_steps(world, pairs) -> list[int]:
    spec = world.profile.offline
    last = dpo.total_steps(spec, len(load_preferences(pairs)))
    return sorted({*range(0, last, spec.eval_every), last})


def test_dpo_raises_ground_truth_reward_over_sft(low_beta, ci_world, pairs):
    rows = low_beta.evaluations()
    assert low_beta.finished
    assert rows["step"].tolist() == expected_steps(ci_world, pairs)
    assert set(ROW_COLUMNS) <= set(rows.columns)
    sft = rows[rows["step"] == 0].iloc[0]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-6)
    assert final_row(low_beta)["reward"] > sft["reward"] + 0.1
    assert (rows["method"] == "dpo").all() and (rows["hyperparameter_name"] == "beta").all()


def test_smaller_beta_ends_further_from_the_reference(low_beta, high_beta):
    assert low_beta.evaluations()["step"].tolist() == high_beta.evaluations()["step"].tolist()
    assert final_row(low_beta)["kl"] > 3 * final_row(high_beta)["kl"]


def test_step_metrics_and_implicit_reward_accuracy(low_beta, ci_world, pairs):
    metrics = low_beta.metrics()
    assert set(STEP_METRICS) <= set(metrics.columns)
    assert metrics["step"].tolist() == list(range(1, expected_steps(ci_world, pairs)[-1] + 1))
    assert np.isfinite(metrics[list(STEP_METRICS)].to_numpy()).all()
    first = metrics.iloc[0]  # before the first update pi = pi_ref: cached reference log-probs are exact
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["dpo_weight"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["rewards/accuracy"].tail(5).mean() > 0.5
    assert metrics["rewards/margin"].tail(5).mean() > 0


@pytest.mark.parametrize("method, options, name", [("unlikelihood", {"alpha": 0.5}, "alpha"),
                                                   ("preferred-ft", {"seed": 1}, "seed")])
def test_offline_baselines_finish_and_are_evaluated(ci_world, pairs, method, options, name):
    run = train_offline(ci_world, pairs, method, progress=False, **options)
    rows = run.evaluations()
    assert run.finished and (run.path / runs.FINAL_DIR).is_dir()
    assert rows["step"].tolist() == expected_steps(ci_world, pairs)
    assert np.isfinite(rows[["reward", "kl", "kl_sample", "length"]].to_numpy()).all()
    assert (rows["method"] == method).all() and (rows["hyperparameter_name"] == name).all()
    assert rows["hyperparameter"].iloc[0] == options[name]
    assert rows["kl"].iloc[-1] > 0


MODERN_STEPS = 100
"""Training steps of the SimPO, ORPO and KTO runs on `ci` (evaluated at step 0 and at the end)."""


@pytest.mark.parametrize("method, options, name, value", [("simpo", {"beta": 2.0, "gamma": 0.5}, "beta", 2.0),
                                                          ("orpo", {"lam": 5.0}, "lam", 5.0),
                                                          ("kto", {"beta": 0.1}, "beta", 0.1)])
def test_simpo_orpo_and_kto_raise_the_ground_truth_reward_over_sft(ci_world, pairs, method, options, name, value):
    spec = dataclasses.replace(ci_world.profile.offline, max_steps=MODERN_STEPS, eval_every=MODERN_STEPS)
    run = train_offline(ci_world, pairs, method, overrides=spec, progress=False, **options)
    rows = run.evaluations()
    assert rows["step"].tolist() == [0, MODERN_STEPS]
    assert (rows["method"] == method).all() and (rows["hyperparameter_name"] == name).all()
    assert rows["hyperparameter"].iloc[0] == value
    sft, last = rows.iloc[0], rows.iloc[-1]
    assert last["reward"] > sft["reward"] + 2 * np.hypot(sft["reward_se"], last["reward_se"])
    metrics = run.metrics()
    assert metrics["rewards/accuracy"].tail(10).mean() > 0.5  # the implicit reward (SimPO, KTO) or log odds (ORPO)


def test_rerun_of_a_finished_run_does_nothing(low_beta, ci_world, pairs):
    metrics_before = (low_beta.path / "metrics.jsonl").stat().st_mtime_ns
    started = time.perf_counter()
    again = train_offline(ci_world, pairs, "dpo", beta=0.05, progress=False)
    assert time.perf_counter() - started < 2.0
    assert again.path == low_beta.path and again.finished
    assert (low_beta.path / "metrics.jsonl").stat().st_mtime_ns == metrics_before


class Interrupted(RuntimeError):
    pass


def test_interrupted_run_resumes_to_the_same_evaluations(low_beta, ci_world, pairs, tmp_path, monkeypatch):
    """Kill a run (an exception after the step past its first checkpoint), rerun it, compare with an unbroken run."""
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))  # same configuration, fresh run folder
    eval_every = ci_world.profile.offline.eval_every
    log_metrics = runs.Run.log_metrics

    def crash_after_checkpoint(self, step, metrics):
        log_metrics(self, step, metrics)
        if step == eval_every + 3:
            raise Interrupted(f"killed at step {step}")

    monkeypatch.setattr(runs.Run, "log_metrics", crash_after_checkpoint)
    with pytest.raises(Interrupted):
        train_offline(ci_world, pairs, "dpo", beta=0.05, progress=False)
    (folder,) = (tmp_path / ci_world.profile.name / "runs" / "dpo").glob("beta0.05-seed0-*")
    broken = runs.Run(ci_world.profile.name, "dpo", "beta0.05-seed0", storage.read_json(folder / "config.json"))
    assert broken.path != low_beta.path and not broken.finished
    assert broken.latest_checkpoint()[1]["step"] == eval_every
    assert broken.evaluations()["step"].tolist() == [0, eval_every]

    monkeypatch.setattr(runs.Run, "log_metrics", log_metrics)
    evaluated = []
    evaluate_policy = runs.evaluate_policy
    monkeypatch.setattr(runs, "evaluate_policy", lambda *a, **k: evaluated.append(1) or evaluate_policy(*a, **k))
    resumed = train_offline(ci_world, pairs, "dpo", beta=0.05, progress=False)
    assert resumed.path == broken.path and resumed.finished
    assert len(evaluated) == len(expected_steps(ci_world, pairs)) - 2  # steps 0 and eval_every were kept
    columns = ["step", "reward", "reward_se", "kl", "kl_se", "kl_sample", "length"]
    pd.testing.assert_frame_equal(resumed.evaluations()[columns], low_beta.evaluations()[columns], rtol=1e-5)
    pd.testing.assert_frame_equal(resumed.metrics()[["step", "loss", "grad_norm"]],
                                  low_beta.metrics()[["step", "loss", "grad_norm"]], rtol=1e-5)


def broken_copy(pairs, folder, change) -> str:
    dataset = load_preferences(pairs)
    change(dataset).save_to_disk(str(folder))
    return str(folder)


def with_row0(column, value):
    return lambda ds: ds.map(lambda row, i: {column: value(row) if i == 0 else row[column]}, with_indices=True)


@pytest.mark.parametrize("change, message", [
    (lambda ds: ds.remove_columns("rejected_ids"), "missing column"),
    (with_row0("chosen", lambda row: ""), "empty completion"),
    (lambda ds: with_row0("rejected_ids", lambda row: row["chosen_ids"])(
        with_row0("rejected", lambda row: row["chosen"])(ds)), "same completion"),
])
def test_malformed_preferences_fail_before_training(ci_world, pairs, tmp_path, monkeypatch, change, message):
    bad = broken_copy(pairs, tmp_path / "bad_pairs", change)
    monkeypatch.setattr(runs, "evaluate_policy", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(PreferenceDataError, match=message):
        train_offline(ci_world, bad, "dpo", beta=0.1, progress=False)


def test_cached_and_on_the_fly_reference_agree(ci_world, pairs):
    data = dpo.load_pairs(pairs)
    reference, tokenizer = ci_world.load_policy("cpu")
    accelerator = Accelerator(cpu=True)
    cached = dpo.cached_reference_logps(ci_world, pairs, data, reference, accelerator, batch_size=32, progress=False)
    assert cached.shape == (len(data), 2)
    indices = [5, 0, 17, 3]
    fresh = dpo.reference_pair_logps(reference, data.batch(indices, tokenizer.pad_token_id))
    torch.testing.assert_close(cached[indices], fresh, rtol=1e-5, atol=1e-4)
    assert (cached[:, 0] != cached[:, 1]).any()


def test_the_step_trains_without_dropout(ci_world, pairs):
    from transformers import GPT2Config, GPT2LMHeadModel

    data = dpo.load_pairs(pairs)
    _, tokenizer = ci_world.load_policy("cpu")
    leaky = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    leaky.train()
    step = dpo.OfflineStep.create(Objective("dpo"), data, ci_world.profile.offline, Accelerator(cpu=True), leaky,
                                  torch.zeros(len(data), 2), tokenizer.pad_token_id)
    assert not any(module.training for module in step.policy.modules())
    batch = data.batch([0, 1, 2], tokenizer.pad_token_id)
    torch.testing.assert_close(dpo.completion_logps(step.policy, batch), dpo.completion_logps(step.policy, batch))


def test_gradient_accumulation_matches_the_full_batch(ci_world, pairs):
    spec = dataclasses.replace(ci_world.profile.offline, max_steps=2, eval_every=100)
    full, split = (train_offline(ci_world, pairs, "dpo", beta=0.1, progress=False,
                                 overrides=dataclasses.replace(spec, grad_accum=k)) for k in (1, 4))
    assert full.path != split.path
    for column in ("loss", "rewards/accuracy", "grad_norm"):
        np.testing.assert_allclose(split.metrics()[column], full.metrics()[column], rtol=1e-4)


def test_objectives_validate_their_hyperparameters():
    assert Objective("dpo", loss_type="ipo").name == "ipo"
    assert Objective("dpo").name == "dpo"
    assert Objective("preferred-ft", beta=-1).settings() == {}
    for bad in ({"beta": 0.0}, {"beta": float("inf")}, {"loss_type": "squared"}, {"label_smoothing": 0.5}):
        with pytest.raises(ValueError):
            Objective("dpo", **bad)
    with pytest.raises(ValueError, match="alpha"):
        Objective("unlikelihood", alpha=-0.1)
    with pytest.raises(ValueError, match="unknown offline method"):
        Objective("ppo")
    assert not Objective("simpo").uses_reference and not Objective("orpo").uses_reference
    assert Objective("kto").uses_reference and Objective("kto").uses_rejected
    assert Objective("simpo", beta=2.0, gamma=0.3).settings() == {"beta": 2.0, "gamma": 0.3}
    assert Objective("orpo", lam=0.2).hyperparameter(seed=0) == ("lam", 0.2)
    for method, bad, match in (("simpo", {"gamma": -1.0}, "gamma"), ("simpo", {"beta": 0.0}, "beta"),
                               ("orpo", {"lam": -0.1}, "lam"), ("kto", {"beta": -1.0}, "beta")):
        with pytest.raises(ValueError, match=match):
            Objective(method, **bad)


def test_cli_options_override_the_profile(ci_world):
    spec = ci_world.profile.offline
    types = cli.method_arg_types(get_method("dpo"))
    _, args, options, overrides = cli.parse("t", ["--beta", "0.5", "--reference", "on-the-fly", "--lr", "1e-4",
                                                  "--batch-size", "16", "--optimizer", "rmsprop"], *types)
    assert (args.beta, options.reference) == (0.5, "on-the-fly")
    changed = cli.apply_overrides(spec, overrides)
    assert (changed.lr, changed.batch_size, changed.optimizer) == (1e-4, 16, "rmsprop")
    assert changed.eval_every == spec.eval_every and changed.warmup_steps == spec.warmup_steps
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        dataclasses.replace(spec, batch_size=30, grad_accum=4)
    with pytest.raises(ValueError, match="optimizer"):
        dataclasses.replace(spec, optimizer="sgd")


def test_batch_schedule_is_a_function_of_the_step():
    schedule = dpo.batch_schedule(10, 4, 6, seed=3)
    assert schedule == dpo.batch_schedule(10, 4, 6, seed=3)
    assert all(len(b) == 4 for b in schedule)
    assert sorted(sum(schedule[:2], []) + schedule[2][:2]) == list(range(10))  # the first epoch covers every pair
    assert schedule != dpo.batch_schedule(10, 4, 6, seed=4)


def test_cli_reuses_the_finished_run_and_rejects_bad_options(ci_world, pairs, capsys):
    run = train_offline(ci_world, pairs, "unlikelihood", alpha=0.5, progress=False)
    assert cli.main(["train", "unlikelihood", "--profile", "ci", "--alpha", "0.5"]) == 0
    assert run.run_id in capsys.readouterr().out
    assert cli.main(["train", "dpo", "--profile", "ci", "--beta", "0"]) == 2
    assert cli.main(["train", "dpo", "--profile", "ci", "--beta", "inf"]) == 2
    assert cli.main(["train", "dpo", "--profile", "ci", "--batch-size", "30", "--grad-accum", "4"]) == 2
    assert "multiple of grad_accum" in capsys.readouterr().err


def test_a_huge_learning_rate_stops_at_the_first_bad_step_and_keeps_the_checkpoint(ci_world, pairs):
    """--lr 1e6 used to train on NaN from step 3, then die in torch.multinomial; a rerun repeated it."""
    spec = dataclasses.replace(ci_world.profile.offline, lr=1e6, eval_every=1, warmup_steps=0)
    with pytest.raises(NonFiniteError) as caught:
        train_offline(ci_world, pairs, "dpo", beta=0.1, overrides=spec, progress=False)
    message = str(caught.value)
    run = offline_run(ci_world, pairs, Objective("dpo", beta=0.1), spec, "cached")
    bad_step = int(re.search(r"stopped at step (\d+): non-finite", message).group(1))
    checkpoint = run.latest_checkpoint()  # evaluated and saved after every step: the one before the bad step
    assert checkpoint is not None and checkpoint[1]["step"] == bad_step - 1 and "--lr" in message
    assert f"last good checkpoint (step {bad_step - 1}) is kept" in message
    assert run.evaluations()["reward"].map(np.isfinite).all()
    with pytest.raises(NonFiniteError, match="delete it to retry anyway") as again:  # at once, before any step
        train_offline(ci_world, pairs, "dpo", beta=0.1, overrides=spec, progress=False)
    assert message in str(again.value)
