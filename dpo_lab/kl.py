"""KL divergences between a policy and its reference, exact and sampled.

The KL penalty is the beta * D_KL[pi || pi_ref] term of the RLHF objective, Eq. 3 of
Rafailov et al. 2023 (arXiv 2305.18290). Shapes: B batch, T completion tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_lab.losses import check_same_shape, masked_sum


def token_kl_and_logps(logits_p: Tensor, logits_q: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact per-token KL(p || q) and both log-probabilities of the sampled tokens, in one pass.

    ``logits_p``, ``logits_q``: (..., V) logits; ``targets``: (...) the sampled token ids. Returns
    ``(kl, logp, logq)``, each (...) float32: ``kl`` = sum_v p(v) (log p(v) - log q(v)) with
    p, q the float32 softmax of the logits (entries with p(v) = 0 contribute 0), and the log-probs
    of ``targets`` as :func:`dpo_lab.lm.token_logps` gives them, from one log_softmax per model.
    """
    check_same_shape(logits_p=logits_p, logits_q=logits_q)
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    index = targets.unsqueeze(-1)
    return _kl_from_logps(logp, logq), logp.gather(-1, index).squeeze(-1), logq.gather(-1, index).squeeze(-1)


def _kl_from_logps(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_v p(v) (log p(v) - log q(v)) over the last axis of normalised log-probabilities."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=-1)


def kl_estimators(logp: Tensor, logq: Tensor) -> dict[str, Tensor]:
    """Single-sample estimators of KL(p || q) for tokens drawn from p (Schulman 2020).

    ``logp``, ``logq``: log-probabilities of the *sampled* tokens under p and q (any common
    shape, e.g. (B, T)). With r = q / p = exp(logq - logp):

    - ``k1`` = -log r = logp - logq: unbiased, high variance, can be negative;
    - ``k2`` = (log r)^2 / 2: biased, low variance;
    - ``k3`` = (r - 1) - log r: unbiased and always >= 0 (log r <= r - 1).

    Returns a dict of tensors with the input shape; their means estimate KL(p || q).
    """
    check_same_shape(logp=logp, logq=logq)
    log_r = logq - logp
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.expm1(log_r) - log_r}


def sequence_kl(token_kl: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level KL: per-token KL (B, T) summed over completion tokens (``mask`` (B, T)).

    Returns (B,). The KL between two autoregressive sequence distributions is the expected
    sum of per-token KLs, so summing per-token exact KLs (or estimators) estimates it.
    """
    return masked_sum(token_kl, mask, dim=-1)
