"""Preference pairs: sample from pi_SFT, score with the ground truth, rank (paper Appendix C.1).

For each of the first ``PreferenceSpec.n_prompts`` training prompts x, K = ``samples_per_prompt``
completions y_1..y_K ~ pi_SFT(.|x) are sampled (temperature 1, no top-k/top-p, one seeded call
of :func:`dpo_lab.lm.sample_completions`), each scored by the ground truth r*(x, y) = p(positive
| decoded x + y), and all K(K-1)/2 pairs are kept with the higher-scoring completion as the
preferred one y_w. These are the triples (x, y_w, y_l) of the dataset D in Eq. 2 (reward model)
and Eq. 7 (DPO). The paper draws 4 completions for each of 25k IMDb prefixes: about 150k pairs.

The dataset (:data:`COLUMNS`) follows TRL's layout, prompt and completions as separate texts:
``prompt``, ``chosen``, ``rejected`` (decoded without special tokens) and ``score_chosen``,
``score_rejected``, ``prompt_id`` (index into ``world.train_prompts``), plus the token ids
``prompt_ids``, ``chosen_ids``, ``rejected_ids`` so that trainers compute log-probabilities of
exactly the sampled tokens (a generated EOS included) instead of re-tokenising text.

What is *not* turned into a pair, counted in ``summary.json`` and never silently kept:

- a completion whose text is empty or blank (the policy emitted EOS at once): the sample is
  skipped; its prompt keeps the pairs among its other samples;
- a pair whose two scores are exactly equal, or whose two completion texts are identical
  (the ground truth cannot prefer a text over itself): a tie, dropped.

A ground truth returning NaN or an infinite score is a broken scorer, not a property of one
sample: the build stops with :class:`PreferenceDataError` naming the prompt and completion.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from dpo_lab import lm, sentiment, storage

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
COLUMNS = TEXT_COLUMNS + SCORE_COLUMNS + ("prompt_id",) + ID_COLUMNS
"""Every column :func:`build_preferences` writes, in order."""
REQUIRED_COLUMNS = TEXT_COLUMNS + ("prompt_id",) + ID_COLUMNS
"""Columns the trainers need (the scores are informative only)."""
FEATURES = datasets.Features({
    **{name: datasets.Value("string") for name in TEXT_COLUMNS},
    **{name: datasets.Value("float32") for name in SCORE_COLUMNS},
    "prompt_id": datasets.Value("int64"),
    **{name: datasets.List(datasets.Value("int64")) for name in ID_COLUMNS},
})
GAP_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
"""Quantiles of score_chosen - score_rejected reported in ``summary.json``."""
SUMMARY = "summary.json"


class PreferenceDataError(ValueError):
    """Unusable preference data; the message names the source, the column and the first bad row."""


def is_blank(text: str) -> bool:
    """Whether a decoded completion carries no text (empty or whitespace only)."""
    return not text.strip()


def pairs_from_scores(scores: Sequence[float], keys: Sequence[Hashable] | None = None
                      ) -> tuple[list[tuple[int, int]], int]:
    """All K(K-1)/2 pairs of K samples of one prompt as ``(winner, loser)`` indices, and the ties dropped.

    ``scores``: (K,) ground-truth rewards; the winner is the higher score. A pair is a tie, and is
    dropped, when the two scores are exactly equal or when ``keys`` (e.g. the completion texts)
    are equal: the same text cannot be preferred to itself, even if a batched GPU scorer gives it
    two slightly different scores. Pairs come in the order (0, 1), (0, 2), ..., (K-2, K-1).
    """
    if keys is not None and len(keys) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(keys)} keys")
    pairs: list[tuple[int, int]] = []
    ties = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] == scores[j] or (keys is not None and keys[i] == keys[j]):
                ties += 1
            else:
                pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs, ties


def check_finite_scores(scores: torch.Tensor, prompt_texts: Sequence[str], completion_texts: Sequence[str],
                        prompt_ids: Sequence[int], source: str) -> None:
    """Raise :class:`PreferenceDataError` at the first NaN or infinite score, naming prompt and completion."""
    if scores.shape != (len(completion_texts),):
        raise PreferenceDataError(f"{source}: returned scores of shape {tuple(scores.shape)} for "
                                  f"{len(completion_texts)} texts")
    sentiment.check_finite_scores(
        scores, lambda i: f"training prompt {prompt_ids[i]} {prompt_texts[i]!r} with completion {completion_texts[i]!r}",
        f"{source} (the ground truth must return p(positive) in [0, 1])", error=PreferenceDataError)


def rank_samples(prompt_ids: Sequence[int], prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                 prompt_texts: Sequence[str], completion_texts: Sequence[str], scores: torch.Tensor,
                 samples_per_prompt: int) -> tuple[dict[str, list], dict[str, int]]:
    """Turn K consecutive samples per prompt into pair rows (:data:`COLUMNS`) and counts of what was dropped.

    Inputs are flat, prompt-major: sample ``k`` of prompt ``n`` sits at ``n * K + k``. Blank
    completions are skipped; pairs come from :func:`pairs_from_scores` keyed by completion text.
    Returns the column dict and ``{"skipped_blank", "ties_dropped", "prompts_without_pairs"}``.
    """
    rows: dict[str, list] = {name: [] for name in COLUMNS}
    counts = {"skipped_blank": 0, "ties_dropped": 0, "prompts_without_pairs": 0}
    for start in range(0, len(completions), samples_per_prompt):
        kept = [i for i in range(start, start + samples_per_prompt) if not is_blank(completion_texts[i])]
        counts["skipped_blank"] += samples_per_prompt - len(kept)
        pairs, ties = pairs_from_scores([scores[i].item() for i in kept], [completion_texts[i] for i in kept])
        counts["ties_dropped"] += ties
        counts["prompts_without_pairs"] += not pairs
        for win, lose in ((kept[a], kept[b]) for a, b in pairs):
            for name, value in (("prompt", prompt_texts[win]), ("chosen", completion_texts[win]),
                                ("rejected", completion_texts[lose]), ("score_chosen", scores[win].item()),
                                ("score_rejected", scores[lose].item()), ("prompt_id", prompt_ids[win]),
                                ("prompt_ids", list(prompts[win])), ("chosen_ids", list(completions[win])),
                                ("rejected_ids", list(completions[lose]))):
                rows[name].append(value)
    return rows, counts


def preference_config(world) -> dict:
    """The cache key of the preference data: its spec, the sampling spec, pi_SFT, the ground truth, the prompts."""
    profile = world.profile
    return {"preferences": profile.preferences, "sampling": profile.sampling, "sft": storage.cache_name(world.sft_dir),
            "ground_truth": world.ground_truth_key,
            "prompts": storage.fingerprint(world.train_prompts[:profile.preferences.n_prompts])}


def score_texts(scorer: sentiment.Scorer, texts: Sequence[str], batch_size: int, progress: bool) -> torch.Tensor:
    """Ground-truth scores (N,) of ``texts``, in chunks of ``batch_size`` under a progress bar."""
    chunks = [scorer.score(texts[start:start + batch_size])
              for start in tqdm(range(0, len(texts), batch_size), desc="scoring", disable=not progress, leave=False)]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def score_gaps(dataset: datasets.Dataset) -> np.ndarray:
    """r*(x, y_w) - r*(x, y_l) of every pair (N,): how clear each preference is to the ground truth."""
    return np.asarray(dataset["score_chosen"]) - np.asarray(dataset["score_rejected"])


def _build(world, folder: Path, device, progress: bool) -> None:
    """Sample, score, pair and write ``folder``: the dataset and ``summary.json``."""
    profile = world.profile
    spec, sampling = profile.preferences, profile.sampling
    started = time.time()
    model, tokenizer = world.load_policy(device)
    scorer = world.load_scorer(device)
    prompt_ids = [n for n in range(spec.n_prompts) for _ in range(spec.samples_per_prompt)]
    prompts = [world.train_prompts[n] for n in prompt_ids]
    completions = lm.sample_completions(model, prompts, max_new_tokens=sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                        batch_size=sampling.batch_size, seed=spec.seed, progress=progress,
                                        desc="sampling preference completions")
    sampled = time.time()
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    completion_texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    texts = tokenizer.batch_decode([p + c for p, c in zip(prompts, completions)], skip_special_tokens=True)
    scores = score_texts(scorer, texts, profile.ground_truth.batch_size, progress)
    check_finite_scores(scores, prompt_texts, completion_texts, prompt_ids, f"ground truth {world.ground_truth}")
    rows, counts = rank_samples(prompt_ids, prompts, completions, prompt_texts, completion_texts, scores,
                                spec.samples_per_prompt)
    if not rows["prompt"]:
        raise PreferenceDataError(
            f"no usable preference pairs from {spec.n_prompts} prompts x {spec.samples_per_prompt} samples of "
            f"{world.sft_dir}: {counts['skipped_blank']} completions were blank and {counts['ties_dropped']} pairs "
            "tied; is the policy emitting only EOS, or the ground truth constant?")
    dataset = datasets.Dataset.from_dict(rows, features=FEATURES)
    validate_preferences(dataset, source=f"preferences built in {folder}")
    dataset.save_to_disk(str(folder))
    gaps = score_gaps(dataset)
    storage.write_json(folder / SUMMARY, {
        "prompts": spec.n_prompts, "samples_per_prompt": spec.samples_per_prompt, "completions": len(completions),
        "pairs": len(dataset), "pairs_possible": spec.n_prompts * spec.samples_per_prompt
        * (spec.samples_per_prompt - 1) // 2, **counts,
        "score_mean": scores.mean().item(), "score_std": scores.std().item(),
        "score_gap_quantiles": {f"q{round(100 * q)}": float(np.quantile(gaps, q)) for q in GAP_QUANTILES},
        "mean_completion_tokens": sum(map(len, completions)) / len(completions),
        "eos_fraction": sum(bool(c) and c[-1] == tokenizer.eos_token_id for c in completions) / len(completions),
        "sampling_seconds": sampled - started, "seconds": time.time() - started,
    })


def build_preferences(world, device: torch.device | str | None = None, progress: bool = True) -> Path:
    """Build (or find in the cache) the preference pairs of ``world`` and return their folder.

    ``world``: a :class:`dpo_lab.world.World`. The folder holds the ``datasets.Dataset``
    (``save_to_disk``; read it with :func:`load_preferences`) and ``summary.json`` (counts, score
    statistics, quantiles of :func:`score_gaps`). Raises :class:`PreferenceDataError` for a non-finite ground-truth score or
    when no pair survives, and ``ValueError`` before any sampling when the world has fewer training
    prompts than ``PreferenceSpec.n_prompts``.
    """
    spec = world.profile.preferences
    if spec.n_prompts > len(world.train_prompts):
        raise ValueError(f"PreferenceSpec.n_prompts={spec.n_prompts} but the world has only "
                         f"{len(world.train_prompts)} training prompts (PromptSpec.n_train)")
    return storage.cached_artifact(world.profile.name, "preferences", preference_config(world),
                                   lambda folder: _build(world, folder, device, progress))


def validate_preferences(dataset: datasets.Dataset, source: str = "preference dataset") -> None:
    """Raise :class:`PreferenceDataError` naming ``source``, the column and the first bad row.

    Checks, before any training starts: the :data:`REQUIRED_COLUMNS` exist; the dataset has rows;
    no completion is blank (text or ids) and no prompt lacks ids (a prompt's *text* may decode
    blank: on ``tiny`` 84 of 12,000 prompts are words outside the vocabulary, ``<|unk|>``); no
    token id is negative; chosen and rejected differ (text and ids); and, where the score columns
    exist, every score is a finite number and chosen never scores below rejected.
    """
    missing = [name for name in REQUIRED_COLUMNS if name not in dataset.column_names]
    if missing:
        raise PreferenceDataError(f"{source}: missing column(s) {', '.join(map(repr, missing))}; "
                                  f"found {dataset.column_names}, need {list(REQUIRED_COLUMNS)}")
    if len(dataset) == 0:
        raise PreferenceDataError(f"{source}: no preference pairs (0 rows)")

    def fail(column: str, row: int, problem: str) -> None:
        raise PreferenceDataError(f"{source}: column {column!r}, row {row}: {problem} "
                                  f"(prompt {dataset[row]['prompt']!r})")

    columns = {name: dataset[name] for name in REQUIRED_COLUMNS + SCORE_COLUMNS if name in dataset.column_names}
    for column in ("chosen", "rejected"):
        for row, text in enumerate(columns[column]):
            if text is None or is_blank(text):
                fail(column, row, f"empty completion {text!r}")
    for column in ID_COLUMNS:
        for row, ids in enumerate(columns[column]):
            if not ids:
                fail(column, row, "no token ids")
            if min(ids) < 0:
                fail(column, row, f"a negative token id ({min(ids)})")
    for chosen_column, rejected_column in (("chosen", "rejected"), ("chosen_ids", "rejected_ids")):
        for row, (chosen, rejected) in enumerate(zip(columns[chosen_column], columns[rejected_column])):
            if list(chosen) == list(rejected):
                fail(rejected_column, row, f"{chosen_column} and {rejected_column} are the same completion")
    if all(name in columns for name in SCORE_COLUMNS):
        for row, (chosen, rejected) in enumerate(zip(columns["score_chosen"], columns["score_rejected"])):
            chosen_ok, rejected_ok = (isinstance(s, numbers.Real) and np.isfinite(s) for s in (chosen, rejected))
            if not (chosen_ok and rejected_ok):
                fail("score_chosen" if not chosen_ok else "score_rejected", row,
                     f"a score that is not a finite number ({chosen}, {rejected})")
            if chosen < rejected:
                fail("score_chosen", row, f"chosen scores below rejected ({chosen} < {rejected})")


def load_preferences(path: str | os.PathLike) -> datasets.Dataset:
    """The preference dataset in the folder ``path`` (as returned by :func:`build_preferences`), validated."""
    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise PreferenceDataError(f"{path}: not a preference dataset folder (no dataset_info.json); "
                                  "build one with `dpo-lab preferences` or build_preferences(world)")
    dataset = datasets.load_from_disk(str(path))
    validate_preferences(dataset, source=str(path))
    return dataset
