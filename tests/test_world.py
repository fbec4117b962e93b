"""The prepared world: its API, the cache, SFT (from scratch and from a local 'hub' checkpoint), sampling."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab import corpus, lm, sentiment
from dpo_lab.cli import run_prepare
from dpo_lab.profiles import PolicySpec, get_profile
from dpo_lab.train import sft
from dpo_lab.world import World, prepare


def test_world_holds_policy_prompts_and_scorer(ci_world):
    profile = get_profile("ci")
    assert isinstance(ci_world, World)
    assert (ci_world.sft_dir / "model.safetensors").is_file()
    assert len(ci_world.train_prompts) == profile.prompts.n_train
    assert len(ci_world.test_prompts) == profile.prompts.n_test
    assert all(2 <= len(p) <= 8 for p in ci_world.train_prompts + ci_world.test_prompts)
    model, tokenizer = ci_world.load_policy("cpu")
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0
    assert len(tokenizer) == profile.policy.vocab_size
    test_texts = corpus.load_corpus(profile.corpus)["test"]["text"].tolist()
    decoded = tokenizer.batch_decode(ci_world.test_prompts[:20])
    assert all(any(t.startswith(d) for t in test_texts) for d in decoded)
    assert isinstance(ci_world.load_scorer("cpu"), sentiment.NgramScorer)
    metrics = json.loads((ci_world.sft_dir.parent / "metrics.json").read_text())
    assert metrics["val_perplexity"] < profile.policy.vocab_size / 2
    samples = json.loads((ci_world.sft_dir.parent / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == tokenizer.batch_decode(ci_world.test_prompts[:len(samples)])


def test_second_prepare_reuses_everything(ci_world):
    started = time.time()
    again = prepare(get_profile("ci"), progress=False)
    assert time.time() - started < 5
    assert again == ci_world


def test_ground_truth_change_rebuilds_only_the_scorer(ci_world):
    profile = get_profile("ci")
    changed = profile.replace(ground_truth=dataclasses.replace(profile.ground_truth, classifier_c=1.0))
    world = prepare(changed, progress=False)
    assert world.sft_dir == ci_world.sft_dir
    assert world.test_prompts == ci_world.test_prompts
    assert world.ground_truth != ci_world.ground_truth


def test_sampling_is_pure_ancestral_and_stops(ci_world):
    model, tokenizer = ci_world.load_policy("cpu")
    config = lm.sampling_config(12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (config.top_k, config.top_p, config.temperature, config.do_sample) == (0, 1.0, 1.0, True)
    max_new = 24
    completions = lm.sample_completions(model, ci_world.test_prompts, max_new_tokens=max_new,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=0)
    ended = [bool(c) and c[-1] == tokenizer.eos_token_id for c in completions]
    assert all(e or len(c) == max_new for e, c in zip(ended, completions))
    assert any(ended)


def test_sft_fine_tunes_a_local_hub_style_checkpoint(imdb_sample, ci_world, tmp_path):
    _, tokenizer = ci_world.load_policy("cpu")
    base = tmp_path / "base"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16,
                               n_positions=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    spec = PolicySpec(base=str(base), sft_max_steps=3, sft_batch_size=4, sft_lr=1e-2, sft_max_length=48)
    reviews = corpus.read_parquet_folder(imdb_sample)
    sft.build_tokenizer(spec, [], tmp_path / "tokenizer")
    prompts = ci_world.test_prompts[:2]
    metrics = sft.train_sft(spec, tmp_path / "tokenizer", reviews["train"]["text"].tolist()[:16],
                            reviews["test"]["text"].tolist()[:8], tmp_path / "out", sample_prompts=prompts,
                            device="cpu", progress=False)
    assert metrics["steps"] == 3 and metrics["val_perplexity"] > 1
    tuned, tuned_tokenizer = lm.load_causal_lm(tmp_path / "out" / "policy")
    original, _ = lm.load_causal_lm(base)
    assert tuned_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert not torch.equal(tuned.transformer.wte.weight, original.transformer.wte.weight)
    assert len(json.loads((tmp_path / "out" / "samples.json").read_text())) == len(prompts)


def test_cli_prepare_prints_summary(ci_world, capsys):
    run_prepare(["--profile", "ci"])
    out = capsys.readouterr().out
    assert str(ci_world.sft_dir) in out
    assert "validation perplexity" in out and "held-out accuracy" in out and "within-prompt std" in out


def test_bit_flipped_sft_weights_are_detected_and_rebuilt(ci_world, isolated_home, tmp_path, monkeypatch, caplog):
    """Flipped SFT weights used to be reused with exit code 0 and a KL of about 6,900 nats."""
    world_stages = ("corpus-*", "tokenizer-*", "prompts-*", "ground_truth-*", "sft-*", "score_spread-*")
    for pattern in world_stages:
        for folder in (isolated_home / "ci").glob(pattern):
            shutil.copytree(folder, tmp_path / "ci" / folder.name)
    monkeypatch.setenv("DPO_LAB_HOME", str(tmp_path))
    weights = tmp_path / ci_world.sft_dir.relative_to(isolated_home) / "model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x04
    weights.write_bytes(bytes(flipped))
    with caplog.at_level("WARNING", logger="dpo_lab"):
        world = prepare(get_profile("ci"), progress=False)
    assert f"{weights.parent.parent}: policy/model.safetensors does not match the checksum" in caplog.text
    assert world.sft_dir == weights.parent
    assert weights.read_bytes() == original  # rebuilt, and SFT is deterministic: the same weights


def test_prepare_runs_at_the_profiles_thread_count(ci_world):
    from dpo_lab.world import prepare

    before = torch.get_num_threads()
    try:
        prepare(get_profile("ci").replace(threads=2), progress=False)  # everything cached: reads only
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_word_tokenizer_writes_only_words_of_the_corpus():
    texts = ["It's a fine film, and a fine cast.", "A fine mess of a film!", "It's dull, a mess."] * 2 + ["Unique."]
    tokenizer = sft.train_word_tokenizer(texts, vocab_size=256, model_max_length=64)
    words = {word for word in tokenizer.get_vocab() if not word.startswith("<|")}
    assert {"It", "'s", "Ġfine", "Ġfilm", ","} <= words and "ĠUnique" not in words  # seen once: unknown
    ids = tokenizer("It's a fine mess, and a dull cast.")["input_ids"]
    assert tokenizer.decode(ids) == "It's a fine mess, and a dull cast."  # words join as written
    assert tokenizer.decode(tokenizer("A Unique film.")["input_ids"], skip_special_tokens=True) == "A film."
    pieces = {piece for text in texts for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)}
    assert words <= pieces  # every token is a whole word (or punctuation run) of the corpus: no sub-word pieces
