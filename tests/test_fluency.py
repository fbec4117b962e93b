"""The fluency judge and pass on the `ci` world, with pi_SFT itself as a (local) judge: no download."""

from __future__ import annotations

import dataclasses
import logging
import math

import pandas as pd
import pytest
import torch

from dpo_lab import cli, fluency, judge, pretrained
from dpo_lab.frontier import results_path, write_results
from dpo_lab.plots import plot_fluency
from dpo_lab.train.dpo import train_offline


@pytest.fixture(scope="module")
def local_judge(ci_world):
    """pi_SFT's folder: any local causal LM can judge."""
    return str(ci_world.sft_dir)


def test_log_perplexity_does_not_depend_on_padding_or_batching(local_judge):
    model, tokenizer = judge.load_judge(local_judge)
    texts = ["a fine and funny film", "the worst", "x", "an utterly charming, warm and very funny movie"]
    batched = judge.log_perplexities(model, tokenizer, texts, batch_size=4)
    single = torch.cat([judge.log_perplexities(model, tokenizer, [t], batch_size=1) for t in texts])
    torch.testing.assert_close(batched, single, equal_nan=True)
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert batched[0].item() == pytest.approx(by_hand, rel=1e-5)
    assert math.isnan(batched[2].item()) == (len(tokenizer("x", add_special_tokens=False)["input_ids"]) < 2)


def test_perplexity_is_the_geometric_mean_and_skips_nan():
    ppl, se = judge.perplexity(torch.tensor([math.log(10.0), math.log(1000.0), math.nan], dtype=torch.float64))
    assert ppl == pytest.approx(100.0)
    log_std = (math.log(1000.0) - math.log(10.0)) / math.sqrt(2)  # the sample std of the two logs
    assert se == pytest.approx(100.0 * log_std / math.sqrt(2))      # delta method: ppl * se of the mean log
    assert all(math.isnan(v) for v in judge.perplexity(torch.tensor([math.nan])))


@pytest.mark.slow
def test_the_pass_judges_every_kept_sample_once_and_caches_it(ci_world, local_judge, monkeypatch, caplog, tmp_path):
    spec = dataclasses.replace(ci_world.profile.offline, max_steps=4, eval_every=2)
    run = train_offline(ci_world, lm_pairs(ci_world), "dpo", beta=0.1, overrides=spec, progress=False)
    table = run.evaluations()
    assert sorted(run.samples()) == table["step"].tolist() == [0, 2, 4]
    first = fluency.fluency_table("ci", table, local_judge, progress=False)
    assert first[["run_id", "step"]].values.tolist() == [[run.run_id, 0], [run.run_id, 2], [run.run_id, 4]]
    assert (first["fluency_n"] == len(run.samples()[0])).all() and (first["fluency"] > 1).all()
    model, tokenizer = judge.load_judge(local_judge)
    texts = [s["prompt"] + s["completion"] for s in run.samples()[2]]
    expected, _ = judge.perplexity(judge.log_perplexities(model, tokenizer, texts))
    assert first.loc[first["step"] == 2, "fluency"].item() == pytest.approx(expected)

    monkeypatch.setattr(fluency, "load_judge", lambda *a, **k: pytest.fail("judged again despite the cache"))
    pd.testing.assert_frame_equal(fluency.fluency_table("ci", table, local_judge, progress=False), first)
    monkeypatch.undo()
    cache = next((fluency.storage.profile_dir("ci")).glob("fluency-*.json"))
    cache.write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING, logger="dpo_lab"):
        again = fluency.fluency_table("ci", table, local_judge, progress=False)
    assert "unreadable fluency cache" in caplog.text
    pd.testing.assert_frame_equal(again, first)
    joined = fluency.with_fluency(table, first)
    assert len(joined) == len(table) and joined["fluency"].notna().all()
    assert len(plot_fluency(joined).axes) == 1

    # The command: the results table's runs judged (from the cache), the table and the figure written.
    monkeypatch.setenv("DPO_LAB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DPO_LAB_FIGURES", str(tmp_path / "figures"))
    write_results(table.assign(profile="ci"), results_path("ci"))
    assert cli.main(["fluency", "--profile", "ci", "--judge", local_judge]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(fluency.fluency_path("ci")), first, check_exact=False, rtol=1e-5)
    assert (tmp_path / "figures" / "fluency_ci.png").exists()


def lm_pairs(world):
    """The `ci` preference pairs (built once per session)."""
    from dpo_lab.pipeline import Pipeline

    return Pipeline(world.profile, progress=False).pairs


def test_a_model_name_other_than_smollm2_is_loaded_as_it_is(tmp_path):
    assert pretrained.resolve("gpt2") == "gpt2"
    assert pretrained.resolve(str(tmp_path)) == str(tmp_path)
