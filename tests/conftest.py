"""Shared fixtures: an isolated cache and the `ci` world, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_IMDB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imdb_sample"


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Every test writes its artifacts under a temporary DPO_LAB_HOME, never into data/cache."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("dpo_lab_home")
    mp.setenv("DPO_LAB_HOME", str(home))
    mp.setenv("DPO_LAB_DEVICE", "cpu")
    mp.delenv("DPO_LAB_PROFILE", raising=False)
    yield home
    mp.undo()


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
