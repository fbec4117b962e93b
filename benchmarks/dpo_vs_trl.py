"""Throughput and memory of one DPO training step: dpo_lab's trainer vs TRL's DPOTrainer vs a bare loop (CPU).

All three train the profile's SFT policy (``tiny`` by default: the ~1M-parameter GPT-2 of the
offline world) on the profile's preference pairs, with the same settings: DPO sigmoid loss,
beta 0.1, AdamW (lr 1e-4, no weight decay, constant learning rate), gradient norm clipped at 10,
``--batch-size`` pairs per step, ``--steps`` steps over exactly the same pairs in exactly the same
order (TRL is given our token ids and a sequential sampler), no evaluation, no checkpoints.

Contestants, each in two reference modes (log pi_ref precomputed once, or a reference forward pass
in every step):

- ``ours``: :class:`dpo_lab.train.dpo.OfflineStep`, the step ``train_offline`` runs (batch
  building, one forward pass of chosen + rejected, loss, backward, clipping, optimiser, metrics);
- ``trl``: ``trl.DPOTrainer(...).train()`` (``precompute_ref_log_probs=True`` for the precomputed
  mode; dataset preparation and the precompute happen before the timed steps);
- ``bare``: the least a step must do: forward of the pre-built concatenated batch, log-probs,
  the DPO loss, backward, optimiser step (no clipping, no metrics, no batch building).

Measurements, per contestant: pairs per second over the steps after ``--warmup`` untimed ones
(wall clock between the end of step ``warmup`` and the end of the last step; for TRL taken in a
``TrainerCallback.on_step_end``, so its data loading and collation are inside the window, as ours
are); the mean training loss (the three must agree: same data, same updates); and memory. Each
contestant runs in a fresh child process (spawned, one at a time), which reports the resident set
size (RSS) just before its first step and its peak RSS (``getrusage`` ``ru_maxrss``, which covers
everything the process did, imports and setup included); the difference is what training added.
torch uses ``--threads`` intra-op threads in every child (default 1: on a shared machine more
threads mostly measure contention).

Run: ``pip install trl==1.16.0`` then ``python benchmarks/dpo_vs_trl.py`` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import tempfile
import time
from dataclasses import dataclass

BETA = 0.1
LR = 1e-4
MAX_GRAD_NORM = 10.0
CONTESTANTS = ("bare", "ours", "trl")
REFERENCE_MODES = ("precomputed", "on-the-fly")


@dataclass(frozen=True)
class Setting:
    """What every contestant shares."""

    profile: str
    batch_size: int
    steps: int
    warmup: int
    threads: int


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(setting: Setting):
    """World, pairs, the SFT policy and the pair order of the benchmark (identical for every contestant)."""
    import torch

    torch.set_num_threads(setting.threads)
    from dpo_lab import lm
    from dpo_lab.preferences import build_preferences
    from dpo_lab.profiles import get_profile
    from dpo_lab.train import dpo
    from dpo_lab.world import prepare

    world = prepare(get_profile(setting.profile), device="cpu", progress=False)
    pairs_path = build_preferences(world, device="cpu", progress=False)
    pairs = dpo.load_pairs(pairs_path)
    order = dpo.batch_schedule(len(pairs), setting.batch_size, setting.steps, seed=0)
    policy, tokenizer = lm.load_causal_lm(world.sft_dir)
    return world, pairs_path, pairs, order, policy, tokenizer


def reference_source(world, pairs_path, pairs, mode: str, batch_size: int):
    """The cached log pi_ref of every pair, (N, 2), or the frozen reference model."""
    from accelerate import Accelerator

    from dpo_lab.train import dpo

    reference, _ = world.load_policy("cpu")
    reference.requires_grad_(False)
    if mode == "on-the-fly":
        return reference
    return dpo.cached_reference_logps(world, pairs_path, pairs, reference, Accelerator(cpu=True), batch_size,
                                      progress=False)


def throughput(ends: list[float], setting: Setting) -> float:
    """Pairs per second between the end of step ``warmup`` and the end of the last step."""
    return (setting.steps - setting.warmup) * setting.batch_size / (ends[-1] - ends[setting.warmup - 1])


def run_ours(setting: Setting, mode: str) -> dict:
    import torch
    from accelerate import Accelerator

    from dpo_lab.profiles import OfflineTrainSpec
    from dpo_lab.train.dpo import Objective, OfflineStep

    world, pairs_path, pairs, order, policy, tokenizer = load(setting)
    reference = reference_source(world, pairs_path, pairs, mode, setting.batch_size)
    spec = OfflineTrainSpec(optimizer="adamw", lr=LR, warmup_steps=0, batch_size=setting.batch_size,
                            max_grad_norm=MAX_GRAD_NORM)
    step = OfflineStep.create(Objective("dpo", beta=BETA), pairs, spec, Accelerator(cpu=True), policy, reference,
                              tokenizer.pad_token_id)
    torch.manual_seed(0)
    before, ends, losses = rss_mb(), [], []
    for indices in order:
        losses.append(step(indices)["loss"])
        ends.append(time.perf_counter())
    return {"pairs_per_s": throughput(ends, setting), "loss": sum(losses) / len(losses), "rss_before_mb": before}


def run_bare(setting: Setting, mode: str) -> dict:
    import torch
    import torch.nn.functional as F

    world, pairs_path, pairs, order, policy, tokenizer = load(setting)
    reference = reference_source(world, pairs_path, pairs, mode, setting.batch_size)
    batches = [pairs.batch(indices, tokenizer.pad_token_id) for indices in order]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    policy.eval()

    def summed_logps(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logps * mask).sum(-1)

    torch.manual_seed(0)
    before, ends, losses = rss_mb(), [], []
    for indices, batch in zip(order, batches):
        logps = summed_logps(policy, batch).view(2, -1)
        if mode == "on-the-fly":
            with torch.no_grad():
                ref = summed_logps(reference, batch).view(2, -1)
        else:
            ref = reference[indices].T
        ratios = logps - ref
        loss = -F.logsigmoid(BETA * (ratios[0] - ratios[1])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ends.append(time.perf_counter())
    return {"pairs_per_s": throughput(ends, setting), "loss": sum(losses) / len(losses), "rss_before_mb": before}


def run_trl(setting: Setting, mode: str) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback

    world, pairs_path, pairs, order, policy, tokenizer = load(setting)
    flat = [i for indices in order for i in indices]
    dataset = datasets.Dataset.from_dict({"prompt_ids": [pairs.prompts[i] for i in flat],
                                          "chosen_ids": [pairs.chosen[i] for i in flat],
                                          "rejected_ids": [pairs.rejected[i] for i in flat]})

    class PretokenizedDPOTrainer(trl.DPOTrainer):
        """TRL's DPOTrainer on our token ids (TRL would otherwise re-tokenise decoded text)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.rss_before = [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_before = rss_mb()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=setting.batch_size, gradient_accumulation_steps=1,
            max_steps=setting.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM, beta=BETA, loss_type=["sigmoid"],
            max_length=None, precompute_ref_log_probs=mode == "precomputed", train_sampling_strategy="sequential",
            use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, dataloader_pin_memory=False,
            report_to="none", save_strategy="no", logging_steps=setting.steps, disable_tqdm=True, seed=0)
        trainer = PretokenizedDPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer,
                                         callbacks=[clock])
        result = trainer.train()
    return {"pairs_per_s": throughput(clock.ends, setting), "loss": result.training_loss,
            "rss_before_mb": clock.rss_before, "trl": trl.__version__}


def run_contestant(name: str, mode: str, setting: Setting) -> dict:
    """Run one contestant in this (fresh) process; adds its peak RSS."""
    result = {"bare": run_bare, "ours": run_ours, "trl": run_trl}[name](setting, mode)
    return result | {"peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", help="profile whose world and pairs are used (default tiny)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per optimiser step")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per contestant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each contestant (the best is reported)")
    args = parser.parse_args()
    setting = Setting(args.profile, args.batch_size, args.steps, args.warmup, args.threads)

    import torch

    # build (or find) world, pairs and cached reference log-probs once, outside every measurement
    world, pairs_path, pairs, _, policy, _ = load(setting)
    reference_source(world, pairs_path, pairs, "precomputed", setting.batch_size)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"profile {setting.profile}: {n_params:,}-parameter policy, {len(pairs)} pairs; batch {setting.batch_size}, "
          f"{setting.steps} steps ({setting.warmup} untimed), torch {torch.__version__}, {setting.threads} thread(s), "
          f"load average before: {os.getloadavg()[0]:.2f}")

    results: dict[tuple[str, str], dict] = {}
    spawn = multiprocessing.get_context("spawn")
    for mode in REFERENCE_MODES:
        for name in CONTESTANTS:
            runs = []
            for _ in range(args.repeats):
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    runs.append(pool.submit(run_contestant, name, mode, setting).result())
            results[name, mode] = max(runs, key=lambda r: r["pairs_per_s"])

    trl_version = results["trl", "precomputed"]["trl"]
    print(f"\nTRL {trl_version}; load average after: {os.getloadavg()[0]:.2f}\n")
    print(f"{'reference':<12} {'contestant':<10} {'pairs/s':>9} {'mean loss':>10} {'RSS before MB':>14} "
          f"{'peak RSS MB':>12} {'added MB':>9}")
    for (name, mode), r in results.items():
        print(f"{mode:<12} {name:<10} {r['pairs_per_s']:9.1f} {r['loss']:10.5f} {r['rss_before_mb']:14.0f} "
              f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] - r['rss_before_mb']:9.0f}")
    print()
    for mode in REFERENCE_MODES:
        ours, trl, bare = (results[name, mode]["pairs_per_s"] for name in ("ours", "trl", "bare"))
        print(f"{mode}: ours / TRL throughput = {ours / trl:.2f}x (target >= 1.3); "
              f"ours time / bare time = {bare / ours:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
