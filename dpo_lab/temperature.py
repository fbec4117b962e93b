"""The paper's temperature experiment (Figure 2, right), transferred to the sentiment task.

The paper samples its TL;DR policies at temperatures 0 to 1 and reports the win rate against the
reference summaries, judged by GPT-4. Here the judge is the ground truth itself:

- **policies:** pi_SFT, and for each chosen method (by default DPO, PPO and the method since the paper
  that scores best, the ground-truth oracles left out) its best run of the frontier sweep: the run
  whose final checkpoint has the highest ground-truth reward among the runs whose final KL is
  within the sweep's largest KL budget (``SweepSpec.kl_budgets``), so that a method is not
  credited with reward it bought by leaving the reference further than the others;
- **samples:** one completion per test prompt at each temperature of ``SweepSpec.temperatures``,
  the evaluation protocol's prompts and seed;
- **measures:** the mean ground-truth reward (± its standard error), and the win rate against pi_SFT's
  samples at temperature 1 (the evaluation protocol's samples), prompt by prompt: a win when the
  policy's completion scores higher, a tie counting half, ± its standard error.

A best run whose model is not in the cache (a fresh clone holds only the results table) is trained
again through the method registry; training is deterministic, and its run id must match the
table's, so the experiment samples the very checkpoint the table reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo_lab import lm, runtime, sentiment, storage
from dpo_lab.evaluate import mean_and_se
from dpo_lab.methods import RunRequest, get_method, group_rows
from dpo_lab.pipeline import Pipeline
from dpo_lab.plots import plot_temperature
from dpo_lab.runs import FINAL_DIR

TEMPERATURE_FILE = "temperature.csv"
COLUMNS = ["policy", "method", "run_id", "hyperparameter", "final_kl", "temperature", "reward", "reward_se",
           "win_rate", "win_rate_se", "length"]


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The last evaluated checkpoint of every trained run (Best-of-N, one curve and no model, excluded)."""
    runs = table[(table["step"] > 0) & (table["method"] != "best-of-n")]
    return runs.sort_values("step").groupby("run_id", sort=False).tail(1)


def best_run(table: pd.DataFrame, method: str, kl_budget: float) -> pd.Series:
    """The final-checkpoint row of ``method``'s best run: highest reward among runs with final KL <= ``kl_budget``."""
    finals = final_rows(table)
    finals = finals[(finals["method"] == method) & (finals["kl"] <= kl_budget)]
    if finals.empty:
        raise ValueError(f"no run of {method!r} in the table ends within KL {kl_budget:g}")
    return finals.loc[finals["reward"].idxmax()]


def best_modern_method(table: pd.DataFrame, kl_budget: float) -> str | None:
    """The method since the paper whose best run (:func:`best_run`) scores highest, oracles (trained on the ground
    truth itself) left out, as PPO-GT is; ``None`` if the table has none."""
    finals = final_rows(group_rows(table, "modern"))
    finals = finals[~finals["method"].map(lambda name: get_method(name).oracle).astype(bool)]
    finals = finals[finals["kl"] <= kl_budget]
    return None if finals.empty else str(finals.loc[finals["reward"].idxmax(), "method"])


def policy_folder(pipeline: Pipeline, row: pd.Series, progress: bool):
    """The final model folder of the run in ``row``, trained again (deterministically) if it is not cached."""
    method = get_method(row["method"])
    value = None if method.hyperparameter == "seed" else float(row["hyperparameter"])
    request = RunRequest(value, seed=int(row["seed"]), options=method.default_options(), progress=progress)
    run_id = method.train(pipeline, request)["run_id"].iloc[0]
    if run_id != row["run_id"]:
        raise ValueError(f"the table's run {row['run_id']} is not what this code trains ({run_id}): its configuration "
                         "changed since the table was made; run the sweep again first")
    return storage.profile_dir(pipeline.profile.name) / "runs" / run_id / FINAL_DIR


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float]:
    """Share of prompts where ``scores`` beat ``baseline`` (ties count half), and its standard error; inputs (N,)."""
    return mean_and_se((scores > baseline).double() + 0.5 * (scores == baseline).double())


def sample_scores(pipeline: Pipeline, model, tokenizer, scorer, temperature: float) -> tuple[torch.Tensor, float]:
    """Ground-truth scores (N,) of one completion per test prompt at ``temperature``, and the mean length."""
    world, profile = pipeline.world, pipeline.profile
    completions = lm.sample_completions(model, world.test_prompts, max_new_tokens=profile.sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                        batch_size=profile.evaluation.batch_size, seed=profile.evaluation.seed,
                                        temperature=temperature)
    scores = sentiment.finite_score_ids(scorer, tokenizer, world.test_prompts, completions)
    return scores, sum(map(len, completions)) / len(completions)


def policy_columns(row: pd.Series | None) -> dict:
    """The columns naming a policy: pi_SFT for ``None``, else the best run in ``row`` (a results-table row)."""
    if row is None:
        return {"policy": "SFT", "method": "sft", "run_id": None, "hyperparameter": None, "final_kl": 0.0}
    label = f"{get_method(row['method']).label} ({row['hyperparameter_name']}={row['hyperparameter']:g})"
    return {"policy": label, "method": row["method"], "run_id": row["run_id"],
            "hyperparameter": row["hyperparameter"], "final_kl": row["kl"]}


def temperature_experiment(pipeline: Pipeline, table: pd.DataFrame, methods: Sequence[str],
                           kl_budget: float | None = None, progress: bool = True) -> pd.DataFrame:
    """Sample pi_SFT and each method's best run at every temperature of the sweep; one row per (policy, T).

    ``table``: the profile's frontier results table; ``methods``: method names in it; ``kl_budget``: the
    final KL a best run may have (default: the sweep's largest KL budget). Columns: :data:`COLUMNS`.
    """
    sweep = pipeline.profile.sweep
    budget = max(sweep.kl_budgets) if kl_budget is None else kl_budget
    best = [best_run(table, method, budget) for method in methods]  # fails before any sampling
    folders = [policy_folder(pipeline, row, progress) for row in best]  # so does a run whose configuration changed
    device = runtime.pick_device(pipeline.device)
    scorer = pipeline.world.load_scorer(device)
    sft, tokenizer = pipeline.world.load_policy(device)
    baseline, _ = sample_scores(pipeline, sft, tokenizer, scorer, 1.0)
    rows = []
    for row, folder in [(None, None), *zip(best, folders)]:
        model = sft if row is None else lm.load_causal_lm(folder, device)[0]
        for temperature in tqdm(sweep.temperatures, desc=policy_columns(row)["policy"], disable=not progress):
            scores, length = sample_scores(pipeline, model, tokenizer, scorer, temperature)
            reward, reward_se = mean_and_se(scores)
            wins, wins_se = win_rate(scores, baseline)
            rows.append({**policy_columns(row), "temperature": temperature, "reward": reward,
                         "reward_se": reward_se, "win_rate": wins, "win_rate_se": wins_se, "length": length})
    return pd.DataFrame(rows, columns=COLUMNS)


def temperature_path(profile_name: str) -> Path:
    """``data/results/<profile>/temperature.csv``."""
    return storage.results_dir(profile_name) / TEMPERATURE_FILE


def write_temperature_report(profile_name: str, frame: pd.DataFrame) -> list[Path]:
    """Write the experiment's table (atomically, 6 significant digits) and draw its figure; the paths written."""
    path = temperature_path(profile_name)
    with storage.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    figure = storage.figures_dir() / f"temperature_{profile_name}"
    plot_temperature(frame, save_to=figure)
    return [path, figure.with_suffix(".png")]
