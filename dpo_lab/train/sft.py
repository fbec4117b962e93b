"""Supervised fine-tuning of the policy pi_SFT (= pi_ref) on the training reviews (paper Section 6.1).

Two starting points, one loop:

- ``PolicySpec.base == ""`` (``tiny``, ``ci``): a byte-level BPE tokenizer trained on the training
  reviews (:func:`train_bpe_tokenizer`; ``<|endoftext|>`` is BOS, EOS and padding, as in GPT-2), or
  a whole-word one (:func:`train_word_tokenizer`, ``PolicySpec.tokenizer == "word"``), and
  a GPT-2 architecture initialised from scratch (:func:`from_scratch_model`) with dropout 0
  (GPT-2 uses 0.1): the model is small and sees each review only a few times, and every later
  trainer computes log-probabilities without dropout, so the policy is trained as it is used.
- a hub id (``gpt2``, ``gpt2-large``) or a local ``save_pretrained`` folder: that checkpoint and its
  tokenizer, fine-tuned with the checkpoint's own dropout, for one epoch as in the paper.

Each review is cut to ``sft_max_length`` tokens; a review that fits is followed by EOS, so the
model learns to end a review (a cut review gets no EOS). Sequences start without BOS, exactly as
prompts do. The loss is the mean next-token cross-entropy over real tokens; the loop is plain
PyTorch over ``accelerate.Accelerator`` (mixed precision from the profile) with AdamW (weight
decay 0.01, gradients clipped to norm 1), a linear warm-up over the first 5% of steps, then cosine
decay to zero. Batches are random (a fresh seeded permutation per epoch). Under ``accelerate
launch`` each of P processes takes every P-th review of a batch and the gradients are averaged.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from dpo_lab import lm, processes, runtime, storage
from dpo_lab.guards import check_step
from dpo_lab.profiles import PolicySpec

ENDOFTEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"
WARMUP_FRACTION = 0.05
EVAL_BATCH_SIZE = 64


def train_byte_level_tokenizer(model, trainer, texts: Sequence[str], model_max_length: int,
                               **special_tokens) -> PreTrainedTokenizerFast:
    """``model`` trained by ``trainer`` on ``texts`` over GPT-2's byte-level pre-tokenisation (a word with its
    leading space, a run of punctuation, a contraction ending), ``<|endoftext|>`` as BOS/EOS/pad."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                   pad_token=ENDOFTEXT, model_max_length=model_max_length, **special_tokens)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``, ``<|endoftext|>`` as BOS/EOS/pad."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return train_byte_level_tokenizer(models.BPE(), trainer, texts, model_max_length)


def train_word_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A whole-word tokenizer trained on ``texts``: GPT-2's pre-tokenisation, the ``vocab_size - 2`` most frequent
    such words seen at least twice, ``<|endoftext|>`` as BOS/EOS/pad and ``<|unk|>`` for the rest. Decoding joins
    the words as written, so every word a model samples is a word of the corpus (an unknown one decodes to
    nothing)."""
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[ENDOFTEXT, UNKNOWN],
                                        show_progress=False)
    return train_byte_level_tokenizer(models.WordLevel(unk_token=UNKNOWN), trainer, texts, model_max_length,
                                      unk_token=UNKNOWN)


def build_tokenizer(spec: PolicySpec, train_texts: Sequence[str], folder: str | os.PathLike) -> None:
    """Save the policy's tokenizer to ``folder``: trained on ``train_texts`` from scratch (``spec.tokenizer``),
    or the base's."""
    if spec.base:
        tokenizer = lm.load_tokenizer(spec.base)
    else:
        train = train_word_tokenizer if spec.tokenizer == "word" else train_bpe_tokenizer
        tokenizer = train(train_texts, spec.vocab_size, spec.n_positions)
    tokenizer.save_pretrained(folder)


def from_scratch_model(spec: PolicySpec, tokenizer) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized by ``spec``, dropout 0, vocabulary of ``tokenizer``."""
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=spec.n_positions, n_embd=spec.n_embd,
                        n_layer=spec.n_layer, n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def encode_reviews(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per review, cut to ``max_length``; a review that fits ends with EOS."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    return [ids + [eos] if len(ids) < max_length else ids for ids in encoded]


def lm_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled -100), each (B, T)."""
    return {"input_ids": lm.pad(sequences, pad_id),
            "attention_mask": lm.pad([[1] * len(s) for s in sequences], 0),
            "labels": lm.pad(sequences, lm.IGNORE_INDEX)}


@torch.no_grad()
def perplexity(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """exp of the mean next-token negative log-likelihood over all predicted tokens of ``sequences``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(sequences), batch_size):
        batch = {k: v.to(device) for k, v in lm_batch(sequences[start:start + batch_size], pad_id).items()}
        logps, mask = lm.token_logps(lm.forward_logits(model, batch["input_ids"], batch["attention_mask"]),
                                     batch["labels"])
        total -= float(logps.sum())
        count += float(mask.sum())
    model.train(was_training)
    return math.exp(total / count)


def sft_steps(spec: PolicySpec, n_docs: int) -> int:
    """Optimiser steps: ``sft_epochs`` passes over ``n_docs`` reviews, capped by ``sft_max_steps`` if set."""
    steps = math.ceil(spec.sft_epochs * n_docs / spec.sft_batch_size)
    return min(steps, spec.sft_max_steps) if spec.sft_max_steps > 0 else steps


def shuffled_batches(n_docs: int, batch_size: int, generator: torch.Generator):
    """Endless index batches: a fresh seeded permutation per epoch, its last partial batch dropped."""
    per_epoch = max(1, n_docs // batch_size)
    while True:
        order = torch.randperm(n_docs, generator=generator).tolist()
        yield from (order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))


def train_sft(spec: PolicySpec, tokenizer_dir: str | os.PathLike, train_texts: Sequence[str],
              test_texts: Sequence[str], out_dir: str | os.PathLike, *, sample_prompts: Sequence[Sequence[int]],
              mixed_precision: str = "no", device: torch.device | str | None = None,
              progress: bool = True) -> dict:
    """Train pi_SFT and save it with :func:`lm.save_causal_lm` to ``out_dir / "policy"``.

    Beside it, ``metrics.json`` (validation perplexity on the test reviews, steps, time) and
    ``samples.json`` (one completion per ``sample_prompts`` entry, decoded). Returns the metrics.
    ``device``: as :func:`dpo_lab.runtime.resolve_device` (default: CUDA, then MPS, then the CPU).
    """
    if spec.sft_max_length > spec.n_positions and not spec.base:
        raise ValueError(f"sft_max_length {spec.sft_max_length} exceeds the context n_positions {spec.n_positions}")
    out_dir, progress, started = Path(out_dir), progress and processes.is_main_process(), time.time()
    runtime.seed_everything(spec.seed)
    tokenizer = lm.load_tokenizer(tokenizer_dir)
    if spec.base:
        model, _ = lm.load_causal_lm(spec.base)
    else:
        model = from_scratch_model(spec, tokenizer)
    pad_id = tokenizer.pad_token_id
    train_ids = encode_reviews(tokenizer, train_texts, spec.sft_max_length)
    test_ids = encode_reviews(tokenizer, test_texts, spec.sft_max_length)

    accelerator = runtime.make_accelerator(device, mixed_precision)
    processes.check_split(accelerator.num_processes, **{"PolicySpec.sft_batch_size": spec.sft_batch_size})
    steps = sft_steps(spec, len(train_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, round(WARMUP_FRACTION * steps)), steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    generator = torch.Generator().manual_seed(spec.seed)
    batches = itertools.islice(shuffled_batches(len(train_ids), spec.sft_batch_size, generator), steps)
    bar = tqdm(batches, total=steps, desc="SFT", disable=not progress)
    for step, indices in enumerate(bar, start=1):
        shard = indices[accelerator.process_index::accelerator.num_processes]  # one process: the whole batch
        batch = {k: v.to(accelerator.device) for k, v in lm_batch([train_ids[i] for i in shard], pad_id).items()}
        with accelerator.autocast():
            loss = model(**batch, use_cache=False).loss
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        check_step("SFT", step, "a learning rate (PolicySpec.sft_lr) too high for this model",
                   loss=processes.mean_over_processes(accelerator, {"loss": loss.item()})["loss"],
                   grad_norm=runtime.overflow_checked(accelerator, grad_norm))
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: the scaler skipped an overflowing step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model, train_seconds = accelerator.unwrap_model(model).eval(), time.time() - started
    metrics = {"val_perplexity": perplexity(model, test_ids, pad_id), "steps": steps,
               "train_docs": len(train_ids), "val_docs": len(test_ids), "train_seconds": round(train_seconds, 1),
               "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
               "processes": accelerator.num_processes}
    if processes.is_main_process():  # the others built into a scratch folder (storage.cached_artifact)
        lm.save_causal_lm(model, tokenizer, out_dir / "policy")
        storage.write_json(out_dir / "metrics.json", metrics)
        storage.write_json(out_dir / "samples.json", decoded_samples(model, tokenizer, sample_prompts,
                                                                     spec.sft_max_length, spec.seed))
    return metrics


def decoded_samples(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int) -> list[dict]:
    """One seeded completion per prompt, decoded: ``prompt``, ``completion`` and ``ended_with_eos`` each."""
    completions = lm.sample_completions(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                                        pad_id=tokenizer.pad_token_id, seed=seed)
    return [{"prompt": tokenizer.decode(p), "completion": tokenizer.decode(c, skip_special_tokens=True),
             "ended_with_eos": bool(c) and c[-1] == tokenizer.eos_token_id} for p, c in zip(prompts, completions)]
