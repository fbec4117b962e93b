"""Exact and sampled KL divergences in dpo_lab.kl."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lab.kl import kl_estimators, sequence_kl, token_kl_and_logps


def exact_token_kl(logits_p, logits_q):
    return token_kl_and_logps(logits_p, logits_q, torch.zeros(logits_p.shape[:-1], dtype=torch.long))[0]


def test_exact_token_kl_and_sampled_logps_hand_values() -> None:
    logits_p = torch.tensor([[[0.0, math.log(3.0)], [float("-inf"), 0.0]]])  # p = (1/4, 3/4), (0, 1)
    logits_q = torch.zeros(1, 2, 2)  # q = (1/2, 1/2)
    kl, logp, logq = token_kl_and_logps(logits_p, logits_q, torch.tensor([[1, 1]]))
    expected = [0.25 * math.log(0.5) + 0.75 * math.log(1.5), math.log(2.0)]
    assert kl.shape == logp.shape == logq.shape == (1, 2)
    assert kl[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert logp[0].tolist() == pytest.approx([math.log(0.75), 0.0], abs=1e-6)
    assert logq[0].tolist() == pytest.approx([math.log(0.5)] * 2, rel=1e-6)


def test_exact_token_kl_is_zero_for_equal_logits_and_shift_invariant() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    assert exact_token_kl(logits, logits).abs().max().item() == 0.0
    assert exact_token_kl(logits, logits + 5.0).abs().max().item() < 1e-5


def test_exact_token_kl_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits_q"):
        exact_token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_estimators_agree_with_exact_kl() -> None:
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    n = 20_000
    tokens = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = kl_estimators(p.log()[tokens], q.log()[tokens])
    for name in ("k1", "k3"):
        samples = estimates[name]
        stderr = samples.std().item() / math.sqrt(n)
        assert abs(samples.mean().item() - exact) < 3 * stderr, name
    assert estimates["k3"].std() < estimates["k1"].std()


def test_k3_is_never_negative() -> None:
    gen = torch.Generator().manual_seed(1)
    logp, logq = -10 * torch.rand(10_000, generator=gen), -10 * torch.rand(10_000, generator=gen)
    assert (kl_estimators(logp, logq)["k3"] >= 0).all()


def test_sequence_kl_sums_valid_tokens() -> None:
    token_kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.4, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_kl(token_kl, mask).tolist() == pytest.approx([0.3, 1.2])


def test_chain_rule_sequence_kl_is_the_expected_sum_of_per_token_kls() -> None:
    """Two-token autoregressive toy: KL over all 9 sequences = KL of token 1 + E_{y1 ~ p}[KL of token 2 | y1]."""
    g = torch.Generator().manual_seed(0)
    first_p, first_q = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    second_p = torch.randn(3, 3, generator=g, dtype=torch.float64)
    second_q = torch.randn(3, 3, generator=g, dtype=torch.float64)
    log_p1, log_q1 = first_p.log_softmax(-1), first_q.log_softmax(-1)
    seq_logp = log_p1[:, None] + second_p.log_softmax(-1)
    seq_logq = log_q1[:, None] + second_q.log_softmax(-1)
    enumerated = (seq_logp.exp() * (seq_logp - seq_logq)).sum()
    y1 = torch.arange(3)
    token1, _, _ = token_kl_and_logps(first_p.expand(3, 3), first_q.expand(3, 3), y1)   # the same KL, 3 times
    token2, _, _ = token_kl_and_logps(second_p, second_q, y1)                        # KL of token 2 given y1
    expected_sum = (log_p1.exp() * (token1 + token2)).sum()
    torch.testing.assert_close(expected_sum.double(), enumerated, rtol=1e-5, atol=1e-6)  # token KLs are float32
