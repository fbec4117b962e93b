"""Training-run folders and the scaffolding every trainer shares: configuration, rows, resume, checkpoints.

A run lives in ``<cache>/<profile>/runs/<method>/<label>-<fingerprint>/``, where the fingerprint
hashes the run's full configuration, so the same configuration always finds the same folder:

- ``config.json``: everything that defines the run (written once);
- ``metrics.jsonl``: one JSON line per training step (appended);
- ``evaluations.csv``: one row per evaluated checkpoint (rewritten atomically, one row per step);
- ``samples.json``: the decoded samples each evaluated checkpoint keeps (prompt, completion and
  ground-truth reward of the first test prompts), by step, for reading and for the fluency judge
  (:mod:`dpo_lab.fluency`);
- ``log.txt``: human-readable events (start, resume, errors, finish);
- ``checkpoint/``: the latest checkpoint (model via ``save_pretrained``, ``trainer_state.pt`` with
  step, optimiser and RNG state, loaded with ``torch.load(weights_only=True)``, and a
  ``MANIFEST.json`` of checksums), replaced atomically (:func:`dpo_lab.storage.atomic_dir`), the
  one before it kept as ``checkpoint.previous/``;
- ``final/``: the final model with its checksums, then the ``DONE`` marker (listing the evaluated
  steps): a finished run is never trained again, unless its ``evaluations.csv`` was lost or
  damaged (unreadable, cut short, a non-finite reward or KL) or its final model no longer matches
  its checksums, in which case it is reported and trained again (a damaged ``evaluations.csv`` is
  kept as ``evaluations.csv.damaged``), so the results table never silently loses its rows and no
  damaged model is reused;
- ``FAILED``: written when a non-finite loss, gradient or score stopped the run
  (:mod:`dpo_lab.guards`); a rerun of the same configuration stops at once with its message.

A checkpoint that fails its checksums, or whose step has no row in ``evaluations.csv``, is
reported and skipped in favour of the one before it (or a fresh start). A line of
``metrics.jsonl`` that a kill cut short is skipped when read, and the next record starts a line of
its own. Training holds the folder's lock (:meth:`Run.exclusive`): a second process that asks for
the same run at once waits, then finds it finished.

Under several processes (``accelerate launch``) only the main process writes the folder: every
process builds the same :class:`Run`, but logs, metrics, rows, checkpoints and the final model
come from the main one (:func:`dpo_lab.processes.is_main_process`), and the configuration records
the number of processes, so a data-parallel run never shares a folder with a one-process run.

The scaffolding lives here so that resume correctness lives in one place: :func:`training_run`
(the configuration and the row columns), :func:`start_or_resume` (seed a fresh run, or restore
the RNG state of its last checkpoint), and :class:`Checkpointer` (at a checkpoint step: evaluate,
record the row, then save the checkpoint with the RNG state). A run killed at any moment
therefore resumes from its last checkpoint and, training being deterministic, re-creates exactly
the rows it may have lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from dpo_lab import processes, runtime, storage
from dpo_lab.evaluate import evaluate_policy
from dpo_lab.guards import NonFiniteError
from dpo_lab.lm import save_causal_lm, write_causal_lm

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
SAMPLES_FILE = "samples.json"
EVALUATIONS = "evaluations.csv"
TRAINER_STATE = "trainer_state.pt"
LOG_FILE = "log.txt"
FAILED = "FAILED"
CHECKPOINTS = (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".previous")
"""Checkpoint folders, newest first (``.old`` exists only if a kill interrupted the swap)."""


class Run:
    """One training run's folder. See the module docstring for the layout."""

    def __init__(self, profile_name: str, method: str, label: str, config: Any):
        self.config = storage.to_jsonable(config)
        self.method = method
        self.label = label
        self.run_id = f"{method}/{label}-{storage.fingerprint(self.config)}"
        self.path = storage.profile_dir(profile_name) / "runs" / self.run_id
        self.columns: dict[str, Any] = {"run_id": self.run_id, "method": method}
        """The identifying columns of every row this run records (see :func:`training_run`)."""
        config_path = self.path / "config.json"
        if processes.is_main_process() and not config_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            storage.write_json(config_path, self.config)

    def log(self, message: str) -> None:
        """Append a time-stamped line to the run's ``log.txt`` (main process only)."""
        if not processes.is_main_process():
            return
        with open(self.path / LOG_FILE, "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    @property
    def finished(self) -> bool:
        """Whether the run completed: its ``DONE`` marker exists, its evaluation rows are all there and sound,
        and its final model matches its checksums.

        A finished run with any of these problems is reported, unmarked, and so trained again
        (deterministically: the same rows, the same final model).
        """
        if not storage.is_done(self.path):
            return False
        problem = self.evaluations_problem()
        if problem is None and (final_problem := storage.manifest_problem(self.path / FINAL_DIR)):
            problem = f"its final model: {final_problem}"
        if problem is None:
            return True
        storage.log.warning("%s: %s; training the run again so that no result is lost", self.path, problem)
        if processes.is_main_process():
            (self.path / storage.DONE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(self.path / FINAL_DIR, ignore_errors=True)
        return False

    def evaluations_problem(self) -> str | None:
        """What is wrong with a finished run's ``evaluations.csv`` (missing, damaged, short of steps), or None."""
        if not (self.path / EVALUATIONS).exists():
            return f"{EVALUATIONS} is missing"
        table, damage = self.sound_evaluations()
        if damage is not None:
            return damage
        try:
            expected = set(json.loads((self.path / storage.DONE_MARKER).read_text())["steps"])
        except (ValueError, KeyError, TypeError):
            expected = {0}  # a marker written before the steps were recorded
        missing = sorted(expected - set(table["step"]))
        return f"{EVALUATIONS} has no row for step(s) {missing}" if missing else None

    def sound_evaluations(self) -> tuple[pd.DataFrame | None, str | None]:
        """``(rows, None)`` when ``evaluations.csv`` is missing (no rows) or sound, else ``(None, why it cannot be
        trusted)``: unreadable, cut short, or a step, reward or KL that is not a finite number.

        The file is always rewritten whole and atomically, so any of these means it was damaged
        after it was written. Only the standard errors (``*_se``) may be empty: one test prompt has none.
        """
        try:
            table = self.evaluations()
        except (OSError, ValueError) as err:
            return None, f"{EVALUATIONS} is unreadable ({err})"
        always_filled = [column for column in table.columns if not column.endswith("_se")]
        if storage.ends_mid_line(self.path / EVALUATIONS) or table[always_filled].isna().to_numpy().any():
            return None, f"{EVALUATIONS} is cut short (a row lacks some of its values)"
        measured = table[[column for column in ("step", "reward", "kl") if column in table.columns]]
        if not np.isfinite(measured.apply(pd.to_numeric, errors="coerce").to_numpy(float)).all():
            return None, f"{EVALUATIONS} has a step, reward or KL that is not a finite number"
        return table, None

    def resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """Where training (re)starts: the newest sound checkpoint (:meth:`latest_checkpoint`), or None for step 0.

        First, stop at once if an earlier attempt ended on a non-finite value (:meth:`raise_if_failed`),
        and move a damaged ``evaluations.csv`` aside to ``evaluations.csv.damaged`` (reported), so
        that training starts again from a clean slate and re-creates its rows.
        """
        self.raise_if_failed()
        _, damage = self.sound_evaluations()
        if damage is not None and processes.is_main_process():
            aside = self.path / (EVALUATIONS + ".damaged")
            os.replace(self.path / EVALUATIONS, aside)
            storage.log.warning("%s: %s; moved to %s, training from the start", self.path, damage, aside.name)
        return self.latest_checkpoint()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold this run folder's lock for the block: a second process that trains the same configuration at
        once waits, then finds the run finished (:func:`dpo_lab.storage.exclusive`).

        Under several processes the main one takes the lock and the others wait for it at a barrier,
        so that all of them then read the folder in the same state.
        """
        if not processes.is_main_process():
            processes.wait_for_everyone()
            yield
            return
        with storage.exclusive(self.path):
            processes.wait_for_everyone()
            yield

    def raise_if_failed(self) -> None:
        """Raise :class:`NonFiniteError` if an earlier attempt of this configuration stopped on a non-finite value."""
        failed = self.path / FAILED
        if failed.exists():
            raise NonFiniteError(f"{failed.read_text().strip()} (recorded in {failed}; delete it to retry anyway)")

    @contextlib.contextmanager
    def stopped_on_non_finite(self, where: str, causes: str):
        """Turn a :class:`NonFiniteError` raised at ``where`` (``"step 12"``) into one that names the run, the
        kept checkpoint and ``causes``, recorded in ``FAILED`` so that a rerun says the same at once."""
        try:
            yield
        except NonFiniteError as err:
            last = self.latest_checkpoint()
            kept = f"its last good checkpoint (step {last[1]['step']}) is kept" if last else "it has no checkpoint yet"
            message = (f"run {self.run_id} stopped at {where}: {err}; training stopped there and "
                       f"{kept} in {self.path}. Likely causes: {causes}. Rerunning this configuration would repeat "
                       "it: change one of those settings (a changed setting trains in a new folder)")
            if processes.is_main_process():
                storage.write_text_atomic(self.path / FAILED, message + "\n")
            self.log(message)
            raise type(err)(message) from None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's training metrics to ``metrics.jsonl`` (main process only).

        A line that a kill cut short is ended first, so the new record gets a line of its own.
        """
        if not processes.is_main_process():
            return
        path = self.path / "metrics.jsonl"
        start = "\n" if storage.ends_mid_line(path) else ""
        with open(path, "a") as fh:
            fh.write(start + json.dumps({"step": step, **metrics}) + "\n")

    def metrics(self) -> pd.DataFrame:
        """All logged steps (the last record wins where a resumed run logged a step twice).

        Lines that a kill cut short (not valid JSON) are skipped, and reported once.
        """
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return pd.DataFrame()
        rows, skipped = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                skipped += 1
        if skipped:
            storage.log.warning("%s: skipped %d line(s) cut short by a kill", path, skipped)
        return pd.DataFrame(rows).drop_duplicates("step", keep="last").reset_index(drop=True)

    def add_evaluation(self, row: dict[str, Any]) -> None:
        """Record one checkpoint's evaluation row (replacing an earlier row of the same step)."""
        kept = [r for r in self.evaluations().to_dict("records") if r["step"] != row["step"]]
        table = pd.DataFrame([*kept, row]).sort_values("step")  # from records: integer columns stay integers
        with storage.atomic_path(self.path / EVALUATIONS) as tmp:
            table.to_csv(tmp, index=False)

    def add_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Keep one checkpoint's decoded samples in ``samples.json`` (replacing earlier samples of the same step)."""
        kept = {**self.samples(), step: samples}
        storage.write_json(self.path / SAMPLES_FILE, {str(s): kept[s] for s in sorted(kept)})

    def samples(self) -> dict[int, list[dict[str, Any]]]:
        """The kept samples by step (empty if none were kept: runs trained before samples were kept)."""
        path = self.path / SAMPLES_FILE
        return {int(step): rows for step, rows in storage.read_json(path).items()} if path.exists() else {}

    def evaluated_steps(self) -> set[int]:
        """The steps ``evaluations.csv`` has sound rows for (none if it is missing or damaged)."""
        table, _ = self.sound_evaluations()
        return set() if table is None else set(table["step"])

    def evaluations(self) -> pd.DataFrame:
        """The evaluation rows recorded so far (empty if none); an unreadable file raises a ``ValueError`` naming it."""
        path = self.path / EVALUATIONS
        if not path.exists():
            return pd.DataFrame(columns=["step"])
        try:
            table = pd.read_csv(path)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is unreadable ({err}); training this run again moves it aside") from None
        if "step" not in table.columns:
            raise ValueError(f"{path} has no 'step' column; training this run again moves it aside")
        return table

    def save_checkpoint(self, step: int, model, tokenizer, state: dict[str, Any]) -> None:
        """Save model and trainer state (tensors and plain values only) with their checksums as the latest
        checkpoint, atomically; the checkpoint it replaces becomes ``checkpoint.previous``."""
        with storage.atomic_dir(self.path / CHECKPOINT_DIR, keep_previous=True) as staging:
            write_causal_lm(model, tokenizer, staging)
            torch.save({"step": step, **state}, staging / TRAINER_STATE)
            storage.seal(staging)

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """``(model folder, trainer state)`` of the newest sound checkpoint (:data:`CHECKPOINTS`), or ``None``.

        Sound: its files match their checksums and ``evaluations.csv`` has the row of its step
        (the row is written before the checkpoint). Any other checkpoint is reported and skipped.
        """
        evaluated = self.evaluated_steps()
        for name in CHECKPOINTS:
            folder = self.path / name
            if not folder.exists():
                continue
            problem = storage.manifest_problem(folder)
            if problem is None:
                state = torch.load(folder / TRAINER_STATE, weights_only=True)
                if state["step"] in evaluated:
                    return folder, state
                problem = f"evaluations.csv has no row for its step {state['step']}"
            storage.log.warning("%s: %s; not resuming from it", folder, problem)
        return None

    def finish(self, model, tokenizer) -> Path:
        """Save the final model, mark the run finished (with its evaluated steps), then drop the checkpoints.

        The main process writes; every process returns once it has (the folder of the final model).
        """
        final = self.path / FINAL_DIR
        if processes.is_main_process():
            save_causal_lm(model, tokenizer, final)
            steps = sorted(int(s) for s in self.evaluations()["step"])
            storage.write_text_atomic(self.path / storage.DONE_MARKER, json.dumps({"steps": steps}) + "\n")
            for name in CHECKPOINTS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        processes.wait_for_everyone()
        return final


def run_config(world, method: str, seed: int, **entries: Any) -> dict[str, Any]:
    """A run's configuration: what every method shares (profile, method, seed, sampling, evaluation,
    precision, pi_SFT) plus the method's ``entries`` (its settings, its spec, its upstream artifacts),
    and the number of data-parallel processes when there are several (one process: not recorded,
    so the folders of one-process runs are what they always were)."""
    profile = world.profile
    return {"profile": profile.name, "method": method, "seed": seed, "sampling": profile.sampling,
            "evaluation": profile.evaluation, "mixed_precision": profile.mixed_precision,
            "policy": storage.cache_name(world.sft_dir), **entries, **processes.config_entry()}


def training_run(world, method: str, swept: tuple[str, float], seed: int, **entries: Any) -> Run:
    """The :class:`Run` of one training configuration (the same configuration, the same folder).

    ``swept``: the swept hyperparameter's ``(name, value)``, recorded in every row with the seed;
    the folder is labelled ``<name><value>-seed<seed>`` (``seed<seed>`` when the seed is what is swept).
    """
    name, value = swept
    label = f"seed{seed}" if name == "seed" else f"{name}{value:g}-seed{seed}"
    run = Run(world.profile.name, method, label, run_config(world, method, seed, **entries))
    run.columns = {"profile": world.profile.name, "run_id": run.run_id, "method": method,
                   "hyperparameter_name": name, "hyperparameter": value, "seed": seed}
    return run


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG state (CPU, and the CUDA device's when training there), for a checkpoint."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def start_or_resume(run: Run, resume: tuple[Path, dict[str, Any]] | None, seed: int,
                    device: torch.device) -> tuple[int, float]:
    """Seed a fresh run, or restore the RNG state of its checkpoint; returns (last finished step, seconds so far).

    Call it once the models and the optimiser are built, so that a fresh and a resumed run reach
    their first step with the same random numbers. Under several processes the main process does
    exactly this; process r > 0 then seeds its own stream from (seed, step, r), so the processes
    sample differently, and a resumed run continues with streams fixed by its step (not bit for bit
    those of an uninterrupted run: a checkpoint holds the main process's state only).
    """
    if resume is None:
        runtime.seed_everything(seed)
        run.log(f"started: {json.dumps(run.config, sort_keys=True)}")
        step, seconds = 0, 0.0
    else:
        restore_rng(resume[1], device)
        run.log(f"resumed from the checkpoint of step {resume[1]['step']}")
        step, seconds = resume[1]["step"], resume[1]["wall_s"]
    if processes.process_rank() > 0:
        runtime.seed_everything(hash((seed, step, processes.process_rank())) % 2**31)
    return step, seconds


@dataclass
class Checkpointer:
    """The evaluate, record, checkpoint step of every trainer (step 0, every ``eval_every`` steps, the last).

    On the main process: evaluate ``policy`` with the protocol of :mod:`dpo_lab.evaluate` against
    the frozen ``reference`` and the ground-truth ``scorer`` on the world's test prompts, record the
    row, then (unless it is ``last_step``) save the checkpoint with ``trainer_state()`` and the RNG
    state. Every process then waits for the main one.
    """

    run: Run
    world: Any
    reference: torch.nn.Module
    tokenizer: Any
    scorer: Any
    last_step: int
    accelerator: Accelerator

    def __call__(self, step: int, policy: torch.nn.Module, wall_s: float,
                 trainer_state: Callable[[], dict[str, Any]]) -> None:
        if self.accelerator.is_main_process:
            profile = self.world.profile
            evaluation = evaluate_policy(policy, self.reference, self.tokenizer, self.scorer, self.world.test_prompts,
                                         max_new_tokens=profile.sampling.max_new_tokens, seed=profile.evaluation.seed,
                                         batch_size=profile.evaluation.batch_size)
            self.run.add_evaluation({**self.run.columns, "step": step, **evaluation.row(), "wall_s": wall_s})
            self.run.add_samples(step, evaluation.samples)
            if step < self.last_step:
                state = {**trainer_state(), **rng_state(self.accelerator.device), "wall_s": wall_s}
                self.run.save_checkpoint(step, policy, self.tokenizer, state)
        self.accelerator.wait_for_everyone()
