"""The evaluation protocol, identical for every method and checkpoint.

For a policy pi and the reference pi_ref = pi_SFT, on a fixed set of test prompts x:

1. sample one completion y ~ pi(.|x) per prompt with a fixed seed (the same random numbers at every
   checkpoint), temperature 1, no top-k/top-p;
2. reward: the ground-truth p(positive | x, y), mean and standard error over prompts;
3. KL: the sequence-level KL(pi || pi_ref) of the paper, estimated on the policy's own samples as
   the sum over completion tokens of the *exact* per-token KL over the full vocabulary,
   sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)); its mean over prompts is an unbiased estimate of
   the sequence KL with much lower variance than the single-sample log-ratio, which is reported
   beside it as ``kl_sample`` (sum_t log pi(y_t|.) - log pi_ref(y_t|.));
4. the mean completion length in tokens (EOS included when generated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel

from dpo_lab.kl import token_kl_and_logps
from dpo_lab.lm import completion_batch, labelled_logits, sample_completions
from dpo_lab.sentiment import Scorer, finite_score_ids


@dataclass
class Evaluation:
    """One checkpoint's numbers; ``row()`` gives the columns of the results table."""

    reward: float
    reward_se: float
    kl: float
    kl_se: float
    kl_sample: float
    length: float
    n_prompts: int
    samples: list[dict] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        """The metric columns of one results-table row."""
        out = asdict(self)
        out.pop("samples")
        return out


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor."""
    values = values.double()
    n = values.numel()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), se


@torch.no_grad()
def kl_to_reference(policy: PreTrainedModel, reference: PreTrainedModel, prompts: Sequence[Sequence[int]],
                    completions: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence KL of ``policy`` from ``reference`` at the given (sampled) sequences.

    Returns ``(exact, sample)``, both (N,): ``exact`` sums the full-vocabulary KL at every
    completion position, ``sample`` sums the log-ratio of the sampled tokens (the k1 estimator).
    The default ``batch_size`` keeps the (tokens, vocabulary) log-probabilities small enough to stay
    fast on a CPU's caches and within memory at the paper's vocabulary.
    """
    device = next(policy.parameters()).device
    exact, sample = [], []
    for start in range(0, len(prompts), batch_size):
        batch = completion_batch(prompts[start:start + batch_size], completions[start:start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits_p, targets, mask = labelled_logits(policy, batch)  # (N, V), (N,), (B, T-1)
        logits_q, _, _ = labelled_logits(reference, batch)
        kl, logp, logq = token_kl_and_logps(logits_p, logits_q, targets)  # each (N,)
        rows = mask.nonzero()[:, 0]
        exact.append(torch.zeros(len(mask), device=device).index_add_(0, rows, kl).cpu())
        sample.append(torch.zeros(len(mask), device=device).index_add_(0, rows, logp - logq).cpu())
    return torch.cat(exact), torch.cat(sample)


def evaluate_policy(policy: PreTrainedModel, reference: PreTrainedModel, tokenizer, scorer: Scorer,
                    prompts: Sequence[Sequence[int]], *, max_new_tokens: int, seed: int, batch_size: int = 256,
                    n_samples_kept: int = 8, progress: bool = False) -> Evaluation:
    """Evaluate ``policy`` by the protocol in the module docstring.

    ``prompts``: the fixed test prompts (token ids). ``n_samples_kept`` decoded samples are kept
    in ``Evaluation.samples`` for reading.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    was_training = policy.training
    policy.eval()
    completions = sample_completions(policy, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                     pad_id=pad_id, batch_size=batch_size, seed=seed, progress=progress,
                                     desc="evaluating")
    scores = finite_score_ids(scorer, tokenizer, prompts, completions)
    exact, sample = kl_to_reference(policy, reference, prompts, completions, pad_id)
    policy.train(was_training)
    reward, reward_se = mean_and_se(scores)
    kl, kl_se = mean_and_se(exact)
    samples = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True),
         "completion": tokenizer.decode(c, skip_special_tokens=True), "reward": float(s)}
        for p, c, s in zip(prompts[:n_samples_kept], completions[:n_samples_kept], scores[:n_samples_kept])
    ]
    return Evaluation(reward=reward, reward_se=reward_se, kl=kl, kl_se=kl_se, kl_sample=sample.mean().item(),
                      length=sum(len(c) for c in completions) / len(completions), n_prompts=len(prompts),
                      samples=samples)
