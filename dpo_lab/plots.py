"""Figures: the reward-vs-KL frontier in the style of the paper's Figure 2 (left), and training curves.

Every function takes a results table (one row per checkpoint, see :mod:`dpo_lab.analysis`),
returns the matplotlib ``Figure``, and with ``save_to`` writes it as PNG and SVG.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler

from dpo_lab.analysis import check_results, distinct_checkpoints, pareto_frontier
from dpo_lab.methods import REGISTRY, family, is_curve, style


def theme() -> dict:
    """The rc settings of the package's seaborn look (whitegrid, notebook context, the "deep" palette)."""
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"), "font.family": ["sans-serif"],
            "axes.prop_cycle": cycler("color", sns.color_palette("deep"))}


def styled(draw):
    """Run ``draw`` under :func:`theme` in an ``rc_context``, leaving matplotlib's global settings untouched."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with plt.rc_context(theme()):
            return draw(*args, **kwargs)
    return wrapper


def save_figure(fig: plt.Figure, save_to: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as ``<save_to>.png`` and ``<save_to>.svg``; returns the two paths."""
    stem = Path(save_to).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    with plt.rc_context({"svg.hashsalt": "dpo-lab"}):  # fixed ids and no timestamp: redraws are identical
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    return paths


LINE_STYLES = {"paper": "-", "offline": "-", "online": "--"}
"""Frontier line style per method family: online methods dashed (dotted when trained on the ground truth)."""


def draw_method(ax: plt.Axes, method: str, group: pd.DataFrame, label: str | None = None,
                faint: bool = False) -> None:
    """One method's trained checkpoints (hollow markers, standard-error bars) and its frontier or curve.

    ``faint``: drawn light, as a reference behind other methods.
    """
    _, colour, marker = style(method)
    trained = group[group["step"] > 0]
    ax.errorbar(trained["kl"], trained["reward"], xerr=trained["kl_se"], yerr=trained["reward_se"], fmt=marker,
                color=colour, alpha=0.25 if faint else 0.75, markersize=6, markerfacecolor="none",
                markeredgewidth=1.2, elinewidth=0.6, linestyle="none", zorder=3)
    line = group.sort_values("hyperparameter") if is_curve(method) else pareto_frontier(distinct_checkpoints(group))
    line_style = ":" if family(method) == "online" and REGISTRY[method].oracle else LINE_STYLES[family(method)]
    ax.plot(line["kl"], line["reward"], line_style, color=colour, linewidth=3 if faint else 2,
            alpha=0.35 if faint else 1.0, label=label)


def draw_sft(ax: plt.Axes, table: pd.DataFrame) -> None:
    """The SFT policy (every run's step-0 row) as one black star."""
    sft = table[table["step"] == 0]
    if len(sft):
        ax.errorbar(sft["kl"].mean(), sft["reward"].mean(), yerr=sft["reward_se"].mean(), fmt="*",
                    color="black", markersize=14, label="SFT (pi_ref)", zorder=5)


def label_frontier_axes(ax: plt.Axes, title: str) -> None:
    """The axis labels, title and legend every frontier panel shares."""
    ax.set_xlabel("KL(pi || pi_ref)  [sequence level, nats]")
    ax.set_ylabel("ground-truth reward  p(positive)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)


@styled
def plot_frontier(table: pd.DataFrame, title: str = "Reward vs KL (IMDb sentiment)",
                  save_to: str | os.PathLike | None = None, ax: plt.Axes | None = None) -> plt.Figure:
    """Every checkpoint as a point with standard-error bars; each method's Pareto frontier as a line.

    Points are hollow, in each method's marker shape. Methods whose checkpoints all sit within the
    first quarter of the KL axis (Unlikelihood and Preferred-FT, near the SFT point) are drawn again
    in an inset that zooms on them, so that no series hides another. The SFT policy (step 0 rows)
    is drawn once as a black star. A method's frontier joins its own distinct trained checkpoints
    only, so no line crosses a KL range where the method has none. Best-of-N is drawn as a curve
    in order of N rather than as a frontier.
    """
    table = check_results(table)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 5))
    groups = dict(list(table.groupby("method", sort=False)))
    for method, group in groups.items():
        draw_method(ax, method, group, label=style(method)[0])
    draw_sft(ax, table)
    compact = [m for m, g in groups.items() if not is_curve(m) and g["kl"].max() < 0.25 * table["kl"].max()]
    if compact:
        inset = ax.inset_axes([0.43, 0.05, 0.27, 0.27])
        for method in compact:
            draw_method(inset, method, groups[method])
        inset.set_title("zoom: " + ", ".join(style(m)[0] for m in compact), fontsize=7)
        inset.tick_params(labelsize=7)
    label_frontier_axes(ax, title)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


@styled
def plot_modern_frontier(table: pd.DataFrame, title: str = "Methods since the paper",
                         save_to: str | os.PathLike | None = None) -> plt.Figure:
    """The second panel: the offline methods since the paper (left, solid lines) and the online ones
    (right, dashed; ``-GT``, trained on the ground truth: dotted, star markers), each beside the paper's
    DPO (faint) and the SFT policy, on shared axes. Points and frontiers as in :func:`plot_frontier`.
    The KL axis is linear up to 10 nats and logarithmic beyond, so that runs far past the paper's
    range stay visible without squeezing the range where the methods differ.
    """
    table = check_results(table)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True, sharey=True)
    dpo = table[table["method"] == "dpo"]
    for ax, which in zip(axes, ("offline", "online")):
        if len(dpo):
            draw_method(ax, "dpo", dpo, label="DPO (the paper's)", faint=True)
        for method, rows in table[table["method"].map(family) == which].groupby("method", sort=False):
            draw_method(ax, method, rows, label=style(method)[0])
        draw_sft(ax, table)
        label_frontier_axes(ax, f"{title}: {which}")
        ax.set_xscale("symlog", linthresh=10.0, linscale=2.0)
        ax.set_xlabel("KL(pi || pi_ref)  [sequence level, nats; linear to 10, log beyond]")
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


@styled
def plot_training_curves(table: pd.DataFrame, save_to: str | os.PathLike | None = None) -> plt.Figure:
    """Reward and KL against training step, one line per run, one column per method."""
    table = check_results(table)
    methods = [m for m in dict.fromkeys(table["method"]) if not is_curve(m)]
    fig, axes = plt.subplots(2, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 5.5),
                             squeeze=False, sharey="row")
    for col, method in enumerate(methods):
        label, colour, _ = style(method)
        runs = table[table["method"] == method].sort_values(["hyperparameter", "seed", "step"], kind="stable")
        for run_id, run in runs.groupby("run_id", sort=False):  # legends in numeric order of the hyperparameter
            name = f"{run['hyperparameter_name'].iloc[0]}={run['hyperparameter'].iloc[0]:g}" \
                if "hyperparameter" in run else run_id
            axes[0, col].plot(run["step"], run["reward"], marker=".", label=name)
            axes[1, col].plot(run["step"], run["kl"], marker=".", label=name)
        axes[0, col].set_title(label, color=colour)
        axes[1, col].set_xlabel("training step")
        axes[0, col].legend(fontsize=7)
    axes[0, 0].set_ylabel("ground-truth reward  p(positive)")
    axes[1, 0].set_ylabel("sequence KL  [nats]")
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


@styled
def plot_score_gaps(gaps: np.ndarray, save_to: str | os.PathLike | None = None) -> plt.Figure:
    """Histogram of r*(x, y_w) - r*(x, y_l) over the preference pairs (``gaps``: (N,))."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps, bins=50, range=(0.0, 1.0), color="tab:blue")
    ax.set_xlabel("ground-truth score gap  r*(x, y_w) - r*(x, y_l)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{len(gaps):,} preference pairs: median gap {np.median(gaps):.3f}")
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


@styled
def plot_overoptimisation(best_of_n: pd.DataFrame, ppo_metrics: pd.DataFrame,
                          save_to: str | os.PathLike | None = None) -> plt.Figure:
    """Gold reward r* and proxy reward r_phi against KL, in the style of Gao et al. (2022), Figure 1.

    Left: Best-of-N selected by r_phi (``best_of_n``: rows with ``hyperparameter`` = N, ``kl``,
    ``reward`` = r* and ``selector_score`` = r_phi of the kept draws). Right: PPO against r_phi,
    one colour per target KL (``ppo_metrics``: per iteration ``target``, ``step``, ``kl``,
    ``score`` = r_phi and ``gold_score`` = r* of the same rollouts), smoothed over 5 iterations.
    r* (solid) is read on the left axis of each panel, r_phi (dashed) on the right one: the two
    have different scales, and over-optimisation shows as r_phi still rising where r* has stopped.
    """
    fig, (bon_ax, ppo_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    bon = best_of_n.sort_values("kl")
    bon_ax.plot(bon["kl"], bon["reward"], "o-", color="black", label="r* (gold)")
    bon_proxy = bon_ax.twinx()
    bon_proxy.plot(bon["kl"], bon["selector_score"], "s--", color="tab:gray", label="r_phi (proxy)")
    for n, kl, reward in zip(bon["hyperparameter"], bon["kl"], bon["reward"]):
        bon_ax.annotate(f"N={n:g}", (kl, reward), textcoords="offset points", xytext=(4, -10), fontsize=7)
    bon_ax.set_title("Best-of-N selected by r_phi")
    ppo_proxy = ppo_ax.twinx()
    targets = sorted(ppo_metrics["target"].unique())
    for target, colour in zip(targets, sns.color_palette("viridis", len(targets))):
        run = ppo_metrics[ppo_metrics["target"] == target].sort_values("step")
        smooth = run[["kl", "score", "gold_score"]].rolling(5, min_periods=1).mean()
        ppo_ax.plot(smooth["kl"], smooth["gold_score"], "-", color=colour, label=f"target {target:g}: r*")
        ppo_proxy.plot(smooth["kl"], smooth["score"], "--", color=colour, label=f"target {target:g}: r_phi")
    ppo_ax.set_title("PPO against r_phi (training rollouts)")
    for gold_ax, proxy_ax in ((bon_ax, bon_proxy), (ppo_ax, ppo_proxy)):
        gold_ax.set_xlabel("KL(pi || pi_ref)  [sequence level, nats]")
        gold_ax.set_ylabel("gold reward r*  p(positive)  (solid)")
        proxy_ax.set_ylabel("proxy reward r_phi  [reward-model units]  (dashed)")
        proxy_ax.grid(False)
        lines = gold_ax.get_lines() + proxy_ax.get_lines()
        gold_ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower right")
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


@styled
def plot_temperature(frame: pd.DataFrame, save_to: str | os.PathLike | None = None) -> plt.Figure:
    """The temperature experiment (:mod:`dpo_lab.temperature`): mean ground-truth reward (left) and win rate
    against pi_SFT's samples at temperature 1 (right) against the sampling temperature, one line per policy,
    with standard-error bars."""
    fig, (reward_ax, win_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2), sharex=True)
    for policy, rows in frame.groupby("policy", sort=False):
        method = rows["method"].iloc[0]
        _, colour, marker = style(method) if method != "sft" else ("SFT", "black", "*")
        rows = rows.sort_values("temperature")
        for ax, column in ((reward_ax, "reward"), (win_ax, "win_rate")):
            ax.errorbar(rows["temperature"], rows[column], yerr=rows[f"{column}_se"], fmt=f"{marker}-",
                        color=colour, label=policy, capsize=3)
    win_ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    reward_ax.set_ylabel("ground-truth reward  p(positive)")
    win_ax.set_ylabel("win rate against SFT samples at T = 1")
    for ax in (reward_ax, win_ax):
        ax.set_xlabel("sampling temperature")
        ax.legend(fontsize=8)
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


@styled
def plot_fluency(table: pd.DataFrame, save_to: str | os.PathLike | None = None) -> plt.Figure:
    """Ground-truth reward against the judge's perplexity (log scale; lower is more fluent), one panel per
    method family: each run's evaluated checkpoints joined in training order, so reward hacking shows as a
    path that gains reward while its perplexity climbs. ``table``: results rows with ``fluency`` columns
    (:func:`dpo_lab.fluency.with_fluency`); rows without a fluency are left out."""
    table = table[np.isfinite(table["fluency"].to_numpy(dtype=float))]
    families = [f for f in ("paper", "offline", "online") if any(family(m) == f for m in table["method"])]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(6 * max(len(families), 1), 4.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, which in zip(axes[0], families):
        for method, rows in table[table["method"].map(family) == which].groupby("method", sort=False):
            label, colour, marker = style(method)
            for number, (_, run) in enumerate(rows.sort_values("step").groupby("run_id", sort=False)):
                ax.plot(run["fluency"], run["reward"], f"{marker}{LINE_STYLES[which]}", color=colour, alpha=0.7,
                        markerfacecolor="none", label=label if number == 0 else None)
        sft = table[table["step"] == 0]
        ax.plot(sft["fluency"].mean(), sft["reward"].mean(), "*", color="black", markersize=14, label="SFT (pi_ref)")
        ax.set_xscale("log")
        ax.set_xlabel("judge perplexity of prompt + completion  (log scale; lower reads better)")
        ax.set_title({"paper": "the paper's methods", "offline": "offline, since the paper",
                      "online": "online, since the paper"}[which])
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("ground-truth reward  p(positive)")
    fig.tight_layout()
    if save_to is not None:
        save_figure(fig, save_to)
    return fig
