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
from dpo_lab.profiles import Profile, get_profile
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

    def load_scorer(self, device: torch.device | str | None = None) -> sentiment.Scorer:
        """The ground-truth :class:`~dpo_lab.sentiment.Scorer` on ``device`` (default: the best available)."""
        return sentiment.load_scorer(self.ground_truth, runtime.pick_device(device), self.profile.ground_truth)


def _score_spread(world: World, folder: Path, device: torch.device) -> None:
    """Score 4 pi_SFT samples for each of the first 64 test prompts; write mean, spread and lengths."""
    model, tokenizer = world.load_policy(device)
    prompts = world.test_prompts[:SPREAD_PROMPTS]
    repeated = [p for p in prompts for _ in range(SPREAD_SAMPLES_PER_PROMPT)]
    sampling = world.profile.sampling
    completions = lm.sample_completions(model, repeated, max_new_tokens=sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                        batch_size=sampling.batch_size, seed=SPREAD_SEED)
    scores = sentiment.score_ids(world.load_scorer(device), tokenizer, repeated, completions)
    per_prompt = scores.view(len(prompts), SPREAD_SAMPLES_PER_PROMPT)
    storage.write_json(folder / "metrics.json", {
        "prompts": len(prompts), "samples_per_prompt": SPREAD_SAMPLES_PER_PROMPT,
        "score_mean": float(scores.mean()), "score_std": float(scores.std()),
        "score_std_within_prompt": float(per_prompt.var(dim=1).mean().sqrt()),
        "mean_completion_tokens": sum(map(len, completions)) / len(completions),
        "eos_fraction": sum(bool(c) and c[-1] == tokenizer.eos_token_id for c in completions) / len(completions),
    })


def _build(profile: Profile, device: torch.device | str | None, progress: bool) -> tuple[World, dict]:
    """Build or reuse every stage; returns the world and ``{stage: (folder, seconds)}``."""
    device = runtime.pick_device(device)
    stages: dict[str, tuple[Path, float]] = {}

    def stage(name: str, config: dict, build) -> Path:
        """Build or reuse one artifact folder, recording it and the seconds it took."""
        started = time.time()
        folder = storage.cached_artifact(profile.name, name, config, build)
        stages[name] = (folder, time.time() - started)
        return folder

    def write_corpus(folder: Path) -> None:
        """Fetch, validate, clean and subsample the corpus into ``folder``."""
        corpus.save_corpus(corpus.load_corpus(profile.corpus), folder)

    corpus_dir = stage("corpus", {"corpus": profile.corpus}, write_corpus)
    reviews = functools.cache(lambda: corpus.read_parquet_folder(corpus_dir))
    texts = {split: lambda split=split: reviews()[split]["text"].tolist() for split in corpus.SPLITS}
    policy, prompt_spec = profile.policy, profile.prompts

    tokenizer_dir = stage("tokenizer", {"base": policy.base, "vocab_size": policy.vocab_size,
                                        "n_positions": policy.n_positions, "corpus": corpus_dir.name},
                          lambda folder: sft.build_tokenizer(policy, texts["train"](), folder / "tokenizer"))
    tokenizer = functools.cache(lambda: lm.load_tokenizer(tokenizer_dir / "tokenizer"))

    def write_prompts(folder: Path) -> None:
        """Cut the train and test prompts and write them as token ids."""
        prompts = {split: corpus.sample_prefixes(texts[split](), tokenizer(), n, prompt_spec.min_tokens,
                                                 prompt_spec.max_tokens, prompt_spec.seed)
                   for split, n in (("train", prompt_spec.n_train), ("test", prompt_spec.n_test))}
        storage.write_json(folder / "prompts.json", prompts)

    prompts_dir = stage("prompts", {"prompts": prompt_spec, "corpus": corpus_dir.name,
                                    "tokenizer": tokenizer_dir.name}, write_prompts)
    prompts = storage.read_json(prompts_dir / "prompts.json")

    truth = profile.ground_truth
    if truth.model:
        sentiment.hub_positive_index(truth.model, truth.positive_label)
        ground_truth, truth_key = truth.model, truth.model
    else:
        def write_ground_truth(folder: Path) -> None:
            """Train the n-gram classifier on the corpus labels and record its held-out accuracy."""
            train, test = reviews()["train"], reviews()["test"]
            metrics = sentiment.build_ngram_scorer(train["text"].tolist(), train["label"].tolist(),
                                                   test["text"].tolist(), test["label"].tolist(), truth,
                                                   folder / "classifier")
            storage.write_json(folder / "metrics.json", metrics)

        truth_dir = stage("ground_truth", {"ground_truth": truth, "corpus": corpus_dir.name}, write_ground_truth)
        ground_truth, truth_key = str(truth_dir / "classifier"), truth_dir.name

    sample_spec = dataclasses.replace(prompt_spec, n_train=0, n_test=SFT_SAMPLES)

    def write_sft(folder: Path) -> None:
        """Train pi_SFT, with samples for the first test prompts."""
        sample_prompts = corpus.sample_prefixes(texts["test"](), tokenizer(), SFT_SAMPLES, sample_spec.min_tokens,
                                                sample_spec.max_tokens, sample_spec.seed)
        sft.train_sft(policy, tokenizer_dir / "tokenizer", texts["train"](), texts["test"](), folder,
                      sample_prompts=sample_prompts, mixed_precision=profile.mixed_precision, device=device,
                      progress=progress)

    sft_dir = stage("sft", {"policy": policy, "mixed_precision": profile.mixed_precision,
                            "sample_prompts": sample_spec, "corpus": corpus_dir.name,
                            "tokenizer": tokenizer_dir.name}, write_sft)

    world = World(profile=profile, sft_dir=sft_dir / "policy", ground_truth=ground_truth,
                  train_prompts=prompts["train"], test_prompts=prompts["test"])
    stage("score_spread", {"sft": sft_dir.name, "ground_truth": truth_key, "prompts": prompts_dir.name,
                           "sampling": profile.sampling, "prompts_used": SPREAD_PROMPTS,
                           "samples_per_prompt": SPREAD_SAMPLES_PER_PROMPT, "seed": SPREAD_SEED},
          lambda folder: _score_spread(world, folder, device))
    return world, stages


def prepare(profile: Profile, device: torch.device | str | None = None, progress: bool = True) -> World:
    """Build (or reuse from the cache) the corpus, prompts, pi_SFT and ground truth of ``profile``.

    A second call with nothing changed only reads the cache (well under a second). Bad input (an
    unreachable hub or PyPI, a malformed local corpus) fails in the first stage, before any training.
    """
    return _build(profile, device, progress)[0]


def _summary(world: World, stages: dict, seconds: float) -> str:
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


def run_prepare(argv: list[str]) -> None:
    """``dpo-lab prepare --profile P [--device D]``: build the world and print a summary."""
    from dpo_lab.cli import parse

    (common,) = parse("dpo-lab prepare", argv)
    started = time.time()
    world, stages = _build(get_profile(common.profile), common.device, progress=True)
    print(_summary(world, stages, time.time() - started))
