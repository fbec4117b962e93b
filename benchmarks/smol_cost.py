"""What the `smol` profile costs: SmolLM2-135M's measured token rates on this machine, times the tokens each
stage of the profile processes.

    python benchmarks/smol_cost.py                  # 2 threads, 3 repeats of each rate
    python benchmarks/smol_cost.py --threads 1 --repeats 1

Measures three rates of the 134.5M-parameter Llama (float32, the CPU's precision), each the median of
``--repeats`` timings after one warm-up:

- **train**: tokens per second through a forward pass, backward pass and AdamW step (batches of 8
  sequences of 48 tokens: a prompt plus a completion at the cap);
- **forward**: tokens per second through a forward pass without gradients (32 x 48), as pi_ref's
  log-probabilities, the reward model's scores and the KL of every evaluation are computed;
- **sample**: completion tokens per second of ancestral sampling with the KV cache (64 prompts, 32
  new tokens, no early stop).

Then it counts the tokens each stage of the profile processes, from the profile's settings and its
corpus (SFT: every training review cut to ``sft_max_length``; elsewhere prompt plus completion, every
completion counted at the cap, so these are upper bounds), and prints the hours each stage and the
paper's sweep take at these rates, with its model FLOPs (6 N per trained token, 2 N per forward or
sampled token; attention left out). A GPU's time is not measured here: divide the FLOPs by what your
card sustains (sampling on a GPU is bound by latency, not FLOPs, so PPO's rollouts take longer than
that).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpo_lab import lm, runtime
from dpo_lab.pretrained import SMOLLM2_NAME
from dpo_lab.profiles import get_profile
from dpo_lab.world import WorldBuilder


def median_seconds(work, repeats: int) -> float:
    """Median wall time of ``work()`` over ``repeats`` calls, after one untimed call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def token_rates(model, repeats: int) -> dict[str, float]:
    """Tokens per second of a train step, a forward pass and sampling (see the module docstring)."""
    vocab = model.config.vocab_size
    train_ids, forward_ids = torch.randint(vocab, (8, 48)), torch.randint(vocab, (32, 48))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step():
        model(train_ids, labels=train_ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            model(forward_ids, use_cache=False)

    prompts, new_tokens = torch.randint(vocab, (64, 5)).tolist(), 32

    def sample():
        lm.sample_completions(model, prompts, max_new_tokens=new_tokens, eos_id=-1, pad_id=0, seed=0)

    return {"train": train_ids.numel() / median_seconds(train_step, repeats),
            "forward": forward_ids.numel() / median_seconds(forward, repeats),
            "sample": len(prompts) * new_tokens / median_seconds(sample, repeats)}


def stage_tokens(profile, review_tokens: int) -> dict[str, dict[str, float]]:
    """Upper bounds on the tokens each stage trains on, runs forward and samples: SFT, the preference pairs, the
    reward model, and one run each of DPO, PPO and RLOO (their evaluations included)."""
    prompt = (profile.prompts.min_tokens + profile.prompts.max_tokens) / 2
    cap = profile.sampling.max_new_tokens
    seq = prompt + cap
    k = profile.preferences.samples_per_prompt
    pairs = profile.preferences.n_prompts * k * (k - 1) // 2
    n_test = profile.prompts.n_test
    offline, ppo, online = profile.offline, profile.ppo, profile.online
    dpo_steps = offline.epochs * pairs / offline.batch_size
    evaluation = {"sample": n_test * cap, "forward": 2 * n_test * seq}  # samples, then policy and pi_ref for the KL
    dpo_evals = dpo_steps // offline.eval_every + 1
    ppo_evals = ppo.iterations // ppo.eval_every + 1
    online_evals = online.iterations // online.eval_every + 1
    online_samples = online.iterations * online.prompts_per_iteration * online.group_size
    return {
        "SFT": {"train": profile.policy.sft_epochs * review_tokens},
        "preference pairs": {"sample": profile.preferences.n_prompts * k * cap},
        "reward model": {"train": profile.reward.epochs * pairs * 2 * seq},
        "one DPO run": {"train": offline.epochs * pairs * 2 * seq, "forward": pairs * 2 * seq + dpo_evals * evaluation["forward"],
                        "sample": dpo_evals * evaluation["sample"]},
        "one PPO run": {"train": ppo.iterations * ppo.ppo_epochs * ppo.rollout_size * seq,
                        "forward": ppo.iterations * 3 * ppo.rollout_size * seq + ppo_evals * evaluation["forward"],
                        "sample": ppo.iterations * ppo.rollout_size * cap + ppo_evals * evaluation["sample"]},
        "one RLOO run": {"train": online.epochs * online_samples * seq,
                         "forward": 3 * online_samples * seq + online_evals * evaluation["forward"],
                         "sample": online_samples * cap + online_evals * evaluation["sample"]},
    }


def main() -> None:
    """Measure the rates, count each stage's tokens, print the table and the paper's sweep."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runtime.use_threads(args.threads)
    profile = get_profile("smol")
    model, tokenizer = lm.load_causal_lm(SMOLLM2_NAME)
    n_params = sum(p.numel() for p in model.parameters())
    texts = WorldBuilder(profile, "cpu", progress=False).texts("train")
    lengths = [min(len(ids) + 1, profile.policy.sft_max_length) for ids in tokenizer(texts)["input_ids"]]
    rates = token_rates(model.train(), args.repeats)
    print(f"SmolLM2-135M ({n_params / 1e6:.1f}M parameters), float32, {args.threads} threads, median of {args.repeats}: "
          + ", ".join(f"{name} {rate:,.0f} tokens/s" for name, rate in rates.items()))
    print(f"{len(texts)} training reviews, {sum(lengths):,} SFT tokens per epoch (cut to {profile.policy.sft_max_length})")
    print(f"{'stage':<18}{'train tok':>12}{'forward tok':>13}{'sampled tok':>13}{'CPU hours':>11}{'PFLOP':>9}")
    hours, pflop = {}, {}
    for stage, tokens in stage_tokens(profile, sum(lengths)).items():
        hours[stage] = sum(count / rates[kind] for kind, count in tokens.items()) / 3600
        pflop[stage] = n_params * (6 * tokens.get("train", 0) + 2 * tokens.get("forward", 0)
                                   + 2 * tokens.get("sample", 0)) / 1e15
        print(f"{stage:<18}{tokens.get('train', 0):>12,.0f}{tokens.get('forward', 0):>13,.0f}"
              f"{tokens.get('sample', 0):>13,.0f}{hours[stage]:>11.1f}{pflop[stage]:>9.2f}")
    sweep = profile.sweep
    runs = {"SFT": 1, "preference pairs": 1, "reward model": 1, "one PPO run": 2 * len(sweep.ppo_target_kls),
            "one DPO run": len(sweep.dpo_betas) + len(sweep.unlikelihood_alphas) + len(sweep.preferred_ft_seeds)}
    print(f"the paper's sweep (SFT, pairs, reward model, {runs['one DPO run']} DPO/Unlikelihood/Preferred-FT runs "
          f"at one DPO run's cost, {runs['one PPO run']} PPO/PPO-GT runs; Best-of-N left out): "
          f"{sum(n * hours[stage] for stage, n in runs.items()):.0f} CPU hours, "
          f"{sum(n * pflop[stage] for stage, n in runs.items()):.1f} PFLOP")


if __name__ == "__main__":
    main()
