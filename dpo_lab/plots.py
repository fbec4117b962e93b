"""Figures: the reward-vs-KL frontier in the style of the paper's Figure 2 (left), and training curves.

Every function takes a results table (one row per checkpoint, see :mod:`dpo_lab.analysis`),
returns the matplotlib ``Figure``, and with ``save_to`` writes it as PNG and SVG.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dpo_lab.analysis import check_results, pareto_frontier

METHOD_STYLE = {
    "dpo": ("DPO", "tab:red", "o"),
    "ipo": ("IPO", "tab:pink", "o"),
    "cdpo": ("cDPO", "tab:purple", "o"),
    "hinge": ("SLiC (hinge)", "tab:olive", "o"),
    "robust": ("rDPO", "tab:cyan", "o"),
    "ppo": ("PPO", "tab:blue", "s"),
    "ppo-gt": ("PPO-GT", "tab:green", "s"),
    "unlikelihood": ("Unlikelihood", "tab:orange", "^"),
    "preferred-ft": ("Preferred-FT", "tab:brown", "v"),
    "best-of-n": ("Best of N", "tab:gray", "D"),
}


def method_style(method: str) -> tuple[str, str, str]:
    """(label, colour, marker) of a method; unknown methods get a neutral style."""
    return METHOD_STYLE.get(method, (method, "black", "x"))


def save_figure(fig: plt.Figure, save_to: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<save_to>.png`` and ``<save_to>.svg``; returns the two paths."""
    stem = Path(save_to).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    with plt.rc_context({"svg.hashsalt": "dpo-lab"}):  # fixed ids and no timestamp: redraws are identical
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    return paths


def plot_frontier(table: pd.DataFrame, title: str = "Reward vs KL (IMDb sentiment)",
                  save_to: str | os.PathLike | None = None, ax: plt.Axes | None = None) -> plt.Figure:
    """Every checkpoint as a point with standard-error bars; each method's Pareto frontier as a line.

    The SFT policy (step 0 rows) is drawn once as a black star, and each frontier starts from it.
    Best-of-N is drawn as a curve in order of N rather than as a frontier.
    """
    table = check_results(table)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 5))
    for method, group in table.groupby("method", sort=False):
        label, colour, marker = method_style(method)
        trained = group[group["step"] > 0]
        ax.errorbar(trained["kl"], trained["reward"], xerr=trained["kl_se"], yerr=trained["reward_se"], fmt=marker,
                    color=colour, alpha=0.45, markersize=5, elinewidth=0.8, linestyle="none")
        line = group.sort_values("hyperparameter") if method == "best-of-n" else pareto_frontier(group)
        ax.plot(line["kl"], line["reward"], color=colour, linewidth=2, label=label)
    sft = table[table["step"] == 0]
    if len(sft):
        ax.errorbar(sft["kl"].mean(), sft["reward"].mean(), yerr=sft["reward_se"].mean(), fmt="*",
                    color="black", markersize=14, label="SFT (pi_ref)", zorder=5)
    ax.set_xlabel("KL(pi || pi_ref)  [sequence level, nats]")
    ax.set_ylabel("ground-truth reward  p(positive)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=9)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


def plot_training_curves(table: pd.DataFrame, save_to: str | os.PathLike | None = None) -> plt.Figure:
    """Reward and KL against training step, one line per run, one column per method."""
    table = check_results(table)
    sns.set_theme(style="whitegrid", context="notebook")
    methods = list(dict.fromkeys(table.loc[table["method"] != "best-of-n", "method"]))
    fig, axes = plt.subplots(2, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 5.5),
                             squeeze=False, sharey="row")
    for col, method in enumerate(methods):
        label, colour, _ = method_style(method)
        for run_id, run in table[table["method"] == method].groupby("run_id"):
            run = run.sort_values("step")
            name = f"{run['hyperparameter_name'].iloc[0]}={run['hyperparameter'].iloc[0]:g}" \
                if "hyperparameter" in run else run_id
            axes[0, col].plot(run["step"], run["reward"], marker=".", label=name)
            axes[1, col].plot(run["step"], run["kl"], marker=".", label=name)
        axes[0, col].set_title(label, color=colour)
        axes[1, col].set_xlabel("step")
        axes[0, col].legend(fontsize=7)
    axes[0, 0].set_ylabel("reward")
    axes[1, 0].set_ylabel("KL")
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig
