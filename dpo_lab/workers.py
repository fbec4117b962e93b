"""Where the runs of a sweep execute: in this process, in N local worker processes, or as Ray tasks.

Each runner takes the sweep's entries and yields ``(entry, rows)`` as runs finish, in whatever
order they finish; :mod:`dpo_lab.frontier` merges the rows into the one results table, written by
this (the driver) process only, sorted, so the table does not depend on the order.

- :func:`in_process`: one run after another, here (``--jobs 1``, the default).
- :func:`local_jobs`: ``--jobs N`` worker processes (``spawn``). On GPUs each worker owns one
  GPU (``CUDA_VISIBLE_DEVICES``); on the CPU each run uses ``cores // N`` torch threads, at most
  the profile's own setting, so N jobs never oversubscribe the cores.
- :func:`ray_tasks`: every entry a Ray task with ``num_gpus=1`` on a cluster with GPUs, else
  ``num_cpus`` = its thread count (Ray is an optional extra: ``pip install -e ".[ray]"``).
  Ray schedules; nothing here does.

The upstream artifacts (world, pairs, reward model) must exist before jobs start, built once by
the driver (:func:`dpo_lab.frontier.run_sweep` does so), so workers only read them: with Ray on
several machines, ``$DPO_LAB_HOME`` must be on a filesystem every node sees (workers get the
driver's ``DPO_LAB_*`` variables). A run's numbers depend on its torch thread count in the last
digits (the order of float reductions), so a table matches a sequential sweep's exactly when each
job runs at the profile's thread count, as ``--jobs N`` does when N jobs fit in the cores.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import torch

from dpo_lab import runtime, storage
from dpo_lab.pipeline import Pipeline
from dpo_lab.profiles import Profile

ENV_PREFIX = "DPO_LAB_"


def run_entry(profile: Profile, entry: Any, device: str | None) -> pd.DataFrame:
    """Train (or find finished) one sweep entry with ``profile``'s upstream artifacts; its evaluation rows.

    The function every worker runs: the pipeline only reads the cache (the driver built it).
    """
    return entry.run(Pipeline(profile, device=device, progress=False), device, False)


def in_process(profile: Profile, entries: Sequence[Any], pipeline: Pipeline, device: str | None,
               progress: bool) -> Iterator[tuple[Any, pd.DataFrame]]:
    """Run the entries one after another in this process, sharing ``pipeline``."""
    for entry in entries:
        yield entry, entry.run(pipeline, device, progress)


def job_threads(profile: Profile, jobs: int, cores: int | None = None) -> int:
    """torch threads per CPU job: ``cores // jobs`` (at least 1), at most the profile's setting (if it has one)."""
    share = max(1, (cores or os.cpu_count() or 1) // jobs)
    return min(share, profile.threads) if profile.threads else share


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (its own mask kept: SLURM, shared nodes)."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [gpu.strip() for gpu in mask.split(",") if gpu.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def claim_gpu(free_gpus) -> None:
    """Worker initialiser, before anything starts CUDA: make one GPU of the queue the only one it sees."""
    os.environ["CUDA_VISIBLE_DEVICES"] = free_gpus.get()


def local_jobs(profile: Profile, entries: Sequence[Any], jobs: int, device: str | None) -> Iterator[tuple[Any, pd.DataFrame]]:
    """Run the entries in ``jobs`` spawned worker processes, yielding each as it finishes.

    With the device ``cuda`` (chosen or the default) every worker owns one of the visible GPUs
    (``jobs`` must not exceed them); with any other device (``cpu``, ``cuda:1``, ``mps``) the jobs
    share it, and on the CPU every run gets :func:`job_threads` threads. A failing run stops the
    sweep: runs not yet started are cancelled, and the ones running finish first (said at once).
    """
    context = multiprocessing.get_context("spawn")
    initializer, initargs = None, ()
    resolved = runtime.resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        gpus = visible_gpus()
        if jobs > len(gpus):
            raise ValueError(f"--jobs {jobs} needs {jobs} GPUs, {len(gpus)} visible; use --jobs {len(gpus)} or fewer")
        torch.cuda.empty_cache()  # what building the upstream artifacts left on the first GPU
        free_gpus = context.Manager().Queue()
        for gpu in gpus[:jobs]:
            free_gpus.put(gpu)
        initializer, initargs, device = claim_gpu, (free_gpus,), "cuda"
    elif resolved.type == "cpu":
        profile = profile.replace(threads=job_threads(profile, jobs))
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=initializer,
                                                initargs=initargs) as pool:
        futures = {pool.submit(run_entry, profile, entry, device): entry for entry in entries}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        except BaseException as err:
            running = sum(future.running() for future in futures)
            if running:
                storage.log.warning("the sweep stops (%s): the runs still queued are cancelled; waiting for the %d "
                                    "already handed to the workers to finish (a finished run is kept for the "
                                    "next sweep)",
                                    str(err).splitlines()[0] if str(err) else type(err).__name__, running)
            pool.shutdown(cancel_futures=True)
            raise


def driver_env() -> dict[str, str]:
    """This process's ``DPO_LAB_*`` variables for every Ray worker, with the cache folder always named as an
    absolute path (a Ray worker's working directory is not the checkout, so the default would not be found)."""
    return {**{k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)},
            storage.HOME_ENV_VAR: str(storage.home().resolve())}


def ray_tasks(profile: Profile, entries: Sequence[Any], address: str, device: str | None) -> Iterator[tuple[Any, pd.DataFrame]]:
    """Submit every entry as a Ray task to the cluster at ``address`` and yield each as it finishes.

    ``address``: ``auto`` (the cluster this machine belongs to), ``HOST:PORT``, or ``local`` (the Ray
    instance of this machine, started if none runs); a Ray already initialised in this process is
    used as it is. Each task
    asks for one GPU where the cluster has GPUs, else for the profile's threads (at least 1) as CPUs.
    """
    try:
        import ray
    except ImportError:
        raise ValueError('--ray-address needs Ray: pip install -e ".[ray]"') from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, runtime_env={"env_vars": driver_env()},
                 include_dashboard=False, log_to_driver=False)
    if ray.cluster_resources().get("GPU", 0) > 0 and device in (None, "cuda"):
        resources, device = {"num_gpus": 1}, "cuda"
    else:
        threads = profile.threads or 1
        resources, profile = {"num_cpus": threads}, profile.replace(threads=threads)
    task = ray.remote(**resources)(run_entry)
    pending = {task.remote(profile, entry, device): entry for entry in entries}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
