"""Helpers every stage needs: atomic writes, artifact caching, seeding, device choice."""

import json

import pytest
import torch

from dpo_lab import storage
from dpo_lab.runtime import pick_device, seed_everything


def test_atomic_write_survives_an_exception_mid_write(tmp_path):
    target = tmp_path / "results.json"
    storage.write_json(target, {"reward": 0.5})
    with pytest.raises(RuntimeError):
        with storage.atomic_path(target) as tmp:
            tmp.write_text('{"reward": 0.9, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"reward": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_cached_artifact_builds_once_and_rebuilds_on_change(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    calls = []

    def build(folder):
        calls.append(folder.name)
        (folder / "x.txt").write_text("built")

    first = storage.cached_artifact("ci", "demo", {"lr": 1}, build)
    again = storage.cached_artifact("ci", "demo", {"lr": 1}, build)
    other = storage.cached_artifact("ci", "demo", {"lr": 2}, build)
    assert first == again != other
    assert len(calls) == 2
    assert (first / "x.txt").read_text() == "built"
    assert storage.read_json(first / "config.json") == {"lr": 1}
    assert first.parent == tmp_path / "ci"


def test_cache_names_survive_moving_the_cache(monkeypatch, tmp_path):
    """Keys name upstream artifacts by their path inside the cache, so a moved cache is reused, not rebuilt."""
    for home in ("old", "moved"):
        monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path / home))
        (tmp_path / home / "tiny" / "sft-abc" / "policy").mkdir(parents=True)
        assert storage.cache_name(tmp_path / home / "tiny" / "sft-abc" / "policy") == "tiny/sft-abc/policy"
    assert storage.cache_name(tmp_path / "old" / "tiny") == str(tmp_path / "old" / "tiny")  # outside the cache
    assert storage.cache_name("gpt2") == "gpt2"  # a hub id stays as given


def test_interrupted_build_is_not_taken_as_finished(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))

    def crash(folder):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.cached_artifact("ci", "demo", {"a": 1}, crash)
    path = storage.cached_artifact("ci", "demo", {"a": 1}, lambda f: (f / "ok.txt").write_text("ok"))
    assert (path / "ok.txt").exists() and not (path / "half.txt").exists()


def test_fingerprint_is_stable_and_sensitive():
    assert storage.fingerprint({"a": 1, "b": (1, 2)}) == storage.fingerprint({"b": [1, 2], "a": 1})
    assert storage.fingerprint({"a": 1}) != storage.fingerprint({"a": 2})


def test_seed_everything_repeats_random_streams():
    seed_everything(7)
    first = torch.rand(5)
    seed_everything(7)
    assert torch.equal(first, torch.rand(5))


def test_pick_device_default_and_override(monkeypatch):
    monkeypatch.delenv("DPO_LAB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device().type == expected
    assert pick_device("cpu").type == "cpu"
    monkeypatch.setenv("DPO_LAB_DEVICE", "cpu")
    assert pick_device().type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_paths_resolve_to_the_project_from_a_subfolder(monkeypatch, tmp_path):
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "dpo-lab"\n')
    monkeypatch.chdir(root / "notebooks")
    monkeypatch.delenv("DPO_LAB_HOME", raising=False)
    monkeypatch.delenv("DPO_LAB_FIGURES", raising=False)
    monkeypatch.delenv("DPO_LAB_RESULTS", raising=False)
    assert storage.project_root() == root
    assert storage.home() == root / "data" / "cache"
    assert storage.figures_dir() == root / "figures"
    assert storage.results_dir("tiny") == root / "data" / "results" / "tiny"
