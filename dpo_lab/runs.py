"""Training-run folders: configuration, metrics, evaluations, checkpoints, resume, and "finished".

A run lives in ``<cache>/<profile>/runs/<method>/<label>-<fingerprint>/``, where the fingerprint
hashes the run's full configuration, so the same configuration always finds the same folder:

- ``config.json``: everything that defines the run (written once);
- ``metrics.jsonl``: one JSON line per training step (appended);
- ``evaluations.csv``: one row per evaluated checkpoint (rewritten atomically, one row per step);
- ``checkpoint/``: the latest checkpoint (model via ``save_pretrained``, ``trainer_state.pt`` with
  step, optimiser and RNG state, loaded with ``torch.load(weights_only=True)``);
- ``final/``: the final model, then the ``DONE`` marker: a finished run is never trained again.

Order of work at a checkpoint step: evaluate, record the row, then save the checkpoint. A run
killed at any moment therefore resumes from its last checkpoint and, training being deterministic,
re-creates exactly the rows it may have lost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dpo_lab import storage
from dpo_lab.lm import save_causal_lm

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
TRAINER_STATE = "trainer_state.pt"


class Run:
    """One training run's folder. See the module docstring for the layout."""

    def __init__(self, profile_name: str, method: str, label: str, config: Any):
        self.config = storage.to_jsonable(config)
        self.method = method
        self.label = label
        self.run_id = f"{method}/{label}-{storage.fingerprint(self.config)}"
        self.path = storage.profile_dir(profile_name) / "runs" / self.run_id
        self.path.mkdir(parents=True, exist_ok=True)
        config_path = self.path / "config.json"
        if not config_path.exists():
            storage.write_json(config_path, self.config)

    @property
    def finished(self) -> bool:
        """Whether the run completed (its final model and ``DONE`` marker exist)."""
        return storage.is_done(self.path)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's training metrics to ``metrics.jsonl``."""
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def metrics(self) -> pd.DataFrame:
        """All logged steps (the last record wins where a resumed run logged a step twice)."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return pd.DataFrame()
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:  # a kill mid-append can leave a partial last line: drop it
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        rows = [json.loads(line) for line in lines]
        return pd.DataFrame(rows).drop_duplicates("step", keep="last").reset_index(drop=True)

    def add_evaluation(self, row: dict[str, Any]) -> None:
        """Record one checkpoint's evaluation row (replacing an earlier row of the same step)."""
        table = self.evaluations()
        if len(table):
            table = table[table["step"] != row["step"]]
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True).sort_values("step")
        with storage.atomic_path(self.path / "evaluations.csv") as tmp:
            table.to_csv(tmp, index=False)

    def evaluations(self) -> pd.DataFrame:
        """The evaluation rows recorded so far."""
        path = self.path / "evaluations.csv"
        return pd.read_csv(path) if path.exists() else pd.DataFrame()

    def save_checkpoint(self, step: int, model, tokenizer, state: dict[str, Any]) -> None:
        """Save model and trainer state (tensors and plain values only) as the latest checkpoint, atomically."""
        staging = self.path / (CHECKPOINT_DIR + ".next")
        shutil.rmtree(staging, ignore_errors=True)
        save_causal_lm(model, tokenizer, staging)
        torch.save({"step": step, **state}, staging / TRAINER_STATE)
        target = self.path / CHECKPOINT_DIR
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """``(model folder, trainer state)`` of the latest checkpoint, or ``None``.

        A complete staged checkpoint (a kill between removing the old one and renaming the new one
        into place) counts too: the trainer state is written last, so its presence means complete.
        """
        for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".next"):
            folder = self.path / name
            if (folder / TRAINER_STATE).exists():
                return folder, torch.load(folder / TRAINER_STATE, weights_only=True)
        return None

    def finish(self, model, tokenizer) -> Path:
        """Save the final model, mark the run finished, then drop the checkpoint."""
        final = save_causal_lm(model, tokenizer, self.path / FINAL_DIR)
        storage.write_text_atomic(self.path / storage.DONE_MARKER, "finished\n")
        shutil.rmtree(self.path / CHECKPOINT_DIR, ignore_errors=True)
        return final
