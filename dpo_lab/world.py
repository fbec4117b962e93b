"""The sentiment world: corpus, prompts, the SFT policy pi_SFT (= pi_ref) and the ground-truth scorer.

:func:`prepare` builds (or finds in the cache) everything the experiment starts from, stage by
stage, each a :func:`dpo_lab.storage.cached_artifact` folder whose key is the profile sections it
reads plus the folder names of the artifacts it reads, so a changed setting rebuilds exactly the
stages downstream of it:

============== ========================================== ==========================================
stage          key                                        content
============== ========================================== ==========================================
corpus         ``CorpusSpec``                             ``train.parquet``, ``test.parquet``, stats
tokenizer      base, vocab size, context, corpus          ``tokenizer/`` (``save_pretrained``)
prompts        ``PromptSpec``, corpus, tokenizer          ``prompts.json`` (token ids, train/test)
ground_truth   ``GroundTruthSpec``, corpus                ``classifier/`` and ``metrics.json``
               (only when ``GroundTruthSpec.model`` is    (held-out accuracy)
               empty; a hub classifier is used as is,
               its positive label checked up front)
sft            ``PolicySpec``, precision, prompt lengths, ``policy/`` (model + tokenizer),
               corpus, tokenizer                          ``metrics.json``, ``samples.json``
score_spread   sft, ground truth, prompts, sampling       ``metrics.json``: p(positive) of 4 SFT
                                                          samples for each of 64 test prompts
============== ========================================== ==========================================

The last stage is a health check of the world: preference pairs carry signal only if the ground
truth's scores vary between completions of the same prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_lab import corpus, lm, runtime, sentiment, storage
from dpo_lab.profiles import GroundTruthSpec, Profile
from dpo_lab.train import sft

SFT_SAMPLES = 10
"""Completions written to the SFT folder's ``samples.json`` (for the first test prompts)."""
SPREAD_PROMPTS = 64
SPREAD_SAMPLES_PER_PROMPT = 4
SPREAD_SEED = 0


@dataclass(frozen=True)
class World:
    """Everything the experiment starts from, as built by :func:`prepare`."""

    profile: Profile
    """The profile the world was built for."""
    sft_dir: Path
    """``save_pretrained`` folder of pi_SFT (= pi_ref): model and tokenizer."""
    ground_truth: str
    """Hub id or local folder of the ground-truth scorer, loadable by :func:`dpo_lab.sentiment.load_scorer`."""
    train_prompts: list[list[int]]
    """Prompt token ids from the train split (preference data, PPO rollouts)."""
    test_prompts: list[list[int]]
    """Prompt token ids from the test split: the evaluation set."""

    def load_policy(self, device: torch.device | str | None = None):
        """``(model, tokenizer)`` of pi_SFT, in eval mode, on ``device`` (default: the best available)."""
        return lm.load_causal_lm(self.sft_dir, runtime.pick_device(device))

    @property
    def ground_truth_key(self) -> str:
        """The ground truth's identity in cache keys: :func:`dpo_lab.storage.cache_name` of it, plus, for a hub
        classifier, the settings that change its scores (the positive label and the truncation length)."""
        return ground_truth_key(self.ground_truth, self.profile.ground_truth)

    def load_scorer(self, device: torch.device | str | None = None) -> sentiment.Scorer:
        """The ground-truth :class:`~dpo_lab.sentiment.Scorer` on ``device`` (default: the best available)."""
        return sentiment.load_scorer(self.ground_truth, runtime.pick_device(device), self.profile.ground_truth)


def ground_truth_key(name_or_path: str, truth: GroundTruthSpec) -> str:
    """See :attr:`World.ground_truth_key` (a classifier trained on the labels: its cache folder says it all)."""
    key = storage.cache_name(name_or_path)
    return f"{key} (positive_label={truth.positive_label}, max_length={truth.max_length})" if truth.model else key


def _score_spread(world: World, folder: Path, device: torch.device) -> None:
    """Score 4 pi_SFT samples for each of the first 64 test prompts; write mean, spread and lengths."""
    model, tokenizer = world.load_policy(device)
    prompts = world.test_prompts[:SPREAD_PROMPTS]
    repeated = [p for p in prompts for _ in range(SPREAD_SAMPLES_PER_PROMPT)]
    sampling = world.profile.sampling
    completions = lm.sample_completions(model, repeated, max_new_tokens=sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                        batch_size=sampling.batch_size, seed=SPREAD_SEED)
    scores = sentiment.finite_score_ids(world.load_scorer(device), tokenizer, repeated, completions)
    per_prompt = scores.view(len(prompts), SPREAD_SAMPLES_PER_PROMPT)
    storage.write_json(folder / "metrics.json", {
        "prompts": len(prompts), "samples_per_prompt": SPREAD_SAMPLES_PER_PROMPT,
        "score_mean": float(scores.mean()), "score_std": float(scores.std()),
        "score_std_within_prompt": float(per_prompt.var(dim=1).mean().sqrt()),
        "mean_completion_tokens": sum(map(len, completions)) / len(completions),
        "eos_fraction": sum(bool(c) and c[-1] == tokenizer.eos_token_id for c in completions) / len(completions),
    })


class WorldBuilder:
    """Builds or reuses each stage of the module docstring's table, recording ``{stage: (folder, seconds)}``."""

    def __init__(self, profile: Profile, device: torch.device | str | None, progress: bool):
        """Sets torch's CPU threads to the profile's ``threads`` (:func:`dpo_lab.runtime.use_threads`), so every
        stage, notebook and command that starts here runs at the profile's setting. The world's profile
        carries the mixed precision resolved for the device (``auto`` becomes bf16, fp16 or ``no``:
        :func:`dpo_lab.runtime.resolve_precision`), so cache keys and run folders name the precision used."""
        runtime.use_threads(profile.threads)
        self.device, self.progress = runtime.pick_device(device), progress
        self.profile = profile.replace(mixed_precision=runtime.resolve_precision(profile.mixed_precision, self.device))
        self.stages: dict[str, tuple[Path, float]] = {}

    def stage(self, name: str, config: dict, build, collective: bool = False) -> Path:
        """Build or reuse one artifact folder, recording it and the seconds it took (``collective``: see
        :func:`dpo_lab.storage.cached_artifact`)."""
        started = time.time()
        folder = storage.cached_artifact(self.profile.name, name, config, build, collective=collective)
        self.stages[name] = (folder, time.time() - started)
        return folder

    @functools.cached_property
    def corpus_dir(self) -> Path:
        """Fetch, validate, clean and subsample the corpus."""
        return self.stage("corpus", {"corpus": storage.keyed(self.profile.corpus, "source")},
                          lambda folder: corpus.save_corpus(corpus.load_corpus(self.profile.corpus), folder))

    @functools.cached_property
    def reviews(self) -> dict:
        """The corpus splits as data frames (read on first use)."""
        return corpus.read_parquet_folder(self.corpus_dir)

    def texts(self, split: str) -> list[str]:
        """The review texts of ``split``."""
        return self.reviews[split]["text"].tolist()

    @functools.cached_property
    def tokenizer_dir(self) -> Path:
        """The policy's tokenizer folder: trained on the corpus (from scratch) or the base model's."""
        policy = self.profile.policy
        config = {"base": storage.cache_name(policy.base) if policy.base else "", "tokenizer": policy.tokenizer,
                  "vocab_size": policy.vocab_size, "n_positions": policy.n_positions, "corpus": self.corpus_dir.name}
        return self.stage("tokenizer", config,
                          lambda folder: sft.build_tokenizer(policy, self.texts("train"), folder / "tokenizer")) \
            / "tokenizer"

    @functools.cached_property
    def tokenizer(self):
        """The policy's tokenizer (loaded on first use)."""
        return lm.load_tokenizer(self.tokenizer_dir)

    def prefixes(self, split: str, spec, n: int) -> list[list[int]]:
        """``n`` prompts of ``spec``'s lengths, cut from the reviews of ``split``.

        Fewer usable reviews than ``n`` is reported (one line: how many prompts there will be),
        none at all raises :class:`dpo_lab.corpus.CorpusError`; both before any training.
        """
        prompts = corpus.sample_prefixes(self.texts(split), self.tokenizer, n, spec.min_tokens, spec.max_tokens,
                                         spec.seed)
        where = f"the {split} split of {self.corpus_dir}"
        if not prompts:
            raise corpus.CorpusError(f"{where}: no review is long enough for a {spec.min_tokens}-{spec.max_tokens} "
                                     f"token prompt plus {corpus.MIN_CONTINUATION_TOKENS} tokens")
        if len(prompts) < n:
            storage.log.warning("%s gives %d %s prompts, fewer than the %d the profile asks for; using %d",
                                where, len(prompts), split, n, len(prompts))
        return prompts

    @functools.cached_property
    def prompts_dir(self) -> Path:
        """The train and test prompts, as token ids."""
        spec = self.profile.prompts
        config = {"prompts": spec, "corpus": self.corpus_dir.name, "tokenizer": self.tokenizer_dir.parent.name}
        return self.stage("prompts", config, lambda folder: storage.write_json(folder / "prompts.json", {
            split: self.prefixes(split, spec, n) for split, n in (("train", spec.n_train), ("test", spec.n_test))}))

    def ground_truth(self) -> tuple[str, str]:
        """``(loadable name, cache key)`` of the ground truth: a hub classifier as is, or one trained on the labels."""
        truth = self.profile.ground_truth
        if truth.model:
            sentiment.hub_positive_index(truth.model, truth.positive_label)
            return truth.model, ground_truth_key(truth.model, truth)

        def write(folder: Path) -> None:
            train, test = self.reviews["train"], self.reviews["test"]
            metrics = sentiment.build_ngram_scorer(train["text"].tolist(), train["label"].tolist(),
                                                   test["text"].tolist(), test["label"].tolist(), truth,
                                                   folder / "classifier")
            storage.write_json(folder / "metrics.json", metrics)

        folder = self.stage("ground_truth", {"ground_truth": truth, "corpus": self.corpus_dir.name}, write)
        return str(folder / "classifier"), folder.name

    def sft_dir(self) -> Path:
        """Train pi_SFT (with samples for the first test prompts)."""
        profile = self.profile
        sample_spec = dataclasses.replace(profile.prompts, n_train=0, n_test=SFT_SAMPLES)

        def write(folder: Path) -> None:
            sft.train_sft(profile.policy, self.tokenizer_dir, self.texts("train"), self.texts("test"), folder,
                          sample_prompts=self.prefixes("test", sample_spec, SFT_SAMPLES),
                          mixed_precision=profile.mixed_precision, device=self.device, progress=self.progress)

        return self.stage("sft", {"policy": storage.keyed(profile.policy, "base"),
                                  "mixed_precision": profile.mixed_precision,
                                  "sample_prompts": sample_spec, "corpus": self.corpus_dir.name,
                                  "tokenizer": self.tokenizer_dir.parent.name}, write, collective=True)

    def build(self) -> World:
        """Every stage in order; the score-spread health check last."""
        prompts = storage.read_json(self.prompts_dir / "prompts.json")
        ground_truth, truth_key = self.ground_truth()
        sft_dir = self.sft_dir()
        world = World(profile=self.profile, sft_dir=sft_dir / "policy", ground_truth=ground_truth,
                      train_prompts=prompts["train"], test_prompts=prompts["test"])
        self.stage("score_spread", {"sft": sft_dir.name, "ground_truth": truth_key, "prompts": self.prompts_dir.name,
                                    "sampling": self.profile.sampling, "prompts_used": SPREAD_PROMPTS,
                                    "samples_per_prompt": SPREAD_SAMPLES_PER_PROMPT, "seed": SPREAD_SEED},
                   lambda folder: _score_spread(world, folder, self.device))
        return world


def prepare(profile: Profile, device: torch.device | str | None = None, progress: bool = True) -> World:
    """Build (or reuse from the cache) the corpus, prompts, pi_SFT and ground truth of ``profile``.

    A second call with nothing changed only reads the cache (well under a second). Bad input (an
    unreachable hub or PyPI, a malformed local corpus) fails in the first stage, before any training.
    Threads and precision: see :class:`WorldBuilder` (``dpo-lab prepare`` uses it directly).
    """
    return WorldBuilder(profile, device, progress).build()


def summary(world: World, stages: dict, seconds: float) -> str:
    """A few lines per stage: folder, built or reused, and its headline numbers."""
    def metrics(name: str, file: str = "metrics.json") -> dict:
        """A stage's JSON file."""
        return storage.read_json(stages[name][0] / file)

    stats = metrics("corpus", "stats.json")
    notes = {
        "corpus": f"train {stats['train']['docs']} docs ({stats['train']['positive']} positive), "
                  f"test {stats['test']['docs']} docs ({stats['test']['positive']} positive)",
        "tokenizer": f"{len(lm.load_tokenizer(stages['tokenizer'][0] / 'tokenizer'))} tokens",
        "prompts": f"train {len(world.train_prompts)}, test {len(world.test_prompts)} prompts of "
                   f"{world.profile.prompts.min_tokens}-{world.profile.prompts.max_tokens} tokens",
        "sft": "validation perplexity {val_perplexity:.1f}, {parameters:,} parameters, {steps} steps, "
               "trained in {train_seconds:.0f} s".format(**metrics("sft")),
        "score_spread": "p(positive) of SFT samples: mean {score_mean:.3f}, std {score_std:.3f}, within-prompt "
                        "std {score_std_within_prompt:.3f}, EOS in {eos_fraction:.0%}".format(**metrics("score_spread")),
    }
    if "ground_truth" in stages:
        notes["ground_truth"] = "held-out accuracy {accuracy:.3f} ({n_features:,} n-gram features)".format(
            **metrics("ground_truth"))
    lines = [f"profile {world.profile.name}: prepared in {seconds:.1f} s",
             f"  policy (pi_SFT = pi_ref): {world.sft_dir}", f"  ground truth: {world.ground_truth}"]
    width = max(map(len, stages))
    for name, (folder, took) in stages.items():
        lines.append(f"  {name.ljust(width)}  {took:6.1f} s  {folder.name}  {notes[name]}")
    return "\n".join(lines)
