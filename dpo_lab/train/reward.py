"""The learned reward model r_phi(x, y), trained with the Bradley-Terry loss (paper Eq. 2).

Given preference triples (x, y_w, y_l) from :mod:`dpo_lab.preferences`, r_phi minimises

    L_R(r_phi, D) = -E_{(x, y_w, y_l) ~ D} [ log sigmoid( r_phi(x, y_w) - r_phi(x, y_l) ) ]     (Eq. 2)

(:func:`dpo_lab.losses.bradley_terry_loss`). PPO (``dpo-lab train ppo``) then maximises it under
the KL penalty of Eq. 3, and best-of-N ranks samples with it.

**Architecture and where the scalar is read.** A transformer trunk (``AutoModel``: the policy's
blocks without its LM head) and a linear head ``n_embd -> 1``, applied to the final hidden state
of the *last real token* of prompt + completion, found from the attention mask (a generated EOS
is a real token and is where the reward is read when present). Why not
``GPT2ForSequenceClassification``: it locates the last token as the last one that is not the pad
id, and with pad = EOS (GPT-2 has no pad token) a completion ending in EOS would be read one token
early, and a left-padded batch would depend on its pad id; with the mask there is no ambiguity.
The trunk is saved with ``save_pretrained`` (safetensors), the head as ``head.safetensors``, the
rest in ``reward_model.json``: no pickle.

**Initialisation.** From pi_SFT's weights when ``RewardSpec.base`` is empty (``tiny``, ``ci``), else
from the hub or local model ``base`` (the paper initialises from GPT-2-large). The trunk always
reads the policy's token ids (PPO calls :meth:`RewardModel.score` on its rollouts), so a ``base``
with another vocabulary is refused before training. The head starts at N(0, 1 / (n_embd + 1)),
as in Ziegler et al. (2019).

**Training.** Chosen and rejected completions of B pairs are concatenated into one batch of 2B
sequences, so one forward pass gives r_w and r_l; AdamW at a constant learning rate, on an
``accelerate.Accelerator``. The validation split is *by prompt*: ``val_fraction`` of the prompt
ids, with all their pairs, are held out, so validation never sees a prompt trained on. Validation
accuracy (share of held-out pairs with r_w > r_l) is measured ``evals_per_epoch`` times per epoch
(and before training), and the weights with the best one are kept (the paper: 3 epochs, best
validation accuracy).

**Centring.** Bradley-Terry identifies r_phi only up to a constant per prompt. The stored model
subtracts the mean raw reward over the distinct pi_SFT samples of the preference data, so
:meth:`RewardModel.score` is about 0 on average on pi_SFT's own completions.

**Report** (``metrics.json``): best validation accuracy, the training accuracy of the same weights
(on as many training pairs as there are validation pairs), and the Spearman rank correlation
between r_phi and the ground truth on fresh pi_SFT samples for the *test* prompts (one each,
never seen in training), plus the history of every evaluation.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedModel

from dpo_lab import lm, pretrained, processes, runtime, sentiment, storage
from dpo_lab.guards import check_step
from dpo_lab.losses import bradley_terry_loss, ordered_share
from dpo_lab.preferences import load_preferences
from dpo_lab.profiles import RewardSpec

TRUNK_DIR = "trunk"
HEAD_FILE = "head.safetensors"
MODEL_CONFIG = "reward_model.json"
METRICS = "metrics.json"
HELDOUT_SEED = 4321
"""Sampling seed of the fresh pi_SFT completions (one per test prompt) for the rank correlation."""
SCORE_BATCH_SIZE = 256
"""Sequences per forward pass when scoring without gradient."""


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index (B,) of the last real token of each row of ``attention_mask`` (B, T), left or right padded."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class RewardModel(nn.Module):
    """r_phi(x, y): trunk hidden state at the last real token, through a linear head, minus ``offset``."""

    def __init__(self, trunk: PreTrainedModel, pad_id: int, offset: float = 0.0):
        """``trunk``: an ``AutoModel`` (hidden states, no LM head); ``pad_id`` fills batches; ``offset`` centres."""
        super().__init__()
        self.trunk = trunk
        hidden = trunk.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=(hidden + 1) ** -0.5)
        nn.init.zeros_(self.head.bias)
        self.pad_id = pad_id
        self.offset = offset

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw (uncentred) rewards (B,) of padded prompt + completion ids (B, T); positions from the mask."""
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=lm.position_ids(attention_mask), use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(attention_mask)]
        return self.head(last).squeeze(-1)

    @torch.no_grad()
    def raw_rewards(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    batch_size: int = SCORE_BATCH_SIZE) -> Tensor:
        """Uncentred rewards (N,), float32 on the CPU, in batches of ``batch_size``, in eval mode."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        rewards = [torch.zeros(0)]
        for start in range(0, len(prompts), batch_size):
            batch = lm.completion_batch(prompts[start:start + batch_size], completions[start:start + batch_size],
                                        self.pad_id)
            rewards.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
        self.train(was_training)
        return torch.cat(rewards)

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              batch_size: int = SCORE_BATCH_SIZE) -> Tensor:
        """Centred rewards r_phi(x, y) - offset (N,), float32 on the CPU, of token-id prompts and completions."""
        return self.raw_rewards(prompts, completions, batch_size) - self.offset

    def save(self, folder: str | os.PathLike, tokenizer) -> None:
        """Write ``trunk/`` (``save_pretrained`` + tokenizer), ``head.safetensors`` and ``reward_model.json``."""
        folder = Path(folder)
        self.trunk.save_pretrained(folder / TRUNK_DIR, safe_serialization=True)
        tokenizer.save_pretrained(folder / TRUNK_DIR)
        with storage.atomic_path(folder / HEAD_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp))
        storage.write_json(folder / MODEL_CONFIG, {"offset": self.offset, "pad_token_id": self.pad_id,
                                                   "read_at": "last real token (attention mask)"})


def load_reward_model(path: str | os.PathLike, device: torch.device | str | None = None) -> RewardModel:
    """The reward model saved in ``path`` (as returned by :func:`train_reward_model`), in eval mode."""
    path = Path(path)
    if not (path / MODEL_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: not a reward model folder (no {MODEL_CONFIG}); "
                                "train one with `dpo-lab reward` or train_reward_model(world, pairs)")
    config = storage.read_json(path / MODEL_CONFIG)
    trunk = AutoModel.from_pretrained(str(path / TRUNK_DIR), dtype=torch.float32, use_safetensors=True)
    model = RewardModel(trunk, config["pad_token_id"], config["offset"])
    model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    return model.to(runtime.pick_device(device)).eval()


def init_reward_model(world, spec: RewardSpec) -> tuple[RewardModel, object]:
    """A fresh r_phi from pi_SFT (``spec.base`` empty) or from ``spec.base``, and the policy's tokenizer."""
    tokenizer = lm.load_tokenizer(world.sft_dir)
    if spec.base and lm.load_tokenizer(spec.base).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"RewardSpec.base={spec.base!r} has another vocabulary than the policy {world.sft_dir}; "
                         "the reward model reads the policy's token ids, so it needs the policy's tokenizer")
    with storage.source(pretrained.resolve(spec.base) if spec.base else world.sft_dir) as name:
        trunk = AutoModel.from_pretrained(name, dtype=torch.float32, use_safetensors=True)
    return RewardModel(trunk, tokenizer.pad_token_id), tokenizer


def split_by_prompt(prompt_ids: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices ``(train, validation)``: a random ``val_fraction`` of the prompts, with all their pairs, validate.

    At least one prompt goes to each side; raises ``ValueError`` if there are fewer than 2 prompts.
    """
    prompts = sorted(set(prompt_ids))
    if len(prompts) < 2:
        raise ValueError(f"a validation split by prompt needs at least 2 prompts, got {len(prompts)}")
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_val = min(max(1, round(val_fraction * len(prompts))), len(prompts) - 1)
    held_out = {prompts[i] for i in order[:n_val]}
    train = [row for row, p in enumerate(prompt_ids) if p not in held_out]
    val = [row for row, p in enumerate(prompt_ids) if p in held_out]
    return train, val


def pair_batch(rows: Sequence[tuple], pad_id: int) -> dict[str, Tensor]:
    """``rows`` of (prompt_ids, chosen_ids, rejected_ids) as one batch of 2B sequences: chosen first, then rejected."""
    prompts, chosen, rejected = zip(*rows)
    batch = lm.completion_batch(prompts + prompts, chosen + rejected, pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pair_accuracy(model: RewardModel, rows: Sequence[tuple], batch_size: int) -> tuple[float, float]:
    """(accuracy, Bradley-Terry loss) over ``rows``: accuracy is the share with r_w > r_l (ties count half)."""
    prompts, chosen, rejected = zip(*rows)
    rewards = model.raw_rewards(prompts + prompts, chosen + rejected, 2 * batch_size)
    r_w, r_l = rewards[:len(rows)], rewards[len(rows):]
    accuracy = ordered_share(r_w, r_l).item()
    return accuracy, bradley_terry_loss(r_w, r_l).item()


def sft_samples(dataset) -> tuple[list[list[int]], list[list[int]]]:
    """The distinct pi_SFT samples (prompt ids, completion ids) behind the pairs, each once."""
    samples: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for row in dataset.select_columns(["prompt_id", "prompt_ids", "chosen_ids", "rejected_ids"]):
        for column in ("chosen_ids", "rejected_ids"):
            samples.setdefault((row["prompt_id"], tuple(row[column])), row["prompt_ids"])
    return list(samples.values()), [list(completion) for _, completion in samples]


def heldout_correlation(world, model: RewardModel, device: torch.device) -> dict:
    """Spearman correlation of r_phi with the ground truth on fresh pi_SFT samples, one per test prompt."""
    policy, tokenizer = world.load_policy(device)
    sampling = world.profile.sampling
    completions = lm.sample_completions(policy, world.test_prompts, max_new_tokens=sampling.max_new_tokens,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                        batch_size=sampling.batch_size, seed=HELDOUT_SEED)
    truth = sentiment.finite_score_ids(world.load_scorer(device), tokenizer, world.test_prompts, completions)
    rewards = model.score(world.test_prompts, completions)
    return {"heldout_spearman": float(spearmanr(truth.numpy(), rewards.numpy()).statistic),
            "heldout_samples": len(completions), "heldout_reward_mean": rewards.mean().item()}


def _fit(model, optimizer, loader, accelerator, val_pairs: Sequence[tuple], spec: RewardSpec,
         progress: bool) -> tuple[dict, list[dict], int]:
    """Minimise Eq. 2 for ``spec.epochs``, validating ``evals_per_epoch`` times per epoch (and before training).

    Returns ``(best, history, steps)``: ``best`` holds the best validation accuracy, its step and
    epoch and a CPU copy of its weights (``state``); ``history`` one record per validation.
    """
    unwrapped = accelerator.unwrap_model(model)
    eval_points = {round(k * len(loader) / spec.evals_per_epoch) for k in range(1, spec.evals_per_epoch + 1)}
    history: list[dict] = []
    best: dict = {"val_accuracy": -1.0}
    running = {"loss": 0.0, "correct": 0.0, "pairs": 0}

    def evaluate(step: int, epoch: float) -> None:
        accuracy, loss = pair_accuracy(unwrapped, val_pairs, spec.batch_size)
        seen = running["pairs"]
        history.append({"step": step, "epoch": epoch, "val_accuracy": accuracy, "val_loss": loss,
                        "train_loss": running["loss"] / seen if seen else None,
                        "train_accuracy_running": running["correct"] / seen if seen else None})
        running.update(loss=0.0, correct=0.0, pairs=0)
        if accuracy > best["val_accuracy"]:
            best.update(val_accuracy=accuracy, step=step, epoch=epoch,
                        state={k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()})

    evaluate(0, 0.0)
    step = 0
    model.train()
    bar = tqdm(total=spec.epochs * len(loader), desc="reward model", disable=not progress)
    for epoch in range(spec.epochs):
        for i, batch in enumerate(loader, start=1):
            r_w, r_l = model(batch["input_ids"], batch["attention_mask"]).float().chunk(2)
            loss = bradley_terry_loss(r_w, r_l)
            accelerator.backward(loss)
            check_step("reward model training", step + 1, "a learning rate (RewardSpec.lr) too high",
                       loss=processes.mean_over_processes(accelerator, {"loss": loss.item()})["loss"])
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            running["loss"] += loss.item() * len(r_w)
            running["correct"] += ordered_share(r_w, r_l).item() * len(r_w)  # a tie counts half, as in validation
            running["pairs"] += len(r_w)
            bar.update()
            if i in eval_points:
                evaluate(step, epoch + i / len(loader))
                bar.set_postfix(val_acc=f"{history[-1]['val_accuracy']:.3f}", best=f"{best['val_accuracy']:.3f}")
    bar.close()
    return best, history, step


def _train(world, pairs_path: Path, folder: Path, device, progress: bool) -> None:
    """Train r_phi on the pairs at ``pairs_path``, keep the best validation accuracy, centre, save, report."""
    spec = world.profile.reward
    progress = progress and processes.is_main_process()
    started = time.time()
    dataset = load_preferences(pairs_path)
    rows = list(zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
    prompt_of_row = list(dataset["prompt_id"])
    train_rows, val_rows = split_by_prompt(prompt_of_row, spec.val_fraction, spec.seed)
    train_pairs, val_pairs = [rows[i] for i in train_rows], [rows[i] for i in val_rows]

    runtime.seed_everything(spec.seed)
    accelerator = runtime.make_accelerator(device, world.profile.mixed_precision)
    processes.check_split(accelerator.num_processes, **{"RewardSpec.batch_size": spec.batch_size})
    model, tokenizer = init_reward_model(world, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    loader = torch.utils.data.DataLoader(train_pairs, batch_size=spec.batch_size, shuffle=True,
                                         collate_fn=functools.partial(pair_batch, pad_id=model.pad_id),
                                         generator=torch.Generator().manual_seed(spec.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    best, history, steps = _fit(model, optimizer, loader, accelerator, val_pairs, spec, progress)
    train_seconds = time.time() - started

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(best.pop("state"))
    unwrapped.eval()
    probe = [train_pairs[i] for i in np.random.default_rng(spec.seed).permutation(len(train_pairs))[:len(val_pairs)]]
    train_accuracy, train_loss = pair_accuracy(unwrapped, probe, spec.batch_size)
    unwrapped.offset = unwrapped.raw_rewards(*sft_samples(dataset)).mean().item()
    if not processes.is_main_process():  # the others built into a scratch folder (storage.cached_artifact)
        return
    unwrapped.save(folder, tokenizer)
    storage.write_json(folder / METRICS, {
        "val_accuracy": best["val_accuracy"], "best_step": best["step"], "best_epoch": best["epoch"],
        "train_accuracy": train_accuracy, "train_loss": train_loss, "train_accuracy_pairs": len(probe),
        **heldout_correlation(world, unwrapped, accelerator.device), "offset": unwrapped.offset,
        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
        "train_prompts": len({prompt_of_row[i] for i in train_rows}),
        "val_prompts": len({prompt_of_row[i] for i in val_rows}),
        "steps": steps, "train_seconds": train_seconds, "seconds": time.time() - started, "history": history,
        "processes": accelerator.num_processes,
    })


def reward_config(world, pairs_path: str | os.PathLike) -> dict:
    """The cache key of a reward model: its spec, precision, the pairs folder and the held-out evaluation."""
    profile = world.profile
    return {"reward": storage.keyed(profile.reward, "base"),
            "mixed_precision": profile.mixed_precision, "pairs": Path(pairs_path).name,
            "heldout": {"seed": HELDOUT_SEED, "sampling": profile.sampling,
                        "test_prompts": storage.fingerprint(world.test_prompts)}}


def train_reward_model(world, pairs_path: str | os.PathLike, device: torch.device | str | None = None,
                       progress: bool = True) -> Path:
    """Train (or find in the cache) r_phi on the preference pairs at ``pairs_path``; returns its folder.

    ``world``: a :class:`dpo_lab.world.World`; ``pairs_path``: a folder from
    :func:`dpo_lab.preferences.build_preferences` (validated before training). Load the result with
    :func:`load_reward_model`; ``metrics.json`` beside it holds the accuracies and the correlation.
    """
    return storage.cached_artifact(world.profile.name, "reward", reward_config(world, pairs_path),
                                   lambda folder: _train(world, Path(pairs_path), folder, device, progress),
                                   collective=True)
