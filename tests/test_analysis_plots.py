"""Frontier analysis and plots on a small synthetic results table."""

import numpy as np
import pandas as pd
import pytest

from dpo_lab.analysis import (
    achieved_kl,
    best_reward_at_budgets,
    check_results,
    completion_lengths,
    distinct_checkpoints,
    dominated_share,
    pareto_frontier,
    reward_at_matched_kl,
    training_cost,
    with_kl_per_token,
)
from dpo_lab.methods import group_rows
from dpo_lab.plots import plot_frontier, plot_modern_frontier, plot_overoptimisation, plot_training_curves


def _table():
    rows = []
    for method, name, value, points in [
        ("dpo", "beta", 0.1, [(0, 0.0, 0.60), (1, 2.0, 0.80), (2, 5.0, 0.90)]),
        ("ppo", "target_kl", 6.0, [(0, 0.0, 0.60), (1, 3.0, 0.70), (2, 6.0, 0.85)]),
        ("ppo-gt", "target_kl", 6.0, [(0, 0.0, 0.60), (1, 1.0, 0.82), (2, 7.0, 0.88)]),
        ("best-of-n", "n", 4.0, [(0, 0.66, 0.75)]),
    ]:
        for step, kl, reward in points:
            rows.append({"method": method, "run_id": f"{method}/x", "hyperparameter_name": name,
                         "hyperparameter": value, "seed": 0, "step": step if method != "best-of-n" else 1,
                         "reward": reward, "reward_se": 0.01, "kl": kl, "kl_se": 0.1})
    return pd.DataFrame(rows)


def test_pareto_frontier_keeps_only_improving_points():
    points = pd.DataFrame({"kl": [1, 2, 3, 4, 0.5], "reward": [0.5, 0.4, 0.7, 0.6, 0.45]})
    frontier = pareto_frontier(points)
    assert frontier["kl"].tolist() == [0.5, 1, 3]
    assert np.all(np.diff(frontier["reward"]) > 0)


def test_best_reward_at_budgets():
    best = best_reward_at_budgets(_table(), [2, 5, 10])
    assert best.loc["dpo", "kl<=2"] == 0.80
    assert best.loc["ppo", "kl<=5"] == 0.70
    assert best.loc["ppo-gt", "kl<=10"] == 0.88


def test_dominated_share():
    share = dominated_share(_table()[lambda t: t["step"] > 0])
    # ppo (3, .70) and (6, .85) are both dominated by dpo (2, .80) and (5, .90);
    # ppo-gt (1, .82) is not, (7, .88) is dominated by (5, .90).
    assert share["ppo"] == 1.0
    assert share["ppo-gt"] == 0.5


def test_per_token_view_can_reverse_domination():
    """A method that buys reward by shortening completions looks cheap in sequence KL, not per token."""
    table = _table()[lambda t: t["step"] > 0].assign(length=20.0)
    table.loc[table["method"] == "ppo-gt", "length"] = 2.0  # (1, .82) -> 0.5 nats/token, (7, .88) -> 3.5
    per_token = with_kl_per_token(table)
    assert per_token.loc[per_token["method"] == "dpo", "kl_per_token"].tolist() == [0.1, 0.25]
    assert dominated_share(per_token, kl_column="kl_per_token")["ppo-gt"] == 1.0
    assert dominated_share(per_token)["ppo-gt"] == 0.5
    best = best_reward_at_budgets(per_token, [0.2, 1.0], kl_column="kl_per_token")
    assert best.loc["dpo", "kl/token<=0.2"] == 0.80
    assert best.loc["ppo-gt", "kl/token<=1"] == 0.82
    assert np.isnan(best.loc["ppo-gt", "kl/token<=0.2"])
    with pytest.raises(ValueError, match="length"):
        with_kl_per_token(_table())


def test_completion_lengths_give_sft_then_each_methods_last_checkpoints():
    table = _table().assign(length=10.0 + _table()["step"])  # last checkpoints: step 2, best-of-n step 1
    lengths = completion_lengths(table)
    assert lengths["SFT (step 0)"] == 10.0
    assert lengths["dpo"] == lengths["ppo"] == 12.0
    assert lengths["best-of-n"] == 11.0


def test_check_results_names_the_problem():
    with pytest.raises(ValueError, match="missing column"):
        check_results(_table().drop(columns="kl"))
    bad = _table()
    bad.loc[3, "reward"] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        check_results(bad)


def test_plots_write_png_and_svg(tmp_path):
    fig = plot_frontier(_table(), save_to=tmp_path / "frontier")
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert (tmp_path / "frontier.svg").exists()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"DPO", "PPO", "PPO-GT", "Best of N", "SFT (pi_ref)"} <= set(labels)
    fig = plot_training_curves(_table(), save_to=tmp_path / "curves")
    assert (tmp_path / "curves.png").exists()
    assert len(fig.axes) == 6


def _with_a_duplicated_run(table):
    """A second PPO run (target 9) whose first checkpoint is the target-6 run's, evaluated again."""
    twin = table[(table["method"] == "ppo") & (table["step"] <= 1)].assign(run_id="ppo/y", hyperparameter=9.0)
    later = twin.iloc[[-1]].assign(step=2, kl=9.0, reward=0.95)
    return pd.concat([table, twin, later], ignore_index=True)


def test_duplicated_checkpoints_are_counted_once():
    table = _with_a_duplicated_run(_table())
    distinct = distinct_checkpoints(table)
    assert (distinct["step"] > 0).all()
    assert len(distinct[distinct["method"] == "ppo"]) == 3  # (3, .70) once, (6, .85), (9, .95)
    # Counted twice, (3, .70) would make 3 of 4 PPO points dominated; counted once it is 2 of 3.
    assert dominated_share(table)["ppo"] == pytest.approx(2 / 3)


def test_best_at_budget_ignores_the_sft_point():
    best = best_reward_at_budgets(_table(), [0.5, 2])
    assert np.isnan(best.loc["ppo", "kl<=0.5"]) and np.isnan(best.loc["ppo", "kl<=2"])  # no trained PPO point there
    assert best.loc["dpo", "kl<=2"] == 0.80


def test_matched_kl_interpolates_each_frontier_within_its_own_range():
    table = _table()
    table.loc[(table["method"] == "dpo") & (table["step"] == 2), "reward_se"] = 0.03
    matched = reward_at_matched_kl(table, [1.0, 2.0, 3.5, 5.0, 6.5]).set_index(["method", "kl"])
    # DPO frontier: (2, .80, se .01) -> (5, .90, se .03)
    assert matched.loc[("dpo", 3.5), "reward"] == pytest.approx(0.85)
    assert matched.loc[("dpo", 3.5), "reward_se"] == pytest.approx(0.02)
    assert matched.loc[("dpo", 2.0), "reward"] == pytest.approx(0.80)
    assert np.isnan(matched.loc[("dpo", 1.0), "reward"]) and np.isnan(matched.loc[("dpo", 6.5), "reward"])
    # PPO has nothing below KL 3: no comparison at KL 2 (it used to be the SFT point's 0.60)
    assert np.isnan(matched.loc[("ppo", 2.0), "reward"])
    assert matched.loc[("ppo", 5.0), "reward"] == pytest.approx(0.70 + 0.15 * 2 / 3)


def test_no_frontier_line_outside_a_methods_own_kl_range():
    fig = plot_frontier(_table())
    trained = _table()[lambda t: t["step"] > 0]
    for line in fig.axes[0].get_lines():
        label = line.get_label()
        method = {"DPO": "dpo", "PPO": "ppo", "PPO-GT": "ppo-gt"}.get(label)
        if method is None:
            continue
        kls = trained.loc[trained["method"] == method, "kl"]
        assert min(line.get_xdata()) >= kls.min() and max(line.get_xdata()) <= kls.max()


def test_training_curve_legends_sort_numerically():
    table = pd.concat([_table().assign(run_id=f"ppo/{v}", hyperparameter=v)[lambda t: t["method"] == "ppo"]
                       for v in (12.0, 3.0, 6.0, 9.0)], ignore_index=True)
    fig = plot_training_curves(table)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["target_kl=3", "target_kl=6", "target_kl=9", "target_kl=12"]


def test_achieved_kl_reports_the_last_checkpoints_of_each_run():
    table = _with_a_duplicated_run(_table())
    kl = achieved_kl(table, last=2)
    ppo = kl.loc["ppo"].set_index("target KL")
    assert ppo.loc[6.0, "final KL"] == 6.0 and ppo.loc[6.0, "min of last 2"] == 3.0
    assert ppo.loc[9.0, "final KL"] == 9.0 and ppo.loc[9.0, "max of last 2"] == 9.0
    assert kl.loc["ppo-gt", "final KL"] == 7.0


def test_overoptimisation_plot_reads_gold_and_proxy_on_separate_axes(tmp_path):
    bon = pd.DataFrame({"hyperparameter": [1, 4, 16], "kl": [0.0, 0.64, 1.8], "reward": [0.6, 0.75, 0.8],
                        "selector_score": [0.0, 1.0, 2.0]})
    metrics = pd.DataFrame({"target": [3.0] * 6 + [6.0] * 6, "step": list(range(1, 7)) * 2,
                            "kl": np.linspace(0, 6, 12), "score": np.linspace(0, 3, 12),
                            "gold_score": np.linspace(0.6, 0.8, 12)})
    fig = plot_overoptimisation(bon, metrics, save_to=tmp_path / "over")
    assert (tmp_path / "over.png").exists()
    assert len(fig.axes) == 4  # two panels, each with a twin axis for r_phi
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes[:2])
    assert "r_phi" in fig.axes[2].get_ylabel() and "r*" in fig.axes[0].get_ylabel()
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels == ["target 3: r*", "target 6: r*", "target 3: r_phi", "target 6: r_phi"]


def test_methods_crowded_near_the_sft_point_get_a_zoomed_inset():
    crowded = pd.DataFrame([{"method": m, "run_id": f"{m}/x", "hyperparameter_name": "seed", "hyperparameter": 0.0,
                             "seed": 0, "step": 1, "reward": r, "reward_se": 0.01, "kl": kl, "kl_se": 0.05}
                            for m, kl, r in (("unlikelihood", 0.5, 0.62), ("preferred-ft", 0.55, 0.63))])
    fig = plot_frontier(pd.concat([_table(), crowded], ignore_index=True))
    (inset,) = fig.axes[0].child_axes
    assert "Preferred-FT" in inset.get_title() and "Unlikelihood" in inset.get_title()
    assert "DPO" not in inset.get_title()  # spread over the KL axis: no zoom needed


def _modern_table():
    """The synthetic table plus one offline and one online method since the paper, with run times."""
    rows = [{"method": method, "run_id": f"{method}/x", "hyperparameter_name": "beta", "hyperparameter": 0.1,
             "seed": 0, "step": step, "reward": reward, "reward_se": 0.01, "kl": kl, "kl_se": 0.1}
            for method, points in [("ipo", [(0, 0.0, 0.60), (1, 1.5, 0.78)]),
                                   ("grpo-gt", [(0, 0.0, 0.60), (1, 4.0, 0.86), (2, 8.0, 0.95)])]
            for step, kl, reward in points]
    table = pd.concat([_table(), pd.DataFrame(rows)], ignore_index=True)
    return table.assign(wall_s=table["step"] * 10.0 + np.where(table["method"] == "grpo-gt", 5.0, 0.0))


def test_training_cost_is_the_wall_time_of_each_run():
    table = _modern_table()
    second_run = table[table["method"] == "dpo"].assign(run_id="dpo/y", wall_s=lambda t: t["step"] * 30.0)
    cost = training_cost(pd.concat([table, second_run]))
    assert cost.loc["dpo", "runs"] == 2 and cost.loc["dpo", "median s per run"] == 40.0  # runs of 20 s and 60 s
    assert cost.loc["grpo-gt", "total s"] == 25.0
    with pytest.raises(ValueError, match="wall_s"):
        training_cost(table.drop(columns="wall_s"))


def test_the_paper_panel_keeps_the_paper_methods_and_the_second_panel_the_modern_ones():
    table = _modern_table()
    paper = group_rows(table, "paper")
    assert set(paper["method"]) == {"dpo", "ppo", "ppo-gt", "best-of-n"}
    assert set(group_rows(table, "modern")["method"]) == {"ipo", "grpo-gt"}
    fig = plot_modern_frontier(table)
    offline, online = fig.axes
    assert [t.get_text() for t in offline.get_legend().get_texts()] == ["DPO (the paper's)", "IPO", "SFT (pi_ref)"]
    assert [t.get_text() for t in online.get_legend().get_texts()] == ["DPO (the paper's)", "GRPO-GT", "SFT (pi_ref)"]
    styles = {line.get_label(): line.get_linestyle() for line in online.get_lines()}
    assert styles["GRPO-GT"] == ":" and styles["DPO (the paper's)"] == "-"  # online dashed; on the ground truth dotted


def test_the_analysis_adds_a_section_for_the_methods_since_the_paper():
    from dpo_lab.frontier import analysis_text
    from dpo_lab.profiles import get_profile

    table = _modern_table().assign(length=20.0)
    text = analysis_text(get_profile("ci"), table)
    paper_only = analysis_text(get_profile("ci"), group_rows(table, "paper"))
    assert text.startswith(paper_only) and "## Methods since the paper" not in paper_only
    modern = text[len(paper_only):]
    assert "## Methods since the paper" in modern and "Training cost" in modern
    assert "grpo-gt" in modern and "ipo" in modern


@pytest.mark.parametrize("methods", [["dpo"], ["best-of-n"]])
def test_a_sweep_without_ppo_still_gets_its_report(tmp_path, monkeypatch, methods):
    from dpo_lab.frontier import analysis_text, write_report
    from dpo_lab.profiles import get_profile

    monkeypatch.setenv("DPO_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("DPO_LAB_RESULTS", str(tmp_path / "results"))
    table = _table().assign(length=20.0, wall_s=1.0)
    table = table[table["method"].isin(methods)]
    assert achieved_kl(table).empty
    assert "KL reached by the adaptive controller" in analysis_text(get_profile("ci"), table)
    written = write_report(get_profile("ci"), table)
    assert all(path.exists() for path in written)
