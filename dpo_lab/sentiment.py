"""The ground-truth sentiment scorer: text to reward r(x, y) = p(positive) in [0, 1].

Every later stage sees one interface, :class:`Scorer`, obtained from :func:`load_scorer`, and is
blind to where the ground truth came from:

- :class:`HubScorer` wraps any ``AutoModelForSequenceClassification`` (a hub id such as
  ``siebert/sentiment-roberta-large-english``, the paper's, or a ``save_pretrained`` folder). The
  positive class is looked up **by name** in ``config.id2label``, never by index, so a classifier
  with its labels in the other order gives the same reward. Weights come from safetensors only and
  remote code is never trusted.
- :class:`NgramScorer` is the offline ground truth of the ``tiny`` and ``ci`` profiles: TF-IDF of
  word 1-2-grams and character 2-5-grams (within word boundaries), then logistic regression,
  trained with scikit-learn on the corpus labels by :func:`train_ngram_classifier`. It is stored
  without pickle: vocabularies and settings as JSON (``ngram.json``), idf vectors, weights and
  bias as safetensors (``ngram.safetensors``). Loading rebuilds scikit-learn's vectorizers from
  those files, so scores equal the trained pipeline's ``predict_proba``.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import sklearn
import torch
from safetensors.numpy import load_file, save_file
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from dpo_lab import storage
from dpo_lab.guards import NonFiniteError
from dpo_lab.profiles import GroundTruthSpec

NGRAM_CONFIG = "ngram.json"
NGRAM_TENSORS = "ngram.safetensors"
POSITIVE_ALIASES = ("positive", "pos")
"""Label names accepted as the positive class besides ``GroundTruthSpec.positive_label``."""
VECTORIZER_SETTINGS = {
    "word": {"analyzer": "word", "ngram_range": (1, 2), "lowercase": True, "sublinear_tf": True},
    "char": {"analyzer": "char_wb", "ngram_range": (2, 5), "lowercase": True, "sublinear_tf": True},
}
"""The two TF-IDF feature blocks of :class:`NgramScorer`, concatenated in this order."""


class NonFiniteScoreError(NonFiniteError):
    """A scorer or reward model returned NaN or an infinite value."""


def check_finite_scores(scores: torch.Tensor, describe: Callable[[int], str], source: str,
                        error: type[ValueError] = NonFiniteScoreError) -> None:
    """Raise ``error`` at the first NaN or infinite score of ``scores`` (N,), naming the sample.

    ``describe(i)`` says which sample ``i`` is (its prompt and completion); ``source`` names the scorer.
    """
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise error(f"{source}: score {scores[i].item()} for {describe(i)} ({len(bad)} of {len(scores)} scores "
                    "are not finite)")


class Scorer(abc.ABC):
    """Maps texts to p(positive): the ground-truth reward of the sentiment task."""

    @abc.abstractmethod
    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """p(positive) per text: float32, shape (N,), on the CPU, values in [0, 1]."""


def positive_label_index(id2label: dict, positive_label: str = "positive") -> int:
    """The class index named ``positive_label`` (else a common alias), matched case-insensitively.

    Raises ``ValueError`` listing the classifier's labels when none matches (e.g. ``LABEL_0``/``LABEL_1``:
    set ``GroundTruthSpec.positive_label`` to the right name).
    """
    for names in ((positive_label.lower(),), POSITIVE_ALIASES):
        matches = [int(i) for i, name in id2label.items() if str(name).lower() in names]
        if len(matches) == 1:
            return matches[0]
    labels = ", ".join(f"{i}: {name!r}" for i, name in sorted(id2label.items(), key=lambda kv: int(kv[0])))
    raise ValueError(f"no single label of the classifier matches the positive label {positive_label!r} "
                     f"(nor {', '.join(POSITIVE_ALIASES)}); its labels are {{{labels}}}. "
                     "Set GroundTruthSpec.positive_label to the positive class's name.")


def hub_positive_index(name_or_path: str | os.PathLike, positive_label: str = "positive") -> int:
    """The positive class of a hub classifier from its config alone (no weights): a check before long work."""
    with storage.source(name_or_path) as name:
        return positive_label_index(AutoConfig.from_pretrained(name).id2label, positive_label)


class HubScorer(Scorer):
    """A sequence classifier from the hub or a local folder, read as p(positive label)."""

    def __init__(self, name_or_path: str | os.PathLike, device: torch.device | str = "cpu",
                 spec: GroundTruthSpec | None = None):
        """Load tokenizer and classifier (safetensors, no remote code) and find the positive class by name."""
        self.spec = spec or GroundTruthSpec()
        self.device = torch.device(device)
        with storage.source(name_or_path) as name:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name, dtype=torch.float32, use_safetensors=True).to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.positive_index = positive_label_index(self.model.config.id2label, self.spec.positive_label)

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """Softmax probability of the positive class, in batches of ``spec.batch_size``, truncated to ``spec.max_length``."""
        scores = [torch.zeros(0)]
        for start in range(0, len(texts), self.spec.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.spec.batch_size]), padding=True, truncation=True,
                                   max_length=self.spec.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits.float()
            scores.append(logits.softmax(-1)[:, self.positive_index].cpu())
        return torch.cat(scores)


def _vectorizers(min_df: int) -> dict[str, TfidfVectorizer]:
    """Unfitted TF-IDF vectorizers with :data:`VECTORIZER_SETTINGS`."""
    return {name: TfidfVectorizer(min_df=min_df, **settings) for name, settings in VECTORIZER_SETTINGS.items()}


def _features(vectorizers: dict[str, TfidfVectorizer], texts: Sequence[str]):
    """The concatenated sparse TF-IDF features (N, F) of ``texts``."""
    return hstack([vectorizers[name].transform(texts) for name in VECTORIZER_SETTINGS]).tocsr()


class NgramScorer(Scorer):
    """The offline n-gram classifier, rebuilt without pickle from the files :func:`save_ngram_classifier` wrote."""

    def __init__(self, folder: str | os.PathLike):
        """Rebuild the vectorizers from ``ngram.json`` and read idf, weights and bias from ``ngram.safetensors``."""
        folder = Path(folder)
        config = storage.read_json(folder / NGRAM_CONFIG)
        tensors = load_file(folder / NGRAM_TENSORS)
        self.vectorizers = {}
        for name, block in config["blocks"].items():
            settings = dict(block["settings"], ngram_range=tuple(block["settings"]["ngram_range"]))
            vectorizer = TfidfVectorizer(vocabulary=block["vocabulary"], **settings)
            vectorizer.idf_ = tensors[f"{name}.idf"]
            self.vectorizers[name] = vectorizer
        self.coef = tensors["coef"]
        self.intercept = tensors["intercept"]

    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """sigmoid(w . tfidf(text) + b) per text: logistic regression's p(positive)."""
        if not texts:
            return torch.zeros(0)
        logits = _features(self.vectorizers, list(texts)) @ self.coef + self.intercept
        return torch.sigmoid(torch.from_numpy(np.asarray(logits, dtype=np.float64))).float()


def train_ngram_classifier(texts: Sequence[str], labels: Sequence[int], spec: GroundTruthSpec):
    """Fit the TF-IDF vectorizers and the logistic regression; returns ``(vectorizers, regression)``."""
    vectorizers = _vectorizers(spec.classifier_min_df)
    for vectorizer in vectorizers.values():
        vectorizer.fit(texts)
    regression = LogisticRegression(C=spec.classifier_c, max_iter=2000)
    regression.fit(_features(vectorizers, texts), np.asarray(labels))
    return vectorizers, regression


def save_ngram_classifier(vectorizers: dict[str, TfidfVectorizer], regression: LogisticRegression,
                          folder: str | os.PathLike) -> None:
    """Write the classifier as ``ngram.json`` (settings, vocabularies) and ``ngram.safetensors`` (no pickle)."""
    if list(regression.classes_) != [0, 1]:
        raise ValueError(f"expected classes [0, 1], got {list(regression.classes_)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blocks, tensors = {}, {}
    for name, settings in VECTORIZER_SETTINGS.items():
        vocabulary = vectorizers[name].vocabulary_
        ordered = sorted(vocabulary, key=vocabulary.__getitem__)
        blocks[name] = {"settings": settings, "vocabulary": ordered}
        tensors[f"{name}.idf"] = np.ascontiguousarray(vectorizers[name].idf_, dtype=np.float64)
    tensors["coef"] = np.ascontiguousarray(regression.coef_[0], dtype=np.float64)
    tensors["intercept"] = np.asarray(regression.intercept_, dtype=np.float64)
    storage.write_json(folder / NGRAM_CONFIG, {"blocks": blocks, "sklearn_version": sklearn.__version__,
                                               "positive_class": 1})
    with storage.atomic_path(folder / NGRAM_TENSORS) as tmp:
        save_file(tensors, str(tmp))


def build_ngram_scorer(train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str],
                       test_labels: Sequence[int], spec: GroundTruthSpec, folder: str | os.PathLike) -> dict:
    """Train, save and reload the n-gram classifier; returns its held-out metrics (accuracy on the test split)."""
    vectorizers, regression = train_ngram_classifier(list(train_texts), train_labels, spec)
    save_ngram_classifier(vectorizers, regression, folder)
    scores = NgramScorer(folder).score(list(test_texts))
    accuracy = float(((scores > 0.5).long() == torch.as_tensor(test_labels)).float().mean())
    return {"accuracy": accuracy, "n_train": len(train_texts), "n_test": len(test_texts),
            "n_features": int(regression.coef_.shape[1])}


def load_scorer(name_or_path: str | os.PathLike, device: torch.device | str | None = None,
                spec: GroundTruthSpec | None = None) -> Scorer:
    """The scorer stored at ``name_or_path``: an n-gram folder, else a hub id or classifier folder."""
    if (Path(name_or_path) / NGRAM_CONFIG).is_file():
        return NgramScorer(name_or_path)
    return HubScorer(name_or_path, device or "cpu", spec)


def score_ids(scorer: Scorer, tokenizer, prompts: Sequence[Sequence[int]],
              completions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Score prompt + completion token ids: decoded together without special tokens, shape (N,).

    The scores are returned as they are; :func:`finite_score_ids` also refuses a NaN or infinite one.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    texts = tokenizer.batch_decode([list(p) + list(c) for p, c in zip(prompts, completions)],
                                   skip_special_tokens=True)
    return scorer.score(texts)


def finite_score_ids(scorer: Scorer, tokenizer, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]]) -> torch.Tensor:
    """:func:`score_ids`, raising :class:`NonFiniteScoreError` at a NaN or infinite score, naming its prompt and
    completion: no evaluation, table or statistic is ever computed from one. (PPO and the online methods
    check their rollouts' scores themselves, agreeing across processes first.)"""
    scores = score_ids(scorer, tokenizer, prompts, completions)
    check_finite_scores(scores, lambda i: f"prompt {tokenizer.decode(prompts[i])!r} with completion "
                                          f"{tokenizer.decode(completions[i])!r}", f"the scorer {type(scorer).__name__}")
    return scores
