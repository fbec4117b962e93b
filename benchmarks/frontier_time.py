"""Time the whole frontier of a profile from an empty cache, stage by stage, as a user runs it.

    python benchmarks/frontier_time.py --profile tiny --jobs 2     # what the README reports (2 cores)

Runs ``dpo-lab prepare``, ``dpo-lab preferences``, ``dpo-lab reward`` and ``dpo-lab frontier
--jobs N`` one after another, each as its own command, in a fresh temporary cache, results and
figures folder (never ``data/``), and prints each stage's wall time and the total. The frontier
stage also writes the table and figures; the table is compared with the committed one
(``data/results/<profile>/frontier.csv``), column by column, so the run says whether it
reproduced the committed numbers, and the least time any schedule of these runs on N jobs could take
(:func:`schedule_bound`): how much of the frontier's time is the work itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from dpo_lab.analysis import training_cost

ROOT = Path(__file__).resolve().parents[1]


def stage(name: str, args: list[str], env: dict[str, str]) -> float:
    """Run ``dpo-lab <args>``; its wall time in seconds (the command's output goes to a log file)."""
    log = Path(env["DPO_LAB_HOME"]) / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, "-m", "dpo_lab.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{name} failed (exit {result.returncode}); see {log}")
    print(f"  {name:<12} {seconds:7.1f} s", flush=True)
    return seconds


def compare(table: Path, committed: Path) -> str:
    """How the new table compares with the committed one: rows identical in reward and KL, per method, and the
    largest reward difference (the training times, ``wall_s``, always differ). A committed table of more methods
    (``--methods all``) is compared on the methods the new one has."""
    if not committed.exists():
        return f"no committed table at {committed}"
    new, old = pd.read_csv(table), pd.read_csv(committed)
    keys = ["method", "hyperparameter", "seed", "step"]
    old = old[old["method"].isin(new["method"])]
    merged = new.merge(old, on=keys, suffixes=("", "_committed"))
    if len(merged) != len(new) or len(new) != len(old):
        return f"different rows: {len(new)} new, {len(old)} committed, {len(merged)} in common"
    merged["identical"] = (merged["reward"] == merged["reward_committed"]) & (merged["kl"] == merged["kl_committed"])
    merged["reward_gap"] = (merged["reward"] - merged["reward_committed"]).abs()
    summary = merged.groupby("method").agg(rows=("identical", "size"), identical=("identical", "sum"),
                                           largest_reward_gap=("reward_gap", "max"))
    return "against the committed table (reward and KL):\n" + summary.to_string()


def schedule_bound(table: Path, jobs: int, before: float) -> str:
    """The shortest the frontier could have taken on ``jobs`` workers, from the runs' own times: their training
    times (each run's ``wall_s`` at its last checkpoint, which leaves out the offline methods' evaluations, so the
    bound is low) summed and divided by ``jobs``, after the ``before`` seconds every run waits for (``prepare``)."""
    cost = training_cost(pd.read_csv(table))
    total = cost["total s"].sum()
    fastest = total / jobs
    return (f"the {cost['runs'].sum()} runs' training times sum to {total:.0f} s: {jobs} job(s) cannot run them in under "
            f"{fastest:.0f} s ({fastest / 60:.1f} min), nor the whole in under prepare + that = "
            f"{(before + fastest) / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpo_lab_frontier_time_"))
    env = {**os.environ, "DPO_LAB_HOME": str(work), "DPO_LAB_RESULTS": str(work / "results"),
           "DPO_LAB_FIGURES": str(work / "figures")}
    common = ["--profile", args.profile]
    print(f"{args.profile} frontier from an empty cache in {work}, --jobs {args.jobs}, {os.cpu_count()} cores")
    seconds = [stage("prepare", ["prepare", *common], env), stage("preferences", ["preferences", *common], env),
               stage("reward", ["reward", *common], env),
               stage("frontier", ["frontier", *common, "--jobs", str(args.jobs)], env)]
    print(f"  {'total':<12} {sum(seconds):7.1f} s ({sum(seconds) / 60:.1f} min)")
    table = work / "results" / args.profile / "frontier.csv"
    print(compare(table, ROOT / "data" / "results" / args.profile / "frontier.csv"))
    print(schedule_bound(table, args.jobs, before=seconds[0]))


if __name__ == "__main__":
    main()
