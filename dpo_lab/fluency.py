"""The fluency pass: the judge's perplexity of the samples every evaluated checkpoint kept.

Each run folder keeps the decoded samples of each evaluated checkpoint (``samples.json``, by step:
prompt plus completion for the first test prompts, :mod:`dpo_lab.runs`). This pass reads them for
every run of a results table, has the judge (:mod:`dpo_lab.judge`) score each distinct text once,
and returns one row per checkpoint: ``fluency`` (the judge's perplexity of its samples, the geometric
mean over them), ``fluency_se`` (its standard error) and ``fluency_n`` (the samples judged). A
checkpoint whose run kept no samples (trained before samples were kept, or Best-of-N) gets NaN.

The per-text log-perplexities are cached in ``<DPO_LAB_HOME>/<profile>/fluency-<judge>.json``
(``<judge>``: the judge's :func:`dpo_lab.storage.cache_name`, made safe for a file name), keyed by
the text's sha256, so a second pass, or one after a few more runs, judges only new text.
A cache that cannot be read is reported and rebuilt, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable

import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo_lab import storage
from dpo_lab.judge import DEFAULT_JUDGE, load_judge, log_perplexities, perplexity
from dpo_lab.runs import SAMPLES_FILE

FLUENCY_FILE = "fluency.csv"
COLUMNS = ["run_id", "step", "fluency", "fluency_se", "fluency_n"]


def text_key(text: str) -> str:
    """The cache key of a judged text."""
    return hashlib.sha256(text.encode()).hexdigest()


def kept_texts(profile_name: str, run_ids: Iterable[str]) -> dict[tuple[str, int], list[str]]:
    """``{(run_id, step): [prompt + completion, ...]}`` for every evaluated checkpoint whose run kept samples."""
    runs = storage.profile_dir(profile_name) / "runs"
    texts = {}
    for run_id in run_ids:
        path = runs / run_id / SAMPLES_FILE
        if path.exists():
            for step, samples in storage.read_json(path).items():
                texts[(run_id, int(step))] = [s["prompt"] + s["completion"] for s in samples]
    return texts


def read_cache(path) -> dict[str, float]:
    """The cached log-perplexities, or an empty cache (reported) if the file cannot be read."""
    if not path.exists():
        return {}
    try:
        cache = storage.read_json(path)
        if isinstance(cache, dict) and all(isinstance(v, (int, float)) for v in cache.values()):
            return cache
    except (OSError, ValueError, json.JSONDecodeError):
        pass
    storage.log.warning("%s: unreadable fluency cache; judging every text again", path)
    return {}


def judge_texts(profile_name: str, texts: list[str], judge: str, batch_size: int, progress: bool) -> dict[str, float]:
    """The log-perplexity of each text by its :func:`text_key`, from the cache or judged now (then cached).

    The cache file is named by the judge's :func:`dpo_lab.storage.cache_name`: a judge folder outside the
    cache is named with its content hash, so an edited judge never reuses the old verdicts (one inside
    the cache is a fingerprinted artifact folder already).
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", storage.cache_name(judge))
    path = storage.profile_dir(profile_name) / f"fluency-{name}.json"
    cache = read_cache(path)
    missing = list(dict.fromkeys(t for t in texts if text_key(t) not in cache))
    if missing:
        model, tokenizer = load_judge(judge)
        for start in tqdm(range(0, len(missing), 256), desc=f"judging {len(missing)} texts", disable=not progress):
            chunk = missing[start:start + 256]
            for text, value in zip(chunk, log_perplexities(model, tokenizer, chunk, batch_size).tolist()):
                cache[text_key(text)] = value
            storage.write_json(path, cache)
    return cache


def fluency_table(profile_name: str, table: pd.DataFrame, judge: str = DEFAULT_JUDGE, batch_size: int = 16,
                  progress: bool = True) -> pd.DataFrame:
    """One row per evaluated checkpoint of ``table`` that kept samples: :data:`COLUMNS` (see the module docstring)."""
    texts = kept_texts(profile_name, table["run_id"].unique())
    cache = judge_texts(profile_name, [t for group in texts.values() for t in group], judge, batch_size, progress)
    rows = []
    for (run_id, step), group in texts.items():
        values = torch.tensor([cache[text_key(t)] for t in group], dtype=torch.float64)
        ppl, se = perplexity(values)
        rows.append({"run_id": run_id, "step": step, "fluency": ppl, "fluency_se": se,
                     "fluency_n": int((~torch.isnan(values)).sum())})
    return pd.DataFrame(rows, columns=COLUMNS)


def with_fluency(table: pd.DataFrame, fluency: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the fluency columns joined on (run_id, step); NaN where none was measured."""
    joined = table.drop(columns=[c for c in COLUMNS[2:] if c in table.columns])
    return joined.merge(fluency, on=["run_id", "step"], how="left", validate="many_to_one")


def fluency_path(profile_name: str):
    """``data/results/<profile>/fluency.csv``."""
    return storage.results_dir(profile_name) / FLUENCY_FILE
