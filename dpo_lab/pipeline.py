"""The upstream artifacts every training run needs, built (or found in the cache) once, in order.

``Pipeline(profile)`` memoises the chain ``prepare`` -> ``preferences`` -> reward model: each is a
``functools.cached_property`` that builds what it needs first, so ``Pipeline(profile).reward_model``
prepares the world and the pairs if they are missing, and a second access costs nothing. The CLI
commands and the frontier sweep hand a pipeline to a method's training function
(:mod:`dpo_lab.methods`); the trainers themselves know nothing of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from dpo_lab.preferences import build_preferences
from dpo_lab.profiles import Profile
from dpo_lab.train.reward import train_reward_model
from dpo_lab.world import World, prepare


@dataclass
class Pipeline:
    """The upstream artifacts of one profile, each built on first access."""

    profile: Profile
    device: str | None = None
    """Device request for every stage (see :func:`dpo_lab.runtime.resolve_device`)."""
    progress: bool = True

    @functools.cached_property
    def world(self) -> World:
        """Corpus, prompts, SFT policy and ground truth (``dpo-lab prepare``)."""
        return prepare(self.profile, device=self.device, progress=self.progress)

    @functools.cached_property
    def pairs(self) -> Path:
        """The preference pairs (``dpo-lab preferences``)."""
        return build_preferences(self.world, device=self.device, progress=self.progress)

    @functools.cached_property
    def reward_model(self) -> Path:
        """The learned reward model r_phi (``dpo-lab reward``)."""
        return train_reward_model(self.world, self.pairs, device=self.device, progress=self.progress)
