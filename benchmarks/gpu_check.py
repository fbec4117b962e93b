"""A GPU check: one DPO step and one PPO iteration of the `gpt2` and `paper` architectures, timed.

    python benchmarks/gpu_check.py                 # on a GPU: gpt2 (124M) and gpt2-large (774M), bf16/fp16
    python benchmarks/gpu_check.py --smoke         # anywhere: a 2-layer model at batch 4 (checks the script)

The models are GPT-2 architectures built from configs written here with random weights: speed does
not depend on the weights, and the hub is not needed. Each size runs the package's own code at the
profile's shapes (prompts of 8 tokens, completions of 48, the paper's 64 pairs per DPO step, the
`paper` profile's PPO rollout of 1024 samples, minibatches of 64, 4 epochs):

- DPO step: :class:`dpo_lab.train.dpo.OfflineStep` on 64 random pairs (one (128, 56) forward and
  backward pass, Eq. 7, AdamW), after one warm-up step;
- PPO iteration: sampling with the KV cache, the teacher-forced pass with the exact KL
  (:func:`dpo_lab.train.ppo.teacher_forced`), GAE, and :func:`dpo_lab.train.ppo.optimise`, with
  random scores standing in for the reward model.

It prints step time, tokens per second, peak memory and the model-FLOPs utilisation against the
GPU's peak dense bf16/fp16 rate (6 N FLOPs per trained token, 2 N per forward-only token, N the
non-embedding parameters; ``--peak-tflops`` where the GPU is not in the table). It takes a few
minutes on one GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lab import lm, runtime
from dpo_lab.losses import gae_advantages, masked_whiten
from dpo_lab.profiles import PAPER, OfflineTrainSpec
from dpo_lab.train.dpo import Objective, OfflineStep, Pairs
from dpo_lab.train.ppo import PolicyWithValue, Rollout, optimise, rollout_batch, teacher_forced

SIZES = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12), "paper": dict(n_layer=36, n_embd=1280, n_head=20),
         "smoke": dict(n_layer=2, n_embd=64, n_head=2)}
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "RTX 4090": 165,
               "RTX 3090": 71, "V100": 125, "T4": 65}
"""Dense bf16 (fp16 on GPUs without bf16) tensor-core peaks, TFLOP/s, by a name fragment of the GPU."""
VOCAB, PROMPT, COMPLETION = 50257, 8, 48


def model_of(size: str, device: torch.device) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        pad_token_id=0, eos_token_id=VOCAB - 1, **SIZES[size])
    return GPT2LMHeadModel(config).to(device)


def flop_parameters(model) -> int:
    """N of the 6 N / 2 N estimate: the parameters a token passes through (position embeddings excluded)."""
    return sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def dpo_step(size: str, pairs: int, precision: str, device: torch.device) -> tuple[float, int, int]:
    """(seconds, tokens, N) of one DPO step on ``pairs`` random pairs, after a warm-up step."""
    policy = model_of(size, device)
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, VOCAB - 1, (pairs, n), generator=generator).tolist()  # noqa: E731
    data = Pairs(ids(PROMPT), ids(COMPLETION), ids(COMPLETION))
    accelerator = runtime.make_accelerator(device, precision)
    spec = OfflineTrainSpec(batch_size=pairs, warmup_steps=0)
    reference = torch.zeros(pairs, 2, device=device) - COMPLETION * 10.0
    step = OfflineStep.create(Objective("dpo", beta=0.1), data, spec, accelerator, policy, reference, pad_id=0)
    step(list(range(pairs)))
    seconds = timed(lambda: step(list(range(pairs))), device)
    return seconds, 2 * pairs * (PROMPT + COMPLETION), flop_parameters(policy)


def ppo_iteration(size: str, rollout: int, minibatch: int, precision: str, device: torch.device) -> dict[str, float]:
    """Seconds of generation, teacher-forced pass and optimisation of one PPO iteration, and the tokens of each."""
    accelerator = runtime.make_accelerator(device, precision)
    model = PolicyWithValue(model_of(size, device)).to(device)
    reference = model_of(size, device).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    spec = PAPER.ppo.__class__(rollout_size=rollout, minibatch_size=minibatch)
    prompts = torch.randint(1, VOCAB - 1, (rollout, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    out: dict[str, float] = {}

    def generate():
        with accelerator.autocast():
            out["completions"] = lm.sample_completions(accelerator.unwrap_model(model).policy, prompts,
                                                       max_new_tokens=COMPLETION, eos_id=VOCAB - 1, pad_id=0,
                                                       batch_size=256)
    out["generation_s"] = timed(generate, device)
    batch = {k: v.to(device) for k, v in rollout_batch(prompts, out["completions"], 0).items()}

    def forward():
        with accelerator.autocast():
            out["tf"] = teacher_forced(model, reference, batch, PROMPT, minibatch)
    out["teacher_forced_s"] = timed(forward, device)
    tf = out.pop("tf")
    rewards = torch.zeros_like(tf["logprobs"])
    rewards[:, -1] = torch.randn(rollout, device=device)
    advantages, returns = gae_advantages(rewards, tf["values"], tf["mask"], gamma=1.0, lam=0.95)
    data = Rollout(batch=batch, start=PROMPT, mask=tf["mask"], logprobs=tf["logprobs"], values=tf["values"],
                   advantages=masked_whiten(advantages, tf["mask"]), returns=returns)
    out["optimisation_s"] = timed(lambda: optimise(model, optimizer, data, spec, accelerator), device)
    out["generated_tokens"] = float(sum(map(len, out.pop("completions"))))
    out["trained_tokens"] = float(spec.ppo_epochs * rollout * (PROMPT + COMPLETION))
    out["N"] = float(flop_parameters(accelerator.unwrap_model(model).policy))
    return out


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_TFLOPS.items() if fragment in name), None)


def report(size: str, precision: str, device: torch.device, peak: float | None, smoke: bool) -> None:
    pairs, rollout, minibatch = (4, 8, 4) if smoke else (64, PAPER.ppo.rollout_size, PAPER.ppo.minibatch_size)
    mfu = (lambda flops, s: f"{100 * flops / s / (peak * 1e12):.1f}%") if peak else (lambda flops, s: "-")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, tokens, n = dpo_step(size, pairs, precision, device)
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    print(f"{size:>6} DPO step ({pairs} pairs, {2 * pairs}x{PROMPT + COMPLETION} tokens): {seconds:.3f} s, "
          f"{tokens / seconds:,.0f} tokens/s, peak memory {memory}, MFU {mfu(6 * n * tokens, seconds)}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = ppo_iteration(size, rollout, minibatch, precision, device)
    total = t["generation_s"] + t["teacher_forced_s"] + t["optimisation_s"]
    flops = 2 * t["N"] * (t["generated_tokens"] + 2 * rollout * (PROMPT + COMPLETION)) + 6 * t["N"] * t["trained_tokens"]
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    print(f"{size:>6} PPO iteration ({rollout} samples): {total:.1f} s = generation {t['generation_s']:.1f} s "
          f"({t['generated_tokens'] / t['generation_s']:,.0f} tokens/s) + teacher-forced {t['teacher_forced_s']:.1f} s "
          f"+ optimisation {t['optimisation_s']:.1f} s; peak memory {memory}, MFU {mfu(flops, total)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model at tiny batches (any device)")
    parser.add_argument("--device", default=None, help="default: CUDA if available, else the CPU")
    parser.add_argument("--precision", default="auto", help="auto (bf16 where supported, else fp16), no, fp16, bf16")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(args.precision, device)
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, precision {precision}, peak {peak or '?'} TFLOP/s, torch {torch.__version__}")
    for size in (["smoke"] if args.smoke else ["gpt2", "paper"]):
        report(size, precision, device, peak, args.smoke)


if __name__ == "__main__":
    main()
