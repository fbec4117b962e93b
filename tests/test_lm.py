"""lm utilities: masking and padding of log-probabilities, sampling, save/load round trip."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab import lm


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
COMPLETIONS = [[20, 21, 0], [22], [23, 24, 25, 26, 27]]


def _logps(model, side):
    batch = lm.completion_batch(PROMPTS, COMPLETIONS, pad_id=0, side=side)
    return lm.sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def _reference_logps(model):
    """Each sequence alone, unpadded, summed by hand over its completion tokens."""
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        out.append(sum(logp[len(p) - 1 + i, tok] for i, tok in enumerate(c)))
    return torch.stack(out)


def test_completion_batch_masks_prompt_and_padding():
    batch = lm.completion_batch(PROMPTS, COMPLETIONS, pad_id=0, side="right")
    assert batch["input_ids"].shape == (3, 9)
    assert batch["labels"][0].tolist() == [-100, -100, -100, 20, 21, 0, -100, -100, -100]
    assert batch["attention_mask"].sum(1).tolist() == [6, 3, 9]


@torch.no_grad()
def test_padding_side_and_extra_padding_leave_logps_unchanged(tiny_gpt2):
    expected = _reference_logps(tiny_gpt2)
    right = _logps(tiny_gpt2, "right")
    left = _logps(tiny_gpt2, "left")
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, expected, atol=1e-5, rtol=0)
    # Extra padding columns on the right change nothing either.
    batch = lm.completion_batch(PROMPTS, COMPLETIONS, pad_id=0, side="right")
    extra = {k: torch.nn.functional.pad(v, (0, 4), value=(-100 if k == "labels" else 0)) for k, v in batch.items()}
    padded = lm.sequence_logps(tiny_gpt2, extra["input_ids"], extra["attention_mask"], extra["labels"])
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=0)


def test_generated_eos_counts(tiny_gpt2):
    with_eos = lm.completion_batch([[5, 6]], [[20, 0]], pad_id=0)
    without = lm.completion_batch([[5, 6]], [[20]], pad_id=0)
    a = lm.sequence_logps(tiny_gpt2, **with_eos)
    b = lm.sequence_logps(tiny_gpt2, **without)
    assert a.item() < b.item()  # the EOS token adds a (negative) log-probability


def test_truncate_after_eos():
    assert lm.truncate_after_eos([4, 5, 0, 0, 0], eos_id=0) == [4, 5, 0]
    assert lm.truncate_after_eos([4, 5, 1, 1], eos_id=0, pad_id=1) == [4, 5]


def test_sampling_is_seeded_untruncated_and_stops_at_eos(tiny_gpt2):
    assert lm.sampling_config(8, 0, 0).top_k == 0
    prompts = [[5, 6], [7], [8, 9, 10]] * 4
    a = lm.sample_completions(tiny_gpt2, prompts, max_new_tokens=8, eos_id=0, pad_id=0, seed=3, batch_size=5)
    b = lm.sample_completions(tiny_gpt2, prompts, max_new_tokens=8, eos_id=0, pad_id=0, seed=3, batch_size=5)
    assert a == b
    assert all(len(c) == 8 or c[-1] == 0 for c in a)
    assert all(0 not in c[:-1] for c in a)


def test_sampling_uses_the_full_distribution(tiny_gpt2):
    """Without top-k, rare tokens appear: over many draws more than 50 distinct tokens can't be seen
    with V=50, so check instead that token frequencies match the model's softmax."""
    torch.manual_seed(0)
    prompts = [[5, 6]] * 4000
    firsts = [c[0] for c in lm.sample_completions(tiny_gpt2, prompts, max_new_tokens=1, eos_id=0, pad_id=0,
                                                   seed=1, batch_size=1000)]
    probs = torch.softmax(tiny_gpt2(torch.tensor([[5, 6]])).logits[0, -1], -1)
    freq = torch.bincount(torch.tensor(firsts), minlength=50).float() / len(firsts)
    assert (freq - probs).abs().max() < 0.03


def test_save_and_load_round_trip(tmp_path, tiny_gpt2):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(50)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                  eos_token="t0")
    path = lm.save_causal_lm(tiny_gpt2, tok, tmp_path / "policy")
    assert (path / "model.safetensors").exists()
    model, tokenizer = lm.load_causal_lm(path)
    assert tokenizer.pad_token == "t0" and tokenizer.padding_side == "left"
    batch = lm.completion_batch(PROMPTS, COMPLETIONS, pad_id=0)
    torch.testing.assert_close(lm.sequence_logps(model, **batch), lm.sequence_logps(tiny_gpt2, **batch))


def test_kl_to_reference_matches_the_full_logits_computation(tiny_gpt2):
    """The evaluation's KL (head on completion positions only, batched) equals summing the exact per-token KL
    and the sampled log-ratio over full-sequence logits, one unpadded sequence at a time."""
    from dpo_lab.evaluate import kl_to_reference

    torch.manual_seed(1)
    other = GPT2LMHeadModel(tiny_gpt2.config).eval()
    exact, sample = kl_to_reference(tiny_gpt2, other, PROMPTS, COMPLETIONS, pad_id=0, batch_size=2)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits_p, logits_q = tiny_gpt2(ids).logits[0], other(ids).logits[0]
        rows = slice(len(p) - 1, len(p) + len(c) - 1)  # positions predicting the completion tokens
        ratio = torch.log_softmax(logits_p[rows], -1) - torch.log_softmax(logits_q[rows], -1)
        expected_exact = (torch.softmax(logits_p[rows], -1) * ratio).sum()
        expected_sample = ratio[torch.arange(len(c)), torch.tensor(c)].sum()
        assert expected_exact > 1e-3  # the two models differ
        assert exact[i].item() == pytest.approx(expected_exact.item(), rel=1e-4, abs=1e-7)
        assert sample[i].item() == pytest.approx(expected_sample.item(), rel=1e-4, abs=1e-7)
