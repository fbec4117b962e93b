"""The finite-value guard: no trainer takes an optimiser step on a NaN or infinite loss or gradient.

Every trainer (SFT, reward model, the offline family, PPO) calls :func:`check_finite` after the
backward pass and before ``optimizer.step()``, so the weights are never updated with a
non-finite value. A run stopped this way keeps its last good checkpoint, and
:meth:`dpo_lab.runs.Run.stopped_on_non_finite` records why, so that a rerun of the same
configuration says what to change instead of repeating the failure.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(ValueError):
    """A loss, gradient norm or score was NaN or infinite; the message says where and what to change."""


def check_finite(**values: float | torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming every value (scalar, or 0-d tensor) that is NaN or infinite.

    Example: ``check_finite(loss=loss, grad_norm=grad_norm)`` gives ``non-finite loss (nan)``.
    """
    scalars = {name: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for name, v in values.items()}
    bad = {name: value for name, value in scalars.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteError("non-finite " + ", ".join(f"{name} ({value})" for name, value in bad.items()))


def check_step(stage: str, step: int, causes: str, **values: float | torch.Tensor) -> None:
    """:func:`check_finite` for a stage that saves nothing until it ends (SFT, the reward model).

    The error names the stage, the step and the likely ``causes``; the stage's folder is never
    written, so a rerun starts afresh (and fails the same way until a setting changes).
    """
    try:
        check_finite(**values)
    except NonFiniteError as err:
        raise NonFiniteError(f"{stage} stopped at step {step}: {err}; nothing was saved. Likely cause: {causes}") \
            from None
