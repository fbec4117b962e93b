"""Helpers every stage needs: atomic writes, artifact caching, seeding, device choice."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from dpo_lab import runtime, storage
from dpo_lab.runtime import resolve_device, seed_everything


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
    outside = storage.cache_name(tmp_path / "old" / "tiny")  # outside the cache: marked local, keyed by content
    assert outside.startswith(f"local:{tmp_path / 'old' / 'tiny'}@")
    assert storage.cache_name("gpt2") == "gpt2"  # a hub id stays as given


def test_hub_ids_and_local_folders_never_share_a_key(monkeypatch, tmp_path):
    """A folder ./gpt2 does not shadow the hub id gpt2; written as a path it is local, keyed by its content."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text("{}")
    assert storage.cache_name("gpt2") == "gpt2"
    local = storage.cache_name("./gpt2")
    assert local == f"local:{tmp_path / 'gpt2'}@{storage.content_hash(tmp_path / 'gpt2')}"
    (tmp_path / "gpt2" / "config.json").write_text('{"edited": true}')
    assert storage.cache_name("./gpt2") != local  # an edited folder gets a new key, so what depends on it rebuilds
    with storage.source("gpt2") as name:  # the hub id is resolved away from the same-named folder
        assert name == "gpt2" and not Path("gpt2").exists()
    with storage.source("./gpt2") as name:
        assert name == str(tmp_path / "gpt2")


def test_corrupt_artifact_is_reported_and_rebuilt(monkeypatch, tmp_path, caplog):
    """A bit flip in a finished artifact fails its manifest check: the path is reported and the folder rebuilt."""
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "weights.bin").write_bytes(bytes(range(256)))

    first = storage.cached_artifact("ci", "demo", {"lr": 1}, build)
    data = bytearray((first / "weights.bin").read_bytes())
    data[100] ^= 0x01
    (first / "weights.bin").write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="dpo_lab"):
        again = storage.cached_artifact("ci", "demo", {"lr": 1}, build)
    assert again == first and len(builds) == 2
    assert (again / "weights.bin").read_bytes() == bytes(range(256))
    assert f"{first}: weights.bin does not match the checksum" in caplog.text
    assert oct((again / "weights.bin").stat().st_mode & 0o777) != oct(0o600)


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


@pytest.fixture()
def devices(monkeypatch):
    """Pretend to have ``cuda`` GPUs and (or not) Apple MPS; no device request in the environment."""
    monkeypatch.delenv("DPO_LAB_DEVICE", raising=False)

    def have(cuda: int, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return have


def test_one_device_decision_for_every_request(devices, monkeypatch):
    devices(cuda=2, mps=True)
    assert [resolve_device(r) for r in (None, "cpu", "cuda", "cuda:1", "mps")] == [
        torch.device("cuda"), torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 1), torch.device("mps")]
    monkeypatch.setenv("DPO_LAB_DEVICE", "cuda:1")
    assert resolve_device() == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("DPO_LAB_DEVICE")
    devices(cuda=1, mps=False)
    with pytest.raises(ValueError, match="only 1 GPU"):
        resolve_device("cuda:1")
    devices(cuda=0, mps=True)
    assert resolve_device() == torch.device("mps")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    devices(cuda=0, mps=False)
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")
    for bad in ("nonsense", "meta"):
        with pytest.raises(ValueError, match=f"device '{bad}' is not"):
            resolve_device(bad)


@pytest.fixture()
def fresh_process_state():
    """accelerate's per-process device state, reset before and after (as in a new process)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_trainers_accelerator_runs_on_the_requested_gpu(fresh_process_state, monkeypatch):
    """``--device cuda:1`` reaches accelerate (it used to fall back to its default, GPU 0)."""
    monkeypatch.setattr(runtime, "resolve_device", lambda preferred=None: torch.device(preferred))
    assert runtime.device_state("cuda:1").device == torch.device("cuda", 1)
    assert runtime.make_accelerator("cuda:1").device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="already runs on cuda:1"):
        runtime.pick_device("cpu")


def test_the_cpu_request_gives_a_cpu_accelerator(fresh_process_state):
    assert runtime.make_accelerator("cpu").device == torch.device("cpu") == runtime.pick_device("cpu")


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
