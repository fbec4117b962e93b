"""How many torch CPU threads the `tiny` models should use: SFT and DPO steps at 1 and 2 threads, on
an idle machine and beside a competing process.

    python benchmarks/threads.py                    # tiny profile, 3 repeats of every setting
    python benchmarks/threads.py --profile ci --repeats 1 --steps 5

Every setting runs in a fresh process (torch's thread pool cannot be resized reliably once used).
It builds (or reuses) the profile's world and preference pairs, then times ``--steps`` steps after 3
warm-up steps:

- **SFT**: the SFT loop's forward pass, backward pass and AdamW step on pi_SFT's architecture and
  weights, with batches of ``sft_batch_size`` sequences of ``sft_max_length`` tokens (random token
  ids: the cost of a step depends on the shapes, not the text);
- **DPO**: ``dpo_lab.train.dpo.OfflineStep`` at beta = 0.1 on the profile's real preference pairs,
  the step every DPO run repeats.

"busy" starts a competing process first: ``--competitor-threads`` threads (default 1) multiplying
384 x 384 matrices for the whole measurement, as another job on a shared 2-core laptop would. The table gives the median seconds per
step over the repeats, and the ratio of 2 threads to 1 thread (below 1: two threads are faster).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

COMPETITOR = ("import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(384, 384)\n"
              "while True:\n    a = torch.tanh(a @ a)\n")


@dataclass
class BenchmarkArgs:
    """Options of the benchmark."""

    steps: int = field(default=20, metadata={"help": "Timed steps per stage and setting."})
    repeats: int = field(default=3, metadata={"help": "Processes per setting (the median is reported)."})
    competitor_threads: int = field(default=1, metadata={"help": "Threads of the competing process."})
    worker: int = field(default=0, metadata={"help": "Internal: run one measurement at this many threads."})


def time_steps(step, n: int) -> float:
    """Median seconds of ``n`` calls of ``step(i)`` after 3 warm-up calls."""
    for i in range(3):
        step(i)
    times = []
    for i in range(3, 3 + n):
        started = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sft_step_fn(world):
    """One SFT step (forward, backward, AdamW) on random batches of the SFT shapes."""
    import torch

    from dpo_lab import lm

    model, tokenizer = lm.load_causal_lm(world.sft_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    spec = world.profile.policy
    generator = torch.Generator().manual_seed(0)

    def step(_: int) -> None:
        ids = torch.randint(0, len(tokenizer), (spec.sft_batch_size, spec.sft_max_length), generator=generator)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dpo_step_fn(world, pairs_path):
    """One DPO step of the offline trainer at beta = 0.1, on the profile's pairs in the training order."""
    from dpo_lab import runtime
    from dpo_lab.train.dpo import Objective, batch_schedule, load_pairs, offline_step

    spec, pairs = world.profile.offline, load_pairs(pairs_path)
    accelerator = runtime.make_accelerator("cpu", "no", spec.grad_accum)
    train_step, _, _ = offline_step(world, pairs_path, pairs, Objective("dpo", beta=0.1), spec, "cached",
                                    accelerator, world.sft_dir, progress=False)
    schedule = batch_schedule(len(pairs), spec.batch_size, 200, spec.seed)
    return lambda i: train_step(schedule[i % len(schedule)])


def measure(profile_name: str, threads: int, steps: int) -> dict:
    """Seconds per SFT step and per DPO step at ``threads`` torch threads, in this process."""
    import torch

    from dpo_lab.preferences import build_preferences
    from dpo_lab.profiles import get_profile
    from dpo_lab.world import prepare

    world = prepare(get_profile(profile_name), progress=False)
    pairs_path = build_preferences(world, progress=False)
    torch.set_num_threads(threads)  # after prepare, which applies the profile's own setting
    return {"sft": time_steps(sft_step_fn(world), steps), "dpo": time_steps(dpo_step_fn(world, pairs_path), steps)}


def run_setting(argv: list[str], threads: int, busy: int) -> dict:
    """One measurement in a fresh process, beside a competing process of ``busy`` threads if ``busy``."""
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(busy)]) if busy else None
    try:
        time.sleep(1.0 if busy else 0.0)
        out = subprocess.run([sys.executable, __file__, *argv, "--worker", str(threads)], check=True,
                             capture_output=True, text=True).stdout
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict) -> None:
    """The table: median seconds per step per setting, and the 2-thread / 1-thread ratio."""
    print(f"{'stage':5s} {'load':5s} {'1 thread':>10s} {'2 threads':>10s} {'2 / 1':>7s}")
    for stage in ("sft", "dpo"):
        for load in ("idle", "busy"):
            one, two = (statistics.median(r[stage] for r in results[threads, load]) for threads in (1, 2))
            print(f"{stage:5s} {load:5s} {one * 1000:8.1f} ms {two * 1000:8.1f} ms {two / one:7.2f}")


def main(argv: list[str]) -> None:
    from dpo_lab.cli import parse

    common, args = parse("benchmarks/threads.py", argv, BenchmarkArgs)
    profile_name = common.profile or "tiny"
    if args.worker:
        print(json.dumps(measure(profile_name, args.worker, args.steps)))
        return
    passed = ["--profile", profile_name, "--steps", str(args.steps)]
    results = {(threads, load): [] for threads in (1, 2) for load in ("idle", "busy")}
    for repeat in range(args.repeats):
        for (threads, load), runs in results.items():
            runs.append(run_setting(passed, threads, busy=args.competitor_threads if load == "busy" else 0))
            print(f"repeat {repeat + 1}: {threads} thread(s), {load}: "
                  + ", ".join(f"{k} {v * 1000:.1f} ms/step" for k, v in runs[-1].items()), flush=True)
    print(f"\nprofile {profile_name}, {args.steps} timed steps per stage, median of {args.repeats} processes; "
          f"busy: beside a competing process of {args.competitor_threads} thread(s)")
    report(results)


if __name__ == "__main__":
    main(sys.argv[1:])
