"""Reading a results table the way a reader of the paper would: frontiers, budgets, domination.

The results table has one row per evaluated checkpoint, with at least the columns ``method``,
``run_id``, ``step``, ``reward``, ``reward_se``, ``kl``, ``kl_se`` (the columns :func:`dpo_lab.evaluate.Evaluation.row` writes).

Every statistic here counts **distinct trained checkpoints** (:func:`distinct_checkpoints`): PPO
runs with different KL targets follow the same trajectory until their KLs approach the targets
(the controller's error is clipped), so the table holds some checkpoints several times; and the
step-0 rows are the SFT policy, not a trained checkpoint of the method.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("method", "run_id", "step", "reward", "reward_se", "kl", "kl_se")


def check_results(table: pd.DataFrame, source: str = "results table") -> pd.DataFrame:
    """Raise a clear error if ``table`` lacks a required column or has non-finite reward/KL."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; has {list(table.columns)}")
    bad = ~np.isfinite(table[["reward", "kl"]].to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: non-finite reward or kl in row {row}: {table.iloc[row].to_dict()}")
    return table


def distinct_checkpoints(table: pd.DataFrame) -> pd.DataFrame:
    """The trained checkpoints (step > 0), each once.

    Rows of one method with the same reward, KL and (if present) length are the same policy
    evaluated by several runs (the evaluation is deterministic): the first is kept.
    """
    keys = ["method", "reward", "kl"] + (["length"] if "length" in table.columns else [])
    return table[table["step"] > 0].drop_duplicates(keys)


def pareto_frontier(points: pd.DataFrame, kl_column: str = "kl") -> pd.DataFrame:
    """The upper-left envelope of (KL, reward) points: each kept point beats every point of lower KL.

    Returns the frontier rows sorted by KL (ascending); reward is strictly increasing along it.
    """
    ordered = points.sort_values([kl_column, "reward"], ascending=[True, False])
    keep, best = [], -np.inf
    for index, reward in zip(ordered.index, ordered["reward"]):
        if reward > best:
            keep.append(index)
            best = reward
    return ordered.loc[keep]


def with_kl_per_token(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``kl_per_token`` column: sequence KL divided by mean completion length.

    The paper's x-axis is the sequence-level KL, which grows with the number of generated tokens;
    per token, a method that shortens its completions no longer looks cheaper. Needs ``length``.
    """
    if "length" not in table.columns:
        raise ValueError(f"KL per token needs a 'length' column; the table has {list(table.columns)}")
    return table.assign(kl_per_token=table["kl"] / table["length"].where(table["length"] > 0))


def completion_lengths(table: pd.DataFrame) -> pd.Series:
    """Mean completion length (tokens): the SFT policy's (step 0), then each method's last checkpoints."""
    last = table[table["step"] > 0].sort_values("step").groupby("run_id").tail(1)
    sft = pd.Series({"SFT (step 0)": table.loc[table["step"] == 0, "length"].mean()})
    return pd.concat([sft, last.groupby("method")["length"].mean()]).rename("mean length")


def best_reward_at_budgets(table: pd.DataFrame, budgets: Sequence[float], kl_column: str = "kl") -> pd.DataFrame:
    """For each method, the highest reward among its distinct trained checkpoints within each KL budget.

    Returns a frame indexed by method with one column per budget (NaN where no trained checkpoint
    fits: the SFT point does not count for a method).
    """
    label = "kl/token" if kl_column == "kl_per_token" else kl_column
    out = {}
    for method, group in distinct_checkpoints(table).groupby("method", sort=False):
        out[method] = {f"{label}<={b:g}": group.loc[group[kl_column] <= b, "reward"].max() for b in budgets}
    return pd.DataFrame.from_dict(out, orient="index")


def dominated_share(table: pd.DataFrame, by: str = "dpo", of: Iterable[str] = ("ppo", "ppo-gt"),
                    kl_column: str = "kl") -> pd.Series:
    """Share of each ``of`` method's distinct trained checkpoints dominated by some checkpoint of ``by``.

    A point (kl, reward) is dominated when a ``by`` point has KL no larger and reward no smaller,
    one of the two strictly. The paper's claim (Figure 2, left) is that DPO dominates all PPO
    points. ``kl_column`` chooses the KL axis (``kl`` or ``kl_per_token``).
    """
    table = distinct_checkpoints(table)
    reference = table.loc[table["method"] == by, [kl_column, "reward"]].to_numpy(dtype=float)
    shares = {}
    for method in of:
        points = table.loc[table["method"] == method, [kl_column, "reward"]].to_numpy(dtype=float)
        if len(points) == 0 or len(reference) == 0:
            shares[method] = np.nan
            continue
        le_kl = reference[None, :, 0] <= points[:, None, 0]
        ge_reward = reference[None, :, 1] >= points[:, None, 1]
        strict = (reference[None, :, 0] < points[:, None, 0]) | (reference[None, :, 1] > points[:, None, 1])
        shares[method] = float((le_kl & ge_reward & strict).any(axis=1).mean())
    return pd.Series(shares, name=f"dominated by {by}")


def reward_at_matched_kl(table: pd.DataFrame, kls: Sequence[float], kl_column: str = "kl") -> pd.DataFrame:
    """Each method's frontier read at common KL values: the fair way to compare two methods.

    Per method, the Pareto frontier of its distinct trained checkpoints is interpolated linearly
    in KL between neighbouring frontier checkpoints (reward and its standard error alike); outside
    the KL range the method's own frontier spans the value is NaN, never the SFT point or an
    extrapolation. Returns a tidy frame: ``method``, ``kl``, ``reward``, ``reward_se``.
    """
    rows = []
    for method, group in distinct_checkpoints(table).groupby("method", sort=False):
        front = pareto_frontier(group, kl_column)
        x = front[kl_column].to_numpy(dtype=float)
        for kl in kls:
            inside = x[0] <= kl <= x[-1]
            reward = np.interp(kl, x, front["reward"]) if inside else np.nan
            se = np.interp(kl, x, front["reward_se"]) if inside else np.nan
            rows.append({"method": method, "kl": float(kl), "reward": reward, "reward_se": se})
    return pd.DataFrame(rows, columns=["method", "kl", "reward", "reward_se"])


def achieved_kl(table: pd.DataFrame, methods: Iterable[str] = ("ppo", "ppo-gt"), last: int = 3) -> pd.DataFrame:
    """How close each adaptive-KL run came to its target: the KL of its last checkpoint, and the
    lowest and highest KL over its last ``last`` checkpoints. One row per run, by method and target
    (no rows when the table holds none of ``methods``)."""
    columns = ["method", "target KL", "final KL", f"min of last {last}", f"max of last {last}"]
    rows = []
    for _, run in table[table["method"].isin(list(methods))].groupby("run_id"):
        run = run.sort_values("step")
        tail = run.tail(last)["kl"]
        rows.append({"method": run["method"].iloc[0], "target KL": run["hyperparameter"].iloc[0],
                     "final KL": run["kl"].iloc[-1], f"min of last {last}": tail.min(),
                     f"max of last {last}": tail.max()})
    return pd.DataFrame(rows, columns=columns).sort_values(["method", "target KL"]).set_index("method")


def training_cost(table: pd.DataFrame) -> pd.DataFrame:
    """Each method's training cost: its number of runs, and the median and total wall time of a run in
    seconds (a run's ``wall_s`` at its last checkpoint; Best-of-N's rows share one run). Needs ``wall_s``."""
    if "wall_s" not in table.columns:
        raise ValueError(f"training cost needs a 'wall_s' column; the table has {list(table.columns)}")
    per_run = table.groupby(["method", "run_id"], sort=False)["wall_s"].max().groupby("method", sort=False)
    return pd.DataFrame({"runs": per_run.size(), "median s per run": per_run.median(), "total s": per_run.sum()})
