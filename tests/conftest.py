"""Shared fixtures: the isolated cache, the IMDb sample and the `ci` world, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_IMDB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imdb_sample"


@pytest.fixture(scope="session")
def isolated_home() -> Path:
    """The temporary DPO_LAB_HOME the root conftest set for this session (never data/cache)."""
    return Path(os.environ["DPO_LAB_HOME"])


@pytest.fixture(scope="session")
def imdb_sample() -> Path:
    """The labelled IMDb sample in ../shared/data, or a skip saying why."""
    if not (SHARED_IMDB / "train.parquet").exists():
        pytest.skip(f"IMDb sample not found at {SHARED_IMDB} (../shared/data is absent on this machine)")
    return SHARED_IMDB


@pytest.fixture(scope="session")
def ci_world(isolated_home):
    """The `ci` profile's corpus, prompts, SFT policy and ground truth (built once, seconds)."""
    from dpo_lab.profiles import get_profile
    from dpo_lab.world import prepare

    return prepare(get_profile("ci"), progress=False)
