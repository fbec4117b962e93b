"""The processes of one launch: who is the main one, barriers, and numbers every process must agree on.

Under ``accelerate launch`` (or torchrun) with several processes every trainer runs data-parallel
(DDP): each process takes its share of a step's data, gradients are averaged, and only the main
process writes shared files (run folders, logs, cached artifacts, the results table). The rank
and the number of processes come from the launcher's environment, so :func:`is_main_process` is
right before any process group exists; the collective helpers start accelerate's process state
on first use. With one process every helper is a no-op. torch and accelerate are imported inside
the collective helpers: :mod:`dpo_lab.storage` imports this module, and ``dpo-lab --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator


PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=6)
"""How long a process waits at a barrier: the others wait there while the main one builds an upstream
artifact (hours at the paper's scale; torch's default of 10 minutes would end the launch)."""


def process_state(cpu: bool = False):
    """accelerate's process state, its process group started with :data:`PROCESS_GROUP_TIMEOUT` if this is the first use."""
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


def config_entry() -> dict[str, int]:
    """``{"processes": P}`` for a cache key under P > 1 processes, ``{}`` for one (keys stay what they were)."""
    launched = launched_processes()
    return {"processes": launched} if launched > 1 else {}


def _environment_count(name: str, default: int, low: int) -> int:
    """The integer in the environment variable ``name`` (``default`` if unset); a value below ``low`` or not an
    integer raises one line naming the variable."""
    value = os.environ.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low} (it is set by accelerate launch or "
                         f"torchrun; unset it to run one process)")
    return number


def launched_processes() -> int:
    """How many processes ``accelerate launch`` (or torchrun) started; 1 for a plain ``python``."""
    return _environment_count("WORLD_SIZE", 1, 1)


def process_rank() -> int:
    """This process's rank among :func:`launched_processes` (0 for a plain ``python``)."""
    return _environment_count("RANK", 0, 0)


def is_main_process() -> bool:
    """Whether this process writes shared files (run folders, logs, tables): rank 0, or the only process."""
    return process_rank() == 0


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on the main process first, then on the others (one process: just run it).

    For work every process needs but only one should do, such as building a cached artifact: the
    others then find it finished.
    """
    if launched_processes() == 1:
        yield
        return
    with process_state().main_process_first():
        yield


def wait_for_everyone() -> None:
    """A barrier over the launched processes (nothing for a single process)."""
    if launched_processes() > 1:
        process_state().wait_for_everyone()


def mean_over_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (every process gets the same numbers; one process: as is).

    The processes hold equal shares of a step's data, so the mean of their means is the global mean.
    """
    if accelerator.num_processes == 1:
        return values
    import torch

    stacked = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=accelerator.device)
    return dict(zip(values, accelerator.reduce(stacked, reduction="mean").tolist()))


def gathered(accelerator: Accelerator, value: float):
    """``value`` from every process, as a float64 tensor (P,) on this process's device."""
    import torch

    return accelerator.gather(torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device))


def min_over_processes(accelerator: Accelerator, value: float) -> float:
    """The smallest ``value`` over the processes (``value`` itself for one process)."""
    return value if accelerator.num_processes == 1 else float(gathered(accelerator, value).min())


def spread_over_processes(accelerator: Accelerator, value: float) -> float:
    """max - min of ``value`` over the processes (0.0 for one process): 0 where they must agree."""
    if accelerator.num_processes == 1:
        return 0.0
    values = gathered(accelerator, value)
    return float(values.max() - values.min())


def check_split(num_processes: int, **sizes: int) -> None:
    """Raise ``ValueError`` unless every size (``PPOSpec.rollout_size=64``, ...) splits evenly over the processes."""
    for name, size in sizes.items():
        if size % num_processes:
            raise ValueError(f"{name} ({size}) must be a multiple of the number of processes ({num_processes})")
