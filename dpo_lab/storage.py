"""Where artifacts live, and how they are written: atomically, and keyed by the config that made them.

Layout: ``$DPO_LAB_HOME`` (default ``data/cache`` in the project folder) holds one folder per
profile, and inside it one folder per built artifact, named ``<stage>-<fingerprint>``, where the
fingerprint hashes the configuration that produced it. A changed setting gives a new folder (a
rebuild); an unchanged one finds the finished folder (a reuse). A folder counts as finished only
once its ``DONE`` marker exists, and it is built under a temporary name and renamed at the end, so
an interrupted build never looks finished.

Integrity: a finished folder also holds ``MANIFEST.json``, the size and sha256 of every file in
it. A reused folder is checked against it first (once per process while its files are unchanged);
a folder that fails the check, or has no manifest, is reported with its path and rebuilt, never
reused. Sources named in cache keys (:func:`cache_name`) are either hub ids, kept as given, or
local paths, made absolute and keyed by their content hash, so the two never share a key and an
edited local folder rebuilds what was made from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpo_lab import processes

HOME_ENV_VAR = "DPO_LAB_HOME"
FIGURES_ENV_VAR = "DPO_LAB_FIGURES"
RESULTS_ENV_VAR = "DPO_LAB_RESULTS"
DONE_MARKER = "DONE"
MANIFEST = "MANIFEST.json"
LOCAL_PREFIXES = ("/", "./", "../", "~")
"""A source written like this is a local path; anything else (``gpt2``, ``stanfordnlp/imdb``) is a hub id."""
log = logging.getLogger("dpo_lab")
"""Where the package reports what it recovered from (a corrupt cache folder, a lost table); the CLI prints it."""
_verified: dict[Path, tuple] = {}


class CacheError(OSError):
    """A cache, results or figures folder that cannot be written."""


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
    return ensure_writable(Path(os.environ.get(FIGURES_ENV_VAR) or project_root() / "figures"), "figures", FIGURES_ENV_VAR)


def results_dir(profile_name: str) -> Path:
    """Where a profile's results tables live: ``$DPO_LAB_RESULTS/<profile>`` or ``data/results/<profile>/``."""
    root = Path(os.environ.get(RESULTS_ENV_VAR) or project_root() / "data" / "results")
    return ensure_writable(root / profile_name, "results", RESULTS_ENV_VAR)


def ensure_writable(folder: Path, what: str, env_var: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, else raise :class:`CacheError`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise CacheError(f"cannot write the {what} folder {folder} ({err.strerror or err}); make it writable, "
                         f"or point ${env_var} at a writable folder") from err
    return folder


def check_writable(profile_name: str) -> None:
    """Check, before any training, that the cache, results and figures folders can be written."""
    profile_dir(profile_name)
    results_dir(profile_name)
    figures_dir()


def profile_dir(profile_name: str) -> Path:
    """The cache folder of one profile (created on demand)."""
    return ensure_writable(home() / profile_name, "cache", HOME_ENV_VAR)


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
    tmp.chmod(ordinary_mode())  # mkstemp makes the file private; the result should be an ordinary file
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
    """Read a JSON file; a damaged one raises ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it (or its folder) to rebuild it") from err


def fingerprint(config: Any) -> str:
    """A short stable hash of a configuration (dataclasses, dicts, lists, scalars)."""
    canonical = json.dumps(to_jsonable(config), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def is_local(source: str | os.PathLike) -> bool:
    """Whether a source is a local path (a ``Path``, or a string starting ``/``, ``./``, ``../`` or ``~``)."""
    return isinstance(source, os.PathLike) or str(source).startswith(LOCAL_PREFIXES) or str(source) in (".", "..")


def local_path(source: str | os.PathLike) -> Path:
    """A local source as an absolute path (``~`` expanded)."""
    return Path(source).expanduser().resolve()


@contextlib.contextmanager
def source(name_or_path: str | os.PathLike) -> Iterator[str]:
    """Yield what to hand a ``from_pretrained``-style loader for a source, honouring :func:`is_local`.

    A local path is yielded absolute (``~`` expanded). A hub id is yielded as is; if a folder of
    the same name exists in the working directory (which ``transformers`` and ``datasets`` would
    load instead), the block runs in an empty temporary working directory, so the hub id means the
    hub. Pass ``./gpt2`` to mean the folder.
    """
    if is_local(name_or_path):
        yield str(local_path(name_or_path))
    elif name_or_path and Path(name_or_path).exists():
        with tempfile.TemporaryDirectory(prefix="dpo-lab-hub-") as empty, contextlib.chdir(empty):
            yield str(name_or_path)
    else:
        yield str(name_or_path)


def cache_name(name_or_path: str | os.PathLike) -> str:
    """A source's identity in a cache key.

    - a path inside the cache home: that path relative to the home (keys survive moving the cache);
    - any other local path: ``local:<absolute path>@<content hash>``, so editing it rebuilds;
    - a hub id: as given, even when a folder of the same name exists in the working directory.
    """
    if not is_local(name_or_path):
        return str(name_or_path)
    path = local_path(name_or_path)
    if path.is_relative_to(home()):
        return str(path.relative_to(home()))
    return f"local:{path}@{content_hash(path)}"


def keyed(spec: Any, *source_fields: str) -> dict[str, Any]:
    """A spec as a cache-key dict, its ``source_fields`` (hub ids or local paths) replaced by :func:`cache_name`."""
    key = to_jsonable(spec)
    return key | {name: cache_name(key[name]) for name in source_fields if key[name]}


def _files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (a file: itself), in a stable order, without the manifest and marker."""
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, DONE_MARKER))


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of every file below ``folder``."""
    return {str(p.relative_to(folder)) if p != folder else p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in _files(folder)}


def content_hash(path: Path) -> str:
    """A short hash of a local file's or folder's content (names, sizes and bytes); raises if it does not exist."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return fingerprint(manifest_of(path))


def ordinary_mode() -> int:
    """The mode of an ordinary new file under the current umask (0o644 under the usual 0o022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def seal(folder: Path) -> None:
    """Give every file in ``folder`` ordinary permissions, then record its size and sha256 in ``MANIFEST.json``.

    The permissions matter for a shared cache: safetensors writes its files as 0600, readable by
    their owner only.
    """
    mode = ordinary_mode()
    for path in _files(folder):
        path.chmod(mode)
    write_json(folder / MANIFEST, manifest_of(folder))


def manifest_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match its ``MANIFEST.json`` (a missing, extra, resized or changed file), or None.

    The result is remembered while the files' sizes and modification times stay the same, so
    reusing a folder many times in one process hashes it once.
    """
    signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(folder))
    if _verified.get(folder) == signature:
        return None
    try:
        recorded = read_json(folder / MANIFEST)
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (written by an older dpo-lab, or damaged)"
    actual = {str(p.relative_to(folder)) for p in _files(folder)}
    for name in sorted(set(recorded) | actual):
        if name not in actual:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} is not in its {MANIFEST}"
        if (folder / name).stat().st_size != recorded[name]["bytes"] or file_sha256(folder / name) != recorded[name]["sha256"]:
            return f"{name} does not match the checksum recorded when it was written"
    _verified[folder] = signature
    return None


def ends_mid_line(path: Path) -> bool:
    """Whether the file at ``path`` ends without a newline (a kill, or damage, cut its last line short)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def is_done(path: Path) -> bool:
    """Whether ``path`` is a finished artifact folder."""
    return (path / DONE_MARKER).exists()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep_previous: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder ``<path>.partial``; if the block succeeds it replaces ``path``.

    The swap moves an existing ``path`` aside to ``<path>.old``, renames the staging folder into
    place, then deletes the old one (or, with ``keep_previous``, renames it ``<path>.previous``),
    so a kill at any moment leaves a complete ``path`` or a complete ``<path>.old``, never a
    half-written folder under the final name. If the block raises, the staging folder is removed
    and ``path`` is left as it was.
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
    if keep_previous and old.exists():
        previous = path.with_name(path.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(old, previous)
    shutil.rmtree(old, ignore_errors=True)


def cached_artifact(profile_name: str, stage: str, config: Any, build: Callable[[Path], None],
                    collective: bool = False) -> Path:
    """Return the finished folder for ``(stage, config)``, building it first if needed.

    ``build(folder)`` writes the artifact into an empty staging folder; ``config.json`` is written
    beside it, then ``MANIFEST.json`` and the ``DONE`` marker, then the folder is renamed into place
    (:func:`atomic_dir`). A finished folder that fails its manifest check is reported and rebuilt.

    Processes that need it at once build it once (:func:`exclusive`). Under ``accelerate launch``
    (:mod:`dpo_lab.processes`) the main process builds while the others wait, then read it. A
    ``collective`` build trains data-parallel, so every process takes part: the main one builds into
    the staging folder, the others into a scratch folder that is dropped (the builds save their
    model from the main process only).
    """
    final = profile_dir(profile_name) / f"{stage}-{fingerprint(config)}"
    if collective and processes.launched_processes() > 1:
        if not finished_artifact(final):
            if processes.is_main_process():
                with exclusive(final):
                    build_artifact(final, config, build)
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    build(Path(scratch))
        processes.wait_for_everyone()
        return final
    with processes.main_process_first(), exclusive(final):
        if not finished_artifact(final):
            build_artifact(final, config, build)
    return final


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a file in ``.locks/`` beside it) for the block.

    Two processes that need the same artifact at once (two jobs of a parallel sweep, two notebooks)
    then build it once, two that train the same run folder train it once, and two sweeps that
    write the same results table take turns: the second waits (saying so once), then finds the
    work done. Where ``fcntl`` does not exist (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    locks = path.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{path.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another process holds it; waiting for it to finish", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finished_artifact(final: Path) -> bool:
    """Whether ``final`` is finished and sound (one that fails its manifest check is reported: it will be rebuilt)."""
    if not is_done(final):
        return False
    problem = manifest_problem(final)
    if problem is not None:
        log.warning("%s: %s; rebuilding it", final, problem)
    return problem is None


def build_artifact(final: Path, config: Any, build: Callable[[Path], None]) -> None:
    """Build ``final`` in a staging folder (config, artifact, manifest, ``DONE``) and rename it into place."""
    with atomic_dir(final) as partial:
        write_json(partial / "config.json", config)
        build(partial)
        seal(partial)
        write_text_atomic(partial / DONE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
