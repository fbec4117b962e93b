"""The frontier runner on the ci profile: a cut-down sweep end to end, killed mid-way and resumed."""

import dataclasses
import shutil

import pandas as pd
import pytest

from dpo_lab import cli, frontier, methods, storage, workers
from dpo_lab.frontier import COLUMNS, SweepEntry, results_path, run_sweep, sweep_entries, write_report
from dpo_lab.methods import Method
from dpo_lab.plots import plot_frontier
from dpo_lab.profiles import get_profile
from dpo_lab.train.dpo import train_offline


@pytest.fixture()
def results_folder(tmp_path, monkeypatch):
    """Results and figures go to a temporary project folder, never the committed data/results."""
    monkeypatch.setenv("DPO_LAB_RESULTS", str(tmp_path / "results"))
    return tmp_path


def test_sweep_entries_mirror_the_profile_and_reject_unknown_methods():
    profile = get_profile("ci")
    entries = sweep_entries(profile)
    assert {e.method for e in entries} == {"dpo", "ppo", "ppo-gt", "unlikelihood", "preferred-ft", "best-of-n"}
    assert [e.hyperparameter for e in entries if e.method == "ppo"] == list(profile.sweep.ppo_target_kls)
    with pytest.raises(ValueError, match="unknown method"):
        sweep_entries(profile, ["dpo", "rlhf"])


def test_groups_name_the_paper_the_modern_and_all_methods():
    profile = get_profile("ci")
    paper = {e.method for e in sweep_entries(profile, ["paper"])}
    modern = {e.method for e in sweep_entries(profile, ["modern"])}
    assert paper == {e.method for e in sweep_entries(profile)}  # the default sweep is the paper's
    assert modern == {"ipo", "cdpo", "hinge", "robust", "simpo", "orpo", "kto", "rloo", "rloo-gt", "grpo", "grpo-gt",
                      "online-dpo", "online-dpo-gt"}
    assert {e.method for e in sweep_entries(profile, ["all"])} == paper | modern
    assert [e.method for e in sweep_entries(profile, ["kto", "modern"])].count("kto") == 1  # no run twice
    assert [e.hyperparameter for e in sweep_entries(profile, ["grpo-gt"])] == list(profile.sweep.grpo_betas)


def test_a_sweep_run_gets_its_method_s_default_options(monkeypatch):
    """cDPO and rDPO differ from DPO only through a label-flip rate: their sweep runs use 0.1, DPO's none."""
    seen = {}

    def record(name):
        def train(pipeline, request):
            seen[name] = request.options
            return pd.DataFrame()
        return train

    for name in ("dpo", "cdpo", "robust", "simpo", "rloo"):
        monkeypatch.setitem(methods.REGISTRY, name, dataclasses.replace(methods.REGISTRY[name], train=record(name)))
        SweepEntry(name, "beta", 0.1).run(None, None, False)
    assert seen["cdpo"]["label_smoothing"] == seen["robust"]["label_smoothing"] == 0.1
    assert seen["dpo"]["label_smoothing"] == 0.0
    assert seen["simpo"] == {"gamma": 0.5} and seen["rloo"] == {}


def test_cut_down_sweep_runs_end_to_end_and_survives_a_kill(ci_world, results_folder, monkeypatch):
    profile = get_profile("ci")
    methods = ["dpo", "ppo-gt", "preferred-ft", "best-of-n"]
    real_run = SweepEntry.run
    calls = []

    def killed_after_two(entry, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-sweep")
        calls.append(entry)
        return real_run(entry, *args)

    monkeypatch.setattr(SweepEntry, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(profile, methods, progress=False)
    partial = pd.read_csv(results_path("ci"))
    assert set(partial["method"]) == {calls[0].method, calls[1].method}  # finished runs are on disk

    monkeypatch.setattr(SweepEntry, "run", real_run)
    table = run_sweep(profile, methods, progress=False)
    again = run_sweep(profile, methods, progress=False)
    pd.testing.assert_frame_equal(table, again)
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert set(table["method"]) == set(methods)
    for _, rows in partial.groupby("run_id"):
        merged = table[table["run_id"] == rows["run_id"].iloc[0]].reset_index(drop=True)
        pd.testing.assert_frame_equal(rows[COLUMNS].reset_index(drop=True), merged[COLUMNS], check_dtype=False)

    # A rerun killed after its first entry leaves every finished run's rows in the table.
    calls.clear()
    calls.append(None)
    monkeypatch.setattr(SweepEntry, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(profile, methods, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(results_path("ci")), table)
    monkeypatch.setattr(SweepEntry, "run", real_run)

    # Rows of a setting no longer in the sweep are dropped when the sweep completes.
    stale = table[table["method"] == "dpo"].assign(hyperparameter=99.0)
    frontier.write_results(pd.concat([table, stale]), results_path("ci"))
    pd.testing.assert_frame_equal(run_sweep(profile, methods, progress=False), table)

    # A finished run whose evaluations.csv was lost is trained again: the table keeps its rows (all but the timing).
    dpo_run = table.loc[table["method"] == "dpo", "run_id"].iloc[0]
    (storage.profile_dir("ci") / "runs" / dpo_run / "evaluations.csv").unlink()
    rerun = run_sweep(profile, methods, progress=False)
    pd.testing.assert_frame_equal(rerun.drop(columns="wall_s"), table.drop(columns="wall_s"))

    written = write_report(profile, table)
    assert all(path.exists() for path in written)
    report = written[-1].read_text()
    assert "dominated by a DPO checkpoint" in report and "KL per token" in report and "SFT (step 0)" in report


def train_short_preferred_ft(pipeline, request):
    """A toy method: Preferred-FT stopped after ``request.value`` steps, evaluated every 2 steps."""
    spec = dataclasses.replace(pipeline.profile.offline, max_steps=int(request.value), eval_every=2, seed=request.seed)
    run = train_offline(pipeline.world, pipeline.pairs, "preferred-ft", overrides=spec, progress=False)
    return run.evaluations().assign(method="short-sft", hyperparameter_name="steps", hyperparameter=request.value)


def test_a_registered_method_joins_the_sweep_the_cli_and_the_plot(ci_world, results_folder, monkeypatch, capsys):
    """Adding a method is one registry entry plus its training function (the README's example)."""
    toy = Method("short-sft", "Preferred-FT for a few steps", "Short SFT", "tab:cyan", "P", "steps",
                 lambda profile: (4.0,), train_short_preferred_ft, default=4.0, spec_section="offline")
    monkeypatch.setitem(methods.REGISTRY, toy.name, toy)
    profile = get_profile("ci")
    assert "short-sft" in methods.swept_methods(profile)
    table = run_sweep(profile, ["dpo", "short-sft"], progress=False)
    toy_rows = table[table["method"] == "short-sft"]
    assert toy_rows["step"].tolist() == [0, 2, 4] and (toy_rows["hyperparameter"] == 4.0).all()
    sft_point = table[(table["method"] == "dpo") & (table["step"] == 0)]["reward"].item()
    assert toy_rows["reward"].iloc[0] == sft_point  # every method starts from the same evaluated pi_SFT
    legend = [text.get_text() for text in plot_frontier(table).axes[0].get_legend().get_texts()]
    assert "Short SFT" in legend and "DPO" in legend
    assert cli.main(["train", "--help"]) == 0 and "short-sft" in capsys.readouterr().out


PARALLEL_METHODS = ["dpo", "ppo-gt", "preferred-ft"]
"""A cut-down sweep (4 runs: DPO, PPO-GT at two targets, Preferred-FT), run sequentially as the reference."""
JOB_METHODS = ["dpo", "ppo-gt"]
"""The runs `--jobs 2` trains (3: the offline trainer and PPO, 2 at a time)."""
RAY_METHODS = ["dpo", "preferred-ft"]
"""The runs Ray trains (2, at once on its 2 CPUs)."""


@pytest.fixture(scope="module")
def sequential_table(ci_world, tmp_path_factory):
    """The cut-down sweep run one run after another, in this session's cache; results in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPO_LAB_RESULTS", str(tmp_path_factory.mktemp("sequential") / "results"))
        return run_sweep(get_profile("ci"), PARALLEL_METHODS, progress=False)


@pytest.fixture()
def upstream_only(ci_world, tmp_path, monkeypatch):
    """A fresh cache holding a copy of this session's `ci` upstream artifacts and no runs, so every run trains."""
    home = tmp_path / "home" / "ci"
    shutil.copytree(storage.profile_dir("ci"), home, ignore=shutil.ignore_patterns("runs", ".locks"))
    monkeypatch.setenv("DPO_LAB_HOME", str(home.parent))
    monkeypatch.setenv("DPO_LAB_RESULTS", str(tmp_path / "results"))
    return home


def assert_same_table(table, sequential):
    """Every column but the training time (``wall_s``) equal, row by row."""
    assert not (table["wall_s"] == 0).all()  # the runs did train here
    pd.testing.assert_frame_equal(table.drop(columns="wall_s"), sequential.drop(columns="wall_s"))


def test_two_jobs_reproduce_the_sequential_table(sequential_table, upstream_only):
    table = run_sweep(get_profile("ci"), JOB_METHODS, progress=False, jobs=2)
    assert_same_table(table, sequential_table[sequential_table["method"].isin(JOB_METHODS)].reset_index(drop=True))
    assert (upstream_only / "runs" / "dpo").is_dir()  # trained in the fresh cache, not found in the session's


def test_ray_tasks_reproduce_the_sequential_table(sequential_table, upstream_only):
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # its workers inherit DPO_LAB_HOME
    try:
        table = run_sweep(get_profile("ci"), RAY_METHODS, progress=False, ray_address="auto")
    finally:
        ray.shutdown()
    assert_same_table(table, sequential_table[sequential_table["method"].isin(RAY_METHODS)].reset_index(drop=True))
    assert (upstream_only / "runs" / "preferred-ft").is_dir()


def test_job_threads_share_the_cores_without_exceeding_the_profile():
    tiny, ci = get_profile("tiny"), get_profile("ci")
    assert workers.job_threads(tiny, jobs=2, cores=2) == 1
    assert workers.job_threads(tiny, jobs=2, cores=16) == 2  # the profile's setting caps the share
    assert workers.job_threads(ci, jobs=4, cores=2) == 1
    assert workers.job_threads(tiny.replace(threads=0), jobs=4, cores=16) == 4
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_sweep(ci, ["dpo"], jobs=0)


def _rows(method, value):
    return pd.DataFrame([{"profile": "ci", "run_id": f"{method}/{value}", "method": method,
                          "hyperparameter_name": "beta", "hyperparameter": value, "seed": 0, "step": step,
                          "reward": 0.5 + step, "reward_se": 0.1, "kl": float(step), "kl_se": 0.1}
                         for step in (0, 1)])


def test_two_sweeps_of_different_methods_at_once_keep_each_others_rows(tmp_path):
    path = tmp_path / "frontier.csv"
    dpo, unlikelihood = frontier.ResultsTable(path, ["dpo"]), frontier.ResultsTable(path, ["unlikelihood"])
    dpo.add(SweepEntry("dpo", "beta", 0.1), _rows("dpo", 0.1))
    unlikelihood.add(SweepEntry("unlikelihood", "alpha", 0.5), _rows("unlikelihood", 0.5))
    dpo.add(SweepEntry("dpo", "beta", 0.3), _rows("dpo", 0.3))
    dpo.close()
    unlikelihood.close()
    table = frontier.read_results(path)
    assert table.groupby("method")["hyperparameter"].unique().map(sorted).to_dict() == {
        "dpo": [0.1, 0.3], "unlikelihood": [0.5]}


@pytest.mark.parametrize("cut, problem", [(lambda text: "", "is unreadable"),
                                          (lambda text: text[:-4], "is cut short")])
def test_a_damaged_results_table_stops_the_sweep_before_it_starts(tmp_path, cut, problem):
    path = tmp_path / "frontier.csv"
    frontier.write_results(_rows("dpo", 0.1), path)
    path.write_text(cut(path.read_text()))
    with pytest.raises(ValueError, match=rf"frontier.csv {problem}.*delete it"):
        frontier.ResultsTable(path, ["dpo"])
