"""Regenerate Figure 2 (left): train every method of the sweep, evaluate every checkpoint, draw the frontier.

The sweep mirrors the paper (DESIGN.md section 1), mapped to the profile's scale by its
``SweepSpec`` (the deviations ledger records the mapping): DPO over four betas, PPO and PPO-GT
over four KL targets, Unlikelihood over four alphas, Preferred-FT over seeds, the SFT policy as a
point (every run's step 0), and Best-of-N over N as a curve.

The runner is resumable at two levels: a finished run is skipped (its folder is marked done), an
interrupted run resumes from its checkpoint; and after every run the tidy results table
``data/results/<profile>/frontier.csv`` is rewritten atomically, each run's rows replacing that
run's earlier rows (rows of settings no longer in the sweep go at the end), so killing the sweep
loses nothing that finished, the table never loses rows mid-sweep, and a rerun produces the same
table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dpo_lab import storage
from dpo_lab.analysis import (
    best_reward_at_budgets,
    check_results,
    completion_lengths,
    dominated_share,
    with_kl_per_token,
)
from dpo_lab.plots import plot_frontier, plot_training_curves
from dpo_lab.profiles import Profile, get_profile
from dpo_lab.runs import Run

METHODS = ("dpo", "ppo", "ppo-gt", "unlikelihood", "preferred-ft", "best-of-n")
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
        """Which rows of a results table this entry produces (Best-of-N: every N)."""
        same = table["method"] == self.method
        if self.method == "best-of-n":
            return same
        return same & (table["hyperparameter"] == self.hyperparameter) & (table["seed"] == self.seed)


def sweep_entries(profile: Profile, methods: Sequence[str] = METHODS) -> list[SweepEntry]:
    """The runs of ``profile``'s sweep for the chosen ``methods`` (Best-of-N is one entry for all N)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    sweep = profile.sweep
    by_method = {
        "dpo": [SweepEntry("dpo", "beta", b) for b in sweep.dpo_betas],
        "ppo": [SweepEntry("ppo", "target_kl", t) for t in sweep.ppo_target_kls],
        "ppo-gt": [SweepEntry("ppo-gt", "target_kl", t) for t in sweep.ppo_target_kls],
        "unlikelihood": [SweepEntry("unlikelihood", "alpha", a) for a in sweep.unlikelihood_alphas],
        "preferred-ft": [SweepEntry("preferred-ft", "seed", s, seed=s) for s in sweep.preferred_ft_seeds],
        "best-of-n": [SweepEntry("best-of-n", "n", float(max(sweep.best_of_n)))],
    }
    return [entry for method in METHODS if method in methods for entry in by_method[method]]


@dataclass
class Pipeline:
    """The upstream artifacts every run needs, built (or found in the cache) once per sweep."""

    profile: Profile
    device: str | None = None
    progress: bool = True
    _cache: dict = field(default_factory=dict)

    @property
    def world(self):
        """Corpus, prompts, SFT policy and ground truth (``dpo-lab prepare``)."""
        if "world" not in self._cache:
            from dpo_lab.world import prepare

            self._cache["world"] = prepare(self.profile, device=self.device, progress=self.progress)
        return self._cache["world"]

    @property
    def pairs(self) -> Path:
        """The preference pairs (``dpo-lab preferences``)."""
        if "pairs" not in self._cache:
            from dpo_lab.preferences import build_preferences

            self._cache["pairs"] = build_preferences(self.world, device=self.device, progress=self.progress)
        return self._cache["pairs"]

    @property
    def reward_model(self) -> Path:
        """The learned reward model r_phi (``dpo-lab reward``)."""
        if "reward_model" not in self._cache:
            from dpo_lab.train.reward import train_reward_model

            self._cache["reward_model"] = train_reward_model(self.world, self.pairs, device=self.device,
                                                             progress=self.progress)
        return self._cache["reward_model"]

    def run(self, entry: SweepEntry) -> pd.DataFrame:
        """Train (or find finished) one sweep entry and return its evaluation rows."""
        if entry.method in ("dpo", "unlikelihood", "preferred-ft"):
            from dpo_lab.train.dpo import train_offline

            options = {"dpo": {"beta": entry.hyperparameter}, "unlikelihood": {"alpha": entry.hyperparameter},
                       "preferred-ft": {}}[entry.method]
            run: Run = train_offline(self.world, self.pairs, entry.method, seed=entry.seed, device=self.device,
                                     progress=self.progress, **options)
            return run.evaluations()
        if entry.method in ("ppo", "ppo-gt"):
            from dpo_lab.train.ppo import train_ppo

            ground_truth = entry.method == "ppo-gt"
            run = train_ppo(self.world, target_kl=entry.hyperparameter, use_ground_truth=ground_truth,
                            reward_model_path=None if ground_truth else self.reward_model, seed=entry.seed,
                            device=self.device, progress=self.progress)
            return run.evaluations()
        from dpo_lab.best_of_n import best_of_n

        return best_of_n(self.world, self.reward_model, ns=self.profile.sweep.best_of_n, device=self.device,
                         progress=self.progress)


def results_path(profile_name: str) -> Path:
    """``data/results/<profile>/frontier.csv`` in the project folder."""
    return storage.results_dir(profile_name) / RESULTS_FILE


def write_results(table: pd.DataFrame, path: Path) -> None:
    """Write the tidy table atomically, sorted so that reruns give identical files."""
    table = table.reindex(columns=COLUMNS + [c for c in table.columns if c not in COLUMNS])
    table = table.sort_values(["method", "hyperparameter", "seed", "step"]).reset_index(drop=True)
    with storage.atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def run_sweep(profile: Profile, methods: Sequence[str] = METHODS, device: str | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Run the sweep (skipping finished runs), rewriting the results table after every run."""
    entries = sweep_entries(profile, methods)
    pipeline = Pipeline(profile, device=device, progress=progress)
    path = results_path(profile.name)
    previous = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=COLUMNS)
    other_methods = previous[~previous["method"].isin(methods)]
    pending = previous[previous["method"].isin(methods)]  # earlier rows, kept until their entry reruns
    finished: list[pd.DataFrame] = []
    started = time.time()
    for entry in tqdm(entries, desc=f"frontier sweep ({profile.name})", disable=not progress):
        finished.append(pipeline.run(entry).assign(profile=profile.name))
        pending = pending[~entry.rows_in(pending)]
        write_results(pd.concat([other_methods, pending, *finished], ignore_index=True), path)
    if len(pending):  # rows of settings no longer in the sweep
        write_results(pd.concat([other_methods, *finished], ignore_index=True), path)
    table = pd.read_csv(path)
    if progress:
        print(f"sweep of {len(entries)} runs done in {time.time() - started:.0f} s; table: {path}")
    return table


def write_report(profile: Profile, table: pd.DataFrame) -> list[Path]:
    """Draw the frontier and training curves into ``figures/`` and the analysis into the results folder.

    Returns the paths written. The analysis holds, per method, the best reward within each KL
    budget of ``profile.sweep.kl_budgets``, and the share of PPO/PPO-GT points dominated by DPO;
    then the same per completion token (``kl_per_token_budgets``) beside the mean completion
    length of each method's last checkpoints, since sequence KL grows with length.
    """
    table = check_results(table, source=str(results_path(profile.name)))
    figures = storage.figures_dir()
    plot_frontier(table, title=f"Reward vs KL, {profile.name} profile", save_to=figures / f"frontier_{profile.name}")
    plot_training_curves(table, save_to=figures / f"training_curves_{profile.name}")
    trained = with_kl_per_token(table[table["step"] > 0])

    def block(frame) -> list[str]:
        return ["```", frame.to_string(float_format="{:.3f}".format), "```", ""]

    report = results_path(profile.name).with_name("analysis.md")
    storage.write_text_atomic(report, "\n".join([
        f"# Frontier analysis ({profile.name} profile)", "",
        "Highest ground-truth reward among checkpoints within each KL budget:", "",
        *block(best_reward_at_budgets(table, profile.sweep.kl_budgets)),
        "Share of PPO / PPO-GT checkpoints dominated by a DPO checkpoint (lower or equal KL, higher or equal reward):",
        "", *block(dominated_share(trained)),
        "## Per completion token", "",
        "Sequence KL grows with the number of generated tokens. Mean completion length (tokens) of the SFT "
        "policy and of each method's last checkpoints:", "",
        *block(completion_lengths(table)),
        "Highest reward within each budget of KL per token (sequence KL / mean length):", "",
        *block(best_reward_at_budgets(trained, profile.sweep.kl_per_token_budgets, kl_column="kl_per_token")),
        "Share of PPO / PPO-GT checkpoints dominated by a DPO checkpoint in (KL per token, reward):", "",
        *block(dominated_share(trained, kl_column="kl_per_token"))]))
    return [figures / f"frontier_{profile.name}.png", figures / f"training_curves_{profile.name}.png", report]


@dataclass
class FrontierArgs:
    """Options of ``dpo-lab frontier``."""

    methods: str = field(default=",".join(METHODS), metadata={
        "help": f"Comma-separated subset of methods to run ({', '.join(METHODS)})."})


def run_frontier(argv: list[str]) -> None:
    """``dpo-lab frontier``: prepare what is missing, run the sweep, write the table and the figures."""
    from dpo_lab.cli import parse

    common, args = parse("dpo-lab frontier", argv, FrontierArgs)
    profile = get_profile(common.profile)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sweep_entries(profile, methods)  # validate before any long work
    table = run_sweep(profile, methods, device=common.device)
    for path in write_report(profile, table):
        print(f"wrote {path}")


def run_figures(argv: list[str]) -> None:
    """``dpo-lab figures``: redraw every figure from the committed results tables, with no training."""
    from dpo_lab.cli import parse

    (common,) = parse("dpo-lab figures", argv)
    names = [common.profile] if common.profile else sorted(
        p.parent.name for p in storage.results_dir("").glob(f"*/{RESULTS_FILE}"))
    if not names:
        raise ValueError("no results table found under data/results/; run `dpo-lab frontier` first")
    for name in names:
        path = results_path(name)
        if not path.exists():
            raise ValueError(f"no results table at {path}; run `dpo-lab frontier --profile {name}` first")
        for written in write_report(get_profile(name), pd.read_csv(path)):
            print(f"wrote {written}")
