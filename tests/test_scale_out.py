"""Scale-out on the CPU: data-parallel training over 2 processes (gloo), and the fp16 fallback forced on the CPU.

The launches use the shipped ``configs/accelerate/multi_gpu.yaml`` with ``--num_processes 2``: on a
machine without GPUs it starts 2 CPU processes through torchrun (``--cpu`` would start one). Each launch inherits the test
session's environment (its cache, the CPU, one thread), so it reuses the `ci` world built here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.state import AcceleratorState

from dpo_lab import runtime, storage
from dpo_lab.preferences import build_preferences
from dpo_lab.train import dpo
from dpo_lab.train.dpo import Objective, load_pairs, train_offline
from dpo_lab.train.ppo import ppo_run

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LOSS_TOLERANCE = 1e-5
"""Per-step DPO losses of 2 processes and of 1 process agree to this (float32 sums in another order)."""


def launch(*cli_args: str) -> subprocess.CompletedProcess:
    """``dpo-lab <cli_args>`` on 2 CPU processes; fails the test with the launch's stderr if it fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_gpu.yaml"),
               "--num_processes", "2", "--main_process_port", str(port), "-m", "dpo_lab.cli", *cli_args,
               "--profile", "ci"]
    env = {**os.environ, "DPO_LAB_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def two_process_twin(run_path: Path) -> Path:
    """The finished 2-process run of the same configuration as the one-process run at ``run_path``."""
    config = storage.read_json(run_path / "config.json")
    for folder in run_path.parent.iterdir():
        twin = storage.read_json(folder / "config.json") if (folder / "DONE").exists() else {}
        if twin.pop("processes", None) == 2 and twin == config:
            return folder
    raise AssertionError(f"no finished 2-process run beside {run_path}")


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name, machines", [("multi_gpu.yaml", 1), ("multi_node.yaml", 2)])
def test_shipped_accelerate_configs_are_multi_gpu_launches(name, machines):
    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    assert config.distributed_type == "MULTI_GPU" and config.num_machines == machines and not config.use_cpu


@pytest.fixture(scope="module")
def pairs(ci_world):
    return build_preferences(ci_world, progress=False)


def test_dpo_on_two_processes_matches_one_process(ci_world, pairs):
    steps = 20
    result = launch("train", "dpo", "--beta", "0.1", "--max-steps", str(steps), "--eval-every", str(steps))
    assert result.stdout.count("dpo/beta0.1") == 1  # one process prints
    spec = dataclasses.replace(ci_world.profile.offline, max_steps=steps, eval_every=steps)
    single = train_offline(ci_world, pairs, "dpo", beta=0.1, overrides=spec, progress=False)
    one, two = metrics(single.path), metrics(two_process_twin(single.path))  # two folders, one configuration
    assert [m["step"] for m in two] == list(range(1, steps + 1))  # one writer: each step logged once
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < LOSS_TOLERANCE
    assert max(abs(a["rewards/accuracy"] - b["rewards/accuracy"]) for a, b in zip(one, two)) < LOSS_TOLERANCE
    assert one[-1]["loss"] < one[0]["loss"] - 0.01  # the runs compared did learn
    rows_one, rows_two = single.evaluations(), pd.read_csv(two_process_twin(single.path) / "evaluations.csv")
    assert list(rows_one["step"]) == list(rows_two["step"]) == [0, steps]
    for column in ("reward", "kl", "length"):  # evaluated by the main process: the same policy, the same samples
        assert np.allclose(rows_one[column], rows_two[column], atol=1e-6), column


def test_ppo_on_two_processes_raises_reward_with_one_kl_coefficient(ci_world):
    launch("train", "ppo-gt", "--target-kl", "4", "--iterations", "12", "--eval-every", "12")
    spec = dataclasses.replace(ci_world.profile.ppo, iterations=12, eval_every=12)
    folder = two_process_twin(ppo_run(ci_world, target_kl=4.0, use_ground_truth=True, reward_model_path=None, seed=0,
                                      spec=spec).path)
    rows = pd.read_csv(folder / "evaluations.csv")
    first, last = rows.iloc[0], rows.iloc[-1]
    assert last["reward"] > first["reward"] + 2 * last["reward_se"]
    logged = metrics(folder)
    assert [m["step"] for m in logged] == list(range(1, 13))
    assert all(m["kl_coef_spread"] == 0.0 for m in logged)  # the ranks' coefficients, gathered every iteration
    assert logged[-1]["kl_coef"] != ci_world.profile.ppo.init_kl_coef  # the controller did move it


@pytest.mark.parametrize("requested, cuda, bf16, expected", [
    ("auto", False, False, "no"), ("auto", True, True, "bf16"), ("auto", True, False, "fp16"),
    ("no", True, True, "no"), ("fp16", True, True, "fp16"), ("bf16", True, True, "bf16")])
def test_precision_is_bf16_where_supported_else_fp16(monkeypatch, requested, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    device = torch.device("cuda" if cuda else "cpu")
    assert runtime.resolve_precision(requested, device) == expected


def test_bf16_on_a_gpu_without_it_names_the_way_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 has no bf16; use --precision fp16"):
        runtime.resolve_precision("bf16", torch.device("cuda"))
    with pytest.raises(ValueError, match="must be one of"):
        runtime.resolve_precision("fp8", torch.device("cpu"))


@pytest.fixture()
def fp16_on_the_cpu():
    """An fp16 Accelerator with a gradient scaler on the CPU: what ``auto`` gives on a GPU without bf16.

    accelerate itself runs fp16 on the CPU as full precision, so the scaler and fp16 autocast are
    switched on by hand; every trainer code path after that (scaled backward, unscale and clip,
    skipped steps) is accelerate's own.
    """
    AcceleratorState._reset_state()
    accelerator = runtime.make_accelerator("cpu", "fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # the first steps overflow
    accelerator.native_amp = True
    yield accelerator
    AcceleratorState._reset_state()


def test_fp16_with_gradient_scaling_skips_overflow_and_trains(ci_world, pairs, fp16_on_the_cpu):
    accelerator = fp16_on_the_cpu
    spec = dataclasses.replace(ci_world.profile.offline, warmup_steps=0)
    step, _, _ = dpo.offline_step(ci_world, pairs, load_pairs(pairs), Objective("dpo", beta=0.1), spec, "cached",
                                  accelerator, ci_world.sft_dir, progress=False)
    with accelerator.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    before = [p.detach().clone() for p in step.policy.parameters()]
    first = step(list(range(32)))  # scale 2^100 overflows: the scaler skips the step, no NonFiniteError
    assert all(torch.equal(a, b) for a, b in zip(before, step.policy.parameters()))
    assert accelerator.scaler.get_scale() < 2.0 ** 100
    while accelerator.optimizer_step_was_skipped:
        step(list(range(32)))
    assert not all(torch.equal(a, b) for a, b in zip(before, step.policy.parameters()))
    assert abs(first["loss"] - 0.6931) < 0.01  # log 2: pi = pi_ref at the start, computed in fp16
