"""The frontier runner on the ci profile: a cut-down sweep end to end, killed mid-way and resumed."""

import pandas as pd
import pytest

from dpo_lab import frontier
from dpo_lab.frontier import COLUMNS, Pipeline, results_path, run_sweep, sweep_entries, write_report
from dpo_lab.profiles import get_profile


@pytest.fixture()
def results_folder(tmp_path, monkeypatch):
    """Results and figures go to a temporary project folder, never the committed data/results."""
    monkeypatch.setenv("DPO_LAB_RESULTS", str(tmp_path / "results"))
    return tmp_path


def test_sweep_entries_mirror_the_profile_and_reject_unknown_methods():
    profile = get_profile("ci")
    entries = sweep_entries(profile)
    assert {e.method for e in entries} == set(frontier.METHODS)
    assert [e.hyperparameter for e in entries if e.method == "ppo"] == list(profile.sweep.ppo_target_kls)
    with pytest.raises(ValueError, match="unknown method"):
        sweep_entries(profile, ["dpo", "rlhf"])


def test_cut_down_sweep_runs_end_to_end_and_survives_a_kill(ci_world, results_folder, monkeypatch):
    profile = get_profile("ci")
    methods = ["dpo", "ppo-gt", "preferred-ft", "best-of-n"]
    real_run = Pipeline.run
    calls = []

    def killed_after_two(self, entry):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-sweep")
        calls.append(entry)
        return real_run(self, entry)

    monkeypatch.setattr(Pipeline, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(profile, methods, progress=False)
    partial = pd.read_csv(results_path("ci"))
    assert set(partial["method"]) == {calls[0].method, calls[1].method}  # finished runs are on disk

    monkeypatch.setattr(Pipeline, "run", real_run)
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
    monkeypatch.setattr(Pipeline, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(profile, methods, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(results_path("ci")), table)
    monkeypatch.setattr(Pipeline, "run", real_run)

    # Rows of a setting no longer in the sweep are dropped when the sweep completes.
    stale = table[table["method"] == "dpo"].assign(hyperparameter=99.0)
    frontier.write_results(pd.concat([table, stale]), results_path("ci"))
    pd.testing.assert_frame_equal(run_sweep(profile, methods, progress=False), table)

    written = write_report(profile, table)
    assert all(path.exists() for path in written)
    report = written[-1].read_text()
    assert "dominated by a DPO checkpoint" in report and "KL per token" in report and "SFT (step 0)" in report
