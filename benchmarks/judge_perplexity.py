"""How fluent pi_SFT's samples read to an independent judge, against real text of the same corpus.

    python benchmarks/judge_perplexity.py                  # tiny profile, SmolLM2-135M-Instruct as the judge
    python benchmarks/judge_perplexity.py --profile ci --prompts 32 --real 32
    python benchmarks/judge_perplexity.py --vocab-size 16384      # a route to a more readable tiny world
    python benchmarks/judge_perplexity.py --tokenizer word --vocab-size 12000 --n-layer 4
    python benchmarks/judge_perplexity.py --corpus imdb_offline --tokenizer word --vocab-size 12000 --sft-epochs 2

Samples one completion of each of the first ``--prompts`` test prompts from pi_SFT (seed 0,
temperature 1, the profile's completion length) and scores prompt plus completion with the judge
(:mod:`dpo_lab.judge`); then scores the first ``--real`` texts of the corpus's test split, the
held-out real text of the kind the policy learned from, cut to the longest a sample can be (the profile's longest prompt plus
its completion length, in policy tokens) and whole. It prints the perplexities (the geometric mean over
texts, with its standard error), the ratio of the samples' to the cut real texts', the share of sampled
tokens that are unknown words, the target of the readable-text issue (pi_SFT's at most
600) and the seconds each part took. Builds (or reuses) the profile's world and the judge first.
``--corpus``, ``--tokenizer``, ``--vocab-size``, ``--n-layer``, ``--n-embd``, ``--sft-epochs``, ``--sft-max-length`` and
``--max-new-tokens`` measure a route to that target: the same profile with another corpus, tokenizer, vocabulary,
model size, SFT length or completion length (its
own cached world; with another tokenizer the test prompts, drawn by the same seeded rule in tokens,
are not the same prefixes, and with another corpus neither they nor the real texts are).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dpo_lab import lm, runtime
from dpo_lab.judge import DEFAULT_JUDGE, load_judge, log_perplexities, perplexity
from dpo_lab.profiles import Profile, get_profile
from dpo_lab.world import WorldBuilder

TARGET = 600.0
"""The readable-text issue's bound on the judge's perplexity of the `tiny` SFT samples."""


ROUTES = ("tokenizer", "vocab_size", "n_layer", "n_embd", "sft_epochs", "sft_max_length")
"""The ``PolicySpec`` fields a route may change."""


def with_route(profile: Profile, args: argparse.Namespace) -> Profile:
    """``profile`` with the SFT policy's fields in :data:`ROUTES` and the corpus replaced where given (a new world:
    its own cached tokenizer, prompts and SFT policy, beside the profile's own)."""
    changes = {name: getattr(args, name) for name in ROUTES if getattr(args, name) is not None}
    if changes:
        profile = profile.replace(policy=dataclasses.replace(profile.policy, **changes))
    if args.corpus is not None:
        profile = profile.replace(corpus=dataclasses.replace(profile.corpus, name=args.corpus))
    if args.max_new_tokens is not None:
        profile = profile.replace(sampling=dataclasses.replace(profile.sampling, max_new_tokens=args.max_new_tokens))
    return profile


def openings(texts: list[str], tokenizer, n_tokens: int) -> list[str]:
    """Each text cut after its first ``n_tokens`` tokens of ``tokenizer``: the longest a prompt plus its completion can
    be, so real text and samples are judged at the same length. The cut is made in the original text, so a word the
    tokenizer does not know is kept."""
    offsets = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=n_tokens,
                        return_offsets_mapping=True)["offset_mapping"]
    return [text[:spans[-1][1]] if spans else text for text, spans in zip(texts, offsets)]


def unknown_share(completions: list[list[int]], tokenizer) -> float:
    """The share of sampled tokens that are the tokenizer's unknown token (0 for a tokenizer without one)."""
    tokens = [t for completion in completions for t in completion]
    unknown = tokenizer.unk_token_id
    return sum(t == unknown for t in tokens) / len(tokens) if unknown is not None and tokens else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--prompts", type=int, default=128, help="test prompts sampled (default 128)")
    parser.add_argument("--real", type=int, default=100, help="real test texts judged (default 100)")
    parser.add_argument("--judge", default=DEFAULT_JUDGE, help="judge model: smollm2-135m-instruct, a hub id or a folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--corpus", help="a route to try: the corpus (rotten_tomatoes or imdb_offline)")
    parser.add_argument("--tokenizer", choices=("bpe", "word"), help="a route to try: the from-scratch tokenizer")
    parser.add_argument("--vocab-size", type=int, help="a route to try: the from-scratch vocabulary size")
    parser.add_argument("--n-layer", type=int, help="a route to try: the from-scratch model's blocks")
    parser.add_argument("--n-embd", type=int, help="a route to try: the from-scratch model's width")
    parser.add_argument("--sft-epochs", type=float, help="a route to try: passes of SFT over the training reviews")
    parser.add_argument("--sft-max-length", type=int, help="a route to try: SFT on each review's first N tokens")
    parser.add_argument("--max-new-tokens", type=int, help="a route to try: the completion length (sampled and judged)")
    args = parser.parse_args()
    builder = WorldBuilder(with_route(get_profile(args.profile), args), "cpu", progress=True)
    world = builder.build()
    runtime.use_threads(args.threads)
    started = time.time()
    judge, judge_tokenizer = load_judge(args.judge)
    loaded = time.time() - started
    policy, tokenizer = world.load_policy("cpu")
    prompts = world.test_prompts[:args.prompts]
    completions = lm.sample_completions(policy, prompts, max_new_tokens=world.profile.sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=0)
    samples = [tokenizer.decode(list(p) + c, skip_special_tokens=True) for p, c in zip(prompts, completions)]
    whole = builder.texts("test")[:args.real]
    length = world.profile.prompts.max_tokens + world.profile.sampling.max_new_tokens
    started = time.time()
    sft_ppl, sft_se = perplexity(log_perplexities(judge, judge_tokenizer, samples))
    judged = time.time() - started
    real_ppl, real_se = perplexity(log_perplexities(judge, judge_tokenizer, openings(whole, tokenizer, length)))
    whole_ppl, whole_se = perplexity(log_perplexities(judge, judge_tokenizer, whole))
    print(f"judge {args.judge} ({loaded:.1f} s to load), profile {args.profile}, {args.threads} threads, "
          f"policy {world.profile.policy.tokenizer} vocabulary {len(tokenizer)}, {world.profile.policy.n_layer} x "
          f"{world.profile.policy.n_embd}, SFT epochs {world.profile.policy.sft_epochs:g}, corpus {world.profile.corpus.name}")
    print(f"pi_SFT samples ({len(samples)} test prompts, seed 0, T = 1): perplexity {sft_ppl:.1f} ± {sft_se:.1f} "
          f"({judged:.1f} s)")
    print(f"  unknown tokens among the sampled ones (decoded to nothing): {unknown_share(completions, tokenizer):.1%}")
    print(f"real test texts ({len(whole)}), their first {length} policy tokens: perplexity {real_ppl:.1f} ± {real_se:.1f}")
    print(f"the same texts whole:                         perplexity {whole_ppl:.1f} ± {whole_se:.1f}")
    print(f"ratio SFT / real: {sft_ppl / real_ppl:.2f}; target SFT <= {TARGET:g}: "
          f"{'met' if sft_ppl <= TARGET else 'not met'}")
    for text in samples[:3]:
        print(f"  sample: {text!r}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
