"""Regenerate Figure 2 (left): train every method of the sweep, evaluate every checkpoint, draw the frontier.

The sweep mirrors the paper's Figure 2 (left), mapped to the profile's scale by its ``SweepSpec``
(the deviations ledger records the mapping): every method of the registry (:mod:`dpo_lab.methods`)
over its hyperparameter's values in the profile: DPO over four betas, PPO and PPO-GT over four KL
targets, Unlikelihood over four alphas, Preferred-FT over seeds, the SFT policy as a point (every
run's step 0), and Best-of-N over N as a curve.

The runner is resumable at two levels: a finished run is skipped (its folder is marked done), an
interrupted run resumes from its checkpoint; and after every run the tidy results table
``data/results/<profile>/frontier.csv`` is rewritten atomically, each run's rows replacing that
run's earlier rows (rows of settings no longer in the sweep go at the end), so killing the sweep
loses nothing that finished, the table never loses rows mid-sweep, and a rerun produces the same
table. The runs can execute in parallel, in local worker processes (``jobs``) or on a Ray cluster
(:mod:`dpo_lab.workers`); this process alone writes the table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dpo_lab import processes, storage, workers
from dpo_lab.analysis import (
    achieved_kl,
    best_reward_at_budgets,
    check_results,
    completion_lengths,
    dominated_share,
    reward_at_matched_kl,
    training_cost,
    with_kl_per_token,
)
from dpo_lab.methods import REGISTRY, RunRequest, expand_methods, get_method, group_rows, swept_methods
from dpo_lab.pipeline import Pipeline
from dpo_lab.plots import plot_frontier, plot_modern_frontier, plot_training_curves
from dpo_lab.profiles import Profile

RESULTS_FILE = "frontier.csv"
COLUMNS = ["profile", "run_id", "method", "hyperparameter_name", "hyperparameter", "seed", "step", "reward",
           "reward_se", "kl", "kl_se", "kl_sample", "length", "n_prompts", "wall_s"]


@dataclass(frozen=True)
class SweepEntry:
    """One run of the sweep: a method and its hyperparameter value."""

    method: str
    hyperparameter_name: str
    hyperparameter: float
    seed: int = 0

    def rows_in(self, table: pd.DataFrame) -> pd.Series:
        """Which rows of a results table this entry produces (a curve method: all of its rows)."""
        same = table["method"] == self.method
        if get_method(self.method).curve:
            return same
        return same & (table["hyperparameter"] == self.hyperparameter) & (table["seed"] == self.seed)

    def run(self, pipeline: Pipeline, device: str | None, progress: bool) -> pd.DataFrame:
        """Train (or find finished) this run with its method's training function; its evaluation rows."""
        method = get_method(self.method)
        request = RunRequest(self.hyperparameter, seed=self.seed, options=method.default_options(), device=device,
                             progress=progress)
        return method.train(pipeline, request)


def sweep_entries(profile: Profile, methods: Sequence[str] | None = None) -> list[SweepEntry]:
    """The runs of ``profile``'s sweep for the chosen ``methods`` (default: the paper's methods swept in it).

    ``methods`` may name groups (``paper``, ``modern``, ``all``: :data:`dpo_lab.methods.GROUPS`). A method with several values that form one curve (Best-of-N) is one entry, at its largest value.
    Raises ``ValueError`` for an unknown method, or one with no values in this profile's sweep.
    """
    methods = swept_methods(profile) if methods is None else expand_methods(methods, profile)
    if not methods:
        raise ValueError(f"no methods chosen; registered: {', '.join(REGISTRY)}")
    for name in methods:
        get_method(name)  # an unknown name fails with the list of known ones
    entries = []
    for name in REGISTRY:
        if name not in methods:
            continue
        method = REGISTRY[name]
        values = list(method.sweep_values(profile))
        if not values:
            raise ValueError(f"method {name!r} has no values in the {profile.name!r} sweep; "
                             f"swept there: {', '.join(swept_methods(profile, 'all'))}")
        seeds = values if method.hyperparameter == "seed" else [0] * len(values)
        entries += [SweepEntry(name, method.hyperparameter, float(v), seed=int(s)) for v, s in zip(values, seeds)]
    return entries


def results_path(profile_name: str) -> Path:
    """``data/results/<profile>/frontier.csv`` in the project folder."""
    return storage.results_dir(profile_name) / RESULTS_FILE


def write_results(table: pd.DataFrame, path: Path) -> None:
    """Write the tidy table atomically, sorted and at 6 significant digits, so that reruns give identical files.

    ``infer_objects`` matters: a table concatenated with an empty one has object-typed columns, which
    ``to_csv`` would write at full precision, ignoring ``float_format``.
    """
    table = table.reindex(columns=COLUMNS + [c for c in table.columns if c not in COLUMNS]).infer_objects()
    table = table.sort_values(["method", "hyperparameter", "seed", "step"]).reset_index(drop=True)
    with storage.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def read_results(path: Path) -> pd.DataFrame:
    """The results table at ``path`` (an empty one if there is none); a damaged file raises one line naming it."""
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        table = pd.read_csv(path)
        problem = None if "method" in table.columns else "has no 'method' column"
    except (ValueError, UnicodeDecodeError) as err:
        table, problem = None, f"is unreadable ({err})"
    if problem is None and storage.ends_mid_line(path):
        problem = "is cut short (its last line is incomplete)"
    if problem:
        raise ValueError(f"the results table {path} {problem}: restore it (`git checkout -- {path}` for a committed "
                         "table) or delete it, and the sweep writes it again from its finished runs")
    return table


def run_sweep(profile: Profile, methods: Sequence[str] | None = None, device: str | None = None,
              progress: bool = True, jobs: int = 1, ray_address: str | None = None) -> pd.DataFrame:
    """Run the sweep (skipping finished runs), rewriting the results table after every run.

    ``jobs`` > 1 runs that many entries at once in local worker processes, ``ray_address`` submits
    every entry to a Ray cluster (:mod:`dpo_lab.workers`); either way the upstream artifacts the
    entries need are built here first, once, and this process alone writes the table, which comes
    out the same as a sequential sweep's.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if (jobs > 1 or ray_address) and processes.launched_processes() > 1:
        raise ValueError("--jobs and --ray-address start their own processes: run them without accelerate launch")
    entries = sweep_entries(profile, methods)
    storage.check_writable(profile.name)
    path = results_path(profile.name)
    table = ResultsTable(path, [entry.method for entry in entries])
    pipeline = Pipeline(profile, device=device, progress=progress)
    if jobs > 1 or ray_address:
        for upstream in dict.fromkeys(get_method(entry.method).needs for entry in entries):
            getattr(pipeline, upstream)
        entries = sorted(entries, key=lambda entry: -get_method(entry.method).relative_cost)  # longest first
        profile = pipeline.world.profile  # its precision resolved here: a worker that cannot run it says so
    if ray_address:
        finishing = workers.ray_tasks(profile, entries, ray_address, device)
    elif jobs > 1:
        finishing = workers.local_jobs(profile, entries, jobs, device)
    else:
        finishing = workers.in_process(profile, entries, pipeline, device, progress)
    started = time.time()
    for entry, rows in tqdm(finishing, total=len(entries), desc=f"frontier sweep ({profile.name})",
                            disable=not progress):
        table.add(entry, rows.assign(profile=profile.name))
    table.close()
    processes.wait_for_everyone()
    if progress:
        print(f"sweep of {len(entries)} runs done in {time.time() - started:.0f} s; table: {path}")
    return read_results(path)


class ResultsTable:
    """The results table of a sweep in progress, rewritten atomically after every finished run.

    Rows of methods outside the sweep are kept; earlier rows of the sweep's methods are kept until
    their entry finishes again (so a killed sweep loses no rows), and dropped at :meth:`close` if
    their setting is no longer in the sweep. Every rewrite reads the file again under its lock
    (:func:`dpo_lab.storage.exclusive`), so two sweeps of different methods at once keep each other's rows.
    """

    def __init__(self, path: Path, methods: Sequence[str]):
        self.path = path
        self.methods = list(methods)
        self.finished: list[tuple[SweepEntry, pd.DataFrame]] = []
        read_results(path)  # a damaged table stops the sweep now, not after its first run

    def add(self, entry: SweepEntry, rows: pd.DataFrame) -> None:
        """Record one finished entry's rows (replacing its earlier rows) and rewrite the table (main process only)."""
        self.finished.append((entry, rows))
        self.rewrite(keep_earlier=True)

    def close(self) -> None:
        """Drop the earlier rows of settings no longer in the sweep."""
        self.rewrite(keep_earlier=False)

    def rewrite(self, keep_earlier: bool) -> None:
        """Write the table on disk with this sweep's finished rows in place of their entries' earlier rows."""
        if not processes.is_main_process():
            return
        with storage.exclusive(self.path):
            table = read_results(self.path)
            ours = table["method"].isin(self.methods)
            earlier = table[ours]
            for entry, _ in self.finished:
                earlier = earlier[~entry.rows_in(earlier)]
            if keep_earlier or len(earlier):
                kept = [table[~ours], earlier] if keep_earlier else [table[~ours]]
                write_results(pd.concat([*kept, *(rows for _, rows in self.finished)], ignore_index=True), self.path)


def matched_kl_table(table: pd.DataFrame, kls, kl_column: str = "kl") -> pd.DataFrame:
    """:func:`dpo_lab.analysis.reward_at_matched_kl` as a method-by-KL table of ``reward ± se`` strings."""
    matched = reward_at_matched_kl(table, kls, kl_column)
    cells = [f"{r:.3f} ± {se:.3f}" if np.isfinite(r) else "-" for r, se in zip(matched["reward"], matched["reward_se"])]
    label = "kl/token" if kl_column == "kl_per_token" else "KL"
    return matched.assign(cell=cells, at=[f"{label} {k:g}" for k in matched["kl"]]).pivot(
        index="method", columns="at", values="cell").reindex(index=list(dict.fromkeys(matched["method"])),
                                                             columns=list(dict.fromkeys(f"{label} {k:g}" for k in kls)))


def block(frame) -> list[str]:
    """A table as a fenced block of markdown lines (3 decimals, ``-`` for NaN)."""
    return ["```", frame.to_string(float_format="{:.3f}".format, na_rep="-"), "```", ""]


def paper_analysis(profile: Profile, table: pd.DataFrame) -> list[str]:
    """The paper's methods: budgets, matched KL, domination, PPO's achieved KL, then per token."""
    sweep, per_token = profile.sweep, with_kl_per_token(table)
    return [
        "Highest ground-truth reward among each method's checkpoints within each sequence-KL budget (- : none):", "",
        *block(best_reward_at_budgets(table, sweep.kl_budgets)),
        "Reward at matched sequence KL: each method's Pareto frontier interpolated linearly between neighbouring "
        "checkpoints (± the standard error, interpolated alike); - where the KL is outside the method's own range:",
        "", *block(matched_kl_table(table, sweep.matched_kls)),
        "Share of PPO / PPO-GT checkpoints dominated by a DPO checkpoint (lower or equal KL, higher or equal reward):",
        "", *block(dominated_share(table)),
        "KL reached by the adaptive controller (sequence KL at the last checkpoint, and the range over the last 3):",
        "", *block(achieved_kl(table)),
        "## Per completion token (an analysis added after the sequence-level result disagreed with the paper)", "",
        "Sequence KL grows with the number of generated tokens. Mean completion length (tokens) of the SFT "
        "policy and of each method's last checkpoints:", "",
        *block(completion_lengths(table)),
        "Highest reward within each budget of KL per token (sequence KL / mean length):", "",
        *block(best_reward_at_budgets(per_token, sweep.kl_per_token_budgets, kl_column="kl_per_token")),
        "Share of PPO / PPO-GT checkpoints dominated by a DPO checkpoint in (KL per token, reward):", "",
        *block(dominated_share(per_token, kl_column="kl_per_token"))]


def modern_analysis(profile: Profile, table: pd.DataFrame) -> list[str]:
    """The methods since the paper beside the paper's: budgets, matched KL, domination by DPO, lengths, cost."""
    sweep = profile.sweep
    modern = list(dict.fromkeys(group_rows(table, "modern")["method"]))
    return [
        "## Methods since the paper", "",
        "The same protocol (prompts, seeds, exact KL) for every method; the paper's methods are repeated as "
        "references. Highest reward within each sequence-KL budget:", "",
        *block(best_reward_at_budgets(table, sweep.kl_budgets)),
        "Reward at matched sequence KL (interpolated along each method's own frontier; - outside its range):", "",
        *block(matched_kl_table(table, sweep.matched_kls)),
        "Share of each method's checkpoints dominated by a DPO checkpoint:", "",
        *block(dominated_share(table, of=modern)),
        "Mean completion length (tokens) of the SFT policy and of each method's last checkpoints:", "",
        *block(completion_lengths(table)),
        "Training cost: wall time of one run (seconds, evaluations included) on the machine and at the thread "
        "count the run was made with (the README says which):", "",
        *block(training_cost(table))]


def analysis_text(profile: Profile, table: pd.DataFrame) -> str:
    """The markdown of ``analysis.md``: the paper's methods first, then (when the table has them) the methods
    since the paper. Every figure counts distinct trained checkpoints (:func:`dpo_lab.analysis.distinct_checkpoints`).
    """
    paper, modern = group_rows(table, "paper"), group_rows(table, "modern")
    lines = [f"# Frontier analysis ({profile.name} profile)", "",
             "Every figure counts distinct trained checkpoints: the SFT point (step 0) is no method's checkpoint, and "
             "a checkpoint that several PPO runs share (their KL controllers agree until the KL nears the targets) "
             "counts once.", "", *paper_analysis(profile, paper)]
    if len(modern):
        lines += modern_analysis(profile, table)
    return "\n".join(lines)


def write_report(profile: Profile, table: pd.DataFrame) -> list[Path]:
    """Draw the frontier and training curves into ``figures/`` and write :func:`analysis_text` to the results folder.

    Returns the paths written.
    """
    table = check_results(table, source=str(results_path(profile.name)))
    figures, paper = storage.figures_dir(), group_rows(table, "paper")
    plot_frontier(paper, title=f"Reward vs KL, {profile.name} profile", save_to=figures / f"frontier_{profile.name}")
    plot_training_curves(paper, save_to=figures / f"training_curves_{profile.name}")
    written = [figures / f"frontier_{profile.name}.png", figures / f"training_curves_{profile.name}.png"]
    if len(group_rows(table, "modern")):
        plot_modern_frontier(table, title=f"Since the paper, {profile.name} profile",
                             save_to=figures / f"frontier_modern_{profile.name}")
        written.append(figures / f"frontier_modern_{profile.name}.png")
    report = results_path(profile.name).with_name("analysis.md")
    storage.write_text_atomic(report, analysis_text(profile, table) + "\n")
    return [*written, report]
