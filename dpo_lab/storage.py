"""Where artifacts live, and how they are written: atomically, and keyed by the config that made them.

Layout: ``$DPO_LAB_HOME`` (default ``data/cache`` in the project folder) holds one folder per
profile, and inside it one folder per built artifact, named ``<stage>-<fingerprint>``, where the
fingerprint hashes the configuration that produced it. A changed setting gives a new folder (a
rebuild); an unchanged one finds the finished folder (a reuse). A folder counts as finished only
once its ``DONE`` marker exists, and it is built under a temporary name and renamed at the end, so
an interrupted build never looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HOME_ENV_VAR = "DPO_LAB_HOME"
FIGURES_ENV_VAR = "DPO_LAB_FIGURES"
RESULTS_ENV_VAR = "DPO_LAB_RESULTS"
DONE_MARKER = "DONE"


def project_root() -> Path:
    """The dpo-lab checkout containing the working directory (notebooks run from ``notebooks/``).

    Found by walking up to a ``pyproject.toml`` that names ``dpo-lab``; the working directory if none.
    """
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        marker = folder / "pyproject.toml"
        if marker.exists() and 'name = "dpo-lab"' in marker.read_text():
            return folder
    return cwd


def home() -> Path:
    """The cache root: ``$DPO_LAB_HOME`` or ``data/cache`` in the project folder."""
    return Path(os.environ.get(HOME_ENV_VAR) or project_root() / "data" / "cache").resolve()


def figures_dir() -> Path:
    """Where figures go: ``$DPO_LAB_FIGURES`` or ``figures/`` in the project folder (created on demand)."""
    path = Path(os.environ.get(FIGURES_ENV_VAR) or project_root() / "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(profile_name: str) -> Path:
    """Where a profile's results tables live: ``$DPO_LAB_RESULTS/<profile>`` or ``data/results/<profile>/``."""
    path = Path(os.environ.get(RESULTS_ENV_VAR) or project_root() / "data" / "results") / profile_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def profile_dir(profile_name: str) -> Path:
    """The cache folder of one profile (created on demand)."""
    path = home() / profile_name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    If the block raises, the temporary file is removed and any existing ``path`` is left intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes the file private; the result should be an ordinary file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` (dataclasses allowed) as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def fingerprint(config: Any) -> str:
    """A short stable hash of a configuration (dataclasses, dicts, lists, scalars)."""
    canonical = json.dumps(to_jsonable(config), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def cache_name(name_or_path: str | os.PathLike) -> str:
    """An artifact's identity in a cache key: its path inside the cache home, else the path or hub id as given.

    Keys built this way survive moving the cache (``$DPO_LAB_HOME``) or the clone.
    """
    path = Path(name_or_path)
    if path.exists() and path.resolve().is_relative_to(home().resolve()):
        return str(path.resolve().relative_to(home().resolve()))
    return str(name_or_path)


def is_done(path: Path) -> bool:
    """Whether ``path`` is a finished artifact folder."""
    return (path / DONE_MARKER).exists()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder ``<path>.partial``; if the block succeeds it replaces ``path``.

    The swap moves an existing ``path`` aside to ``<path>.old``, renames the staging folder into
    place, then deletes the old one, so a kill at any moment leaves a complete ``path`` or a
    complete ``<path>.old``, never a half-written folder under the final name. If the block raises,
    the staging folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    staging, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():  # else an earlier kill may have left the only complete copy as ``old``: keep it until now
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def cached_artifact(profile_name: str, stage: str, config: Any, build: Callable[[Path], None]) -> Path:
    """Return the finished folder for ``(stage, config)``, building it first if needed.

    ``build(folder)`` writes the artifact into an empty staging folder; ``config.json`` is written
    beside it, then the ``DONE`` marker, then the folder is renamed into place (:func:`atomic_dir`).
    """
    final = profile_dir(profile_name) / f"{stage}-{fingerprint(config)}"
    if is_done(final):
        return final
    with atomic_dir(final) as partial:
        write_json(partial / "config.json", config)
        build(partial)
        write_text_atomic(partial / DONE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    return final
