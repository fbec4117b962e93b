"""The ground-truth scorer: label lookup by name, the pickle-free n-gram classifier, scoring token ids."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from dpo_lab import corpus, lm, sentiment
from dpo_lab.profiles import GroundTruthSpec, get_profile
from dpo_lab.world import prepare

TEXTS = ["A wonderful, moving film.", "Dull and far too long.", "It was fine I guess", "Awful."]


def _save_classifier(folder, tokenizer, id2label, state_dict=None):
    """A tiny GPT-2 sequence classifier with ``id2label``, saved with save_pretrained."""
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=64,
                        num_labels=len(id2label), id2label=id2label,
                        label2id={v: k for k, v in id2label.items()}, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_label_order_does_not_change_p_positive(ci_world, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(ci_world.sft_dir)
    first = _save_classifier(tmp_path / "a", tokenizer, {0: "NEGATIVE", 1: "POSITIVE"})
    swapped = dict(first.state_dict())
    swapped["score.weight"] = swapped["score.weight"].flip(0)
    _save_classifier(tmp_path / "b", tokenizer, {0: "POSITIVE", 1: "NEGATIVE"}, swapped)
    scorer_a = sentiment.load_scorer(tmp_path / "a", "cpu", GroundTruthSpec(batch_size=3))
    scorer_b = sentiment.load_scorer(tmp_path / "b", "cpu", GroundTruthSpec(batch_size=3))
    assert isinstance(scorer_a, sentiment.HubScorer)
    assert (scorer_a.positive_index, scorer_b.positive_index) == (1, 0)
    a, b = scorer_a.score(TEXTS), scorer_b.score(TEXTS)
    assert a.dtype == torch.float32 and a.shape == (len(TEXTS),)
    assert a.std() > 1e-4
    torch.testing.assert_close(a, b)


def test_classifier_without_positive_label_is_a_clear_error(ci_world, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(ci_world.sft_dir)
    _save_classifier(tmp_path, tokenizer, {0: "LABEL_0", 1: "LABEL_1"})
    with pytest.raises(ValueError, match="'LABEL_0', 1: 'LABEL_1'.*GroundTruthSpec.positive_label"):
        sentiment.load_scorer(tmp_path, "cpu")
    with pytest.raises(ValueError, match="LABEL_1"):
        sentiment.hub_positive_index(tmp_path)


def test_world_with_a_hub_style_ground_truth(ci_world, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(ci_world.sft_dir)
    _save_classifier(tmp_path, tokenizer, {0: "negative", 1: "positive"})
    profile = get_profile("ci")
    world = prepare(profile.replace(ground_truth=dataclasses.replace(profile.ground_truth, model=str(tmp_path))),
                    progress=False)
    assert world.sft_dir == ci_world.sft_dir and world.ground_truth == str(tmp_path)
    scorer = world.load_scorer("cpu")
    assert isinstance(scorer, sentiment.HubScorer)
    scores = sentiment.score_ids(scorer, tokenizer, world.test_prompts, world.test_prompts)
    assert scores.shape == (len(world.test_prompts),) and bool(((scores >= 0) & (scores <= 1)).all())


def test_positive_label_lookup_by_name_and_alias():
    assert sentiment.positive_label_index({0: "neg", 1: "pos"}) == 1
    assert sentiment.positive_label_index({"0": "Positive", "1": "Negative"}) == 0
    assert sentiment.positive_label_index({0: "bad", 1: "good"}, positive_label="GOOD") == 1


def test_ngram_scorer_round_trip_matches_sklearn(tmp_path):
    spec = GroundTruthSpec()
    reviews = corpus.load_corpus(get_profile("ci").corpus)
    train, test = reviews["train"], reviews["test"]
    vectorizers, regression = sentiment.train_ngram_classifier(train["text"].tolist(), train["label"].tolist(), spec)
    sentiment.save_ngram_classifier(vectorizers, regression, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [sentiment.NGRAM_CONFIG, sentiment.NGRAM_TENSORS]
    json.loads((tmp_path / sentiment.NGRAM_CONFIG).read_text())
    scorer = sentiment.load_scorer(tmp_path)
    assert isinstance(scorer, sentiment.NgramScorer)
    texts = test["text"].tolist()
    expected = regression.predict_proba(sentiment._features(vectorizers, texts))[:, 1]
    got = scorer.score(texts)
    assert got.dtype == torch.float32 and got.shape == (len(texts),)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    for name, vectorizer in scorer.vectorizers.items():
        assert (vectorizer.transform(texts) != vectorizers[name].transform(texts)).nnz == 0


def test_ci_ground_truth_accuracy(ci_world):
    metrics = json.loads((Path(ci_world.ground_truth).parent / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.6
    test = corpus.load_corpus(get_profile("ci").corpus)["test"]
    scores = ci_world.load_scorer("cpu").score(test["text"].tolist())
    assert ((scores > 0.5).long() == torch.as_tensor(test["label"].tolist())).float().mean() > 0.6
    assert 0.0 <= float(scores.min()) and float(scores.max()) <= 1.0


def test_score_ids_decodes_prompt_and_completion(ci_world):
    model, tokenizer = ci_world.load_policy("cpu")
    scorer = ci_world.load_scorer("cpu")
    prompts = ci_world.test_prompts[:5]
    completions = lm.sample_completions(model, prompts, max_new_tokens=8, eos_id=tokenizer.eos_token_id,
                                        pad_id=tokenizer.pad_token_id, seed=0)
    texts = [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompts, completions)]
    assert all("<|endoftext|>" not in t for t in texts)
    torch.testing.assert_close(sentiment.score_ids(scorer, tokenizer, prompts, completions), scorer.score(texts))


def test_a_nan_score_stops_an_evaluation_naming_the_text(ci_world):
    from dpo_lab.evaluate import evaluate_policy

    class BrokenScorer(sentiment.Scorer):
        def score(self, texts):
            return torch.tensor([0.5] * (len(texts) - 1) + [float("nan")])

    model, tokenizer = ci_world.load_policy("cpu")
    with pytest.raises(sentiment.NonFiniteScoreError, match=r"the scorer BrokenScorer: score nan for prompt .* with completion"):
        evaluate_policy(model, model, tokenizer, BrokenScorer(), ci_world.test_prompts[:4], max_new_tokens=4, seed=0)


def test_a_hub_ground_truths_settings_are_part_of_every_cache_key():
    from dpo_lab.world import ground_truth_key

    hub = GroundTruthSpec(model="some/classifier")
    keys = {ground_truth_key("some/classifier", spec) for spec in (
        hub, dataclasses.replace(hub, positive_label="NEGATIVE"), dataclasses.replace(hub, max_length=16))}
    assert len(keys) == 3
    trained = GroundTruthSpec()  # a classifier trained on the labels: its folder name already holds its settings
    assert ground_truth_key("tiny/ground_truth-ac49ce3e1a/classifier", trained) == "tiny/ground_truth-ac49ce3e1a/classifier"
