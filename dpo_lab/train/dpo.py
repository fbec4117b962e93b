"""One trainer for pairwise offline objectives: DPO and its variants, Unlikelihood, Preferred-FT, SimPO, ORPO, KTO.

Equations refer to Rafailov et al. 2023 (arXiv 2305.18290); the loss functions themselves are
the pure tensor functions of :mod:`dpo_lab.losses`. For a preference pair (x, y_w, y_l):

- ``dpo`` (Eq. 7): -log sigmoid(beta h) with
  h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x); ``loss_type`` picks a variant
  (``ipo``, ``cdpo``, ``hinge``, ``robust``, see :func:`dpo_lab.losses.dpo_loss`), and names the
  method in the results table (``sigmoid`` is ``dpo``). The implicit rewards
  r_hat(x, y) = beta log pi(y|x)/pi_ref(y|x) (Eq. 5) are logged, with their accuracy and margin,
  and so is the weight sigmoid(r_hat(x, y_l) - r_hat(x, y_w)) that the gradient of Eq. 7 gives
  each pair (Section 4): high where the implicit reward orders the pair wrongly (``dpo_weight``).
- ``unlikelihood``: -log pi(y_w|x) - alpha sum_t log(1 - pi(y_l,t|x, y_l,<t)).
- ``preferred-ft``: -log pi(y_w|x), supervised fine-tuning on the chosen completions only.
- ``simpo``, ``orpo``, ``kto``: the objectives of :func:`dpo_lab.losses.simpo_loss` (reference-free,
  length-normalised, margin ``gamma``), :func:`dpo_lab.losses.orpo_loss` (mean NLL of y_w plus
  ``lam`` times an odds-ratio term, reference-free) and :func:`dpo_lab.losses.kto_loss` (each pair
  read as one desirable and one undesirable completion; see :meth:`Objective.pair_losses`).

The loop, over ``accelerate.Accelerator`` (mixed precision from the profile, gradient accumulation
and data parallelism under ``accelerate launch``):

- data: the pairs of :mod:`dpo_lab.preferences`, as token ids of the policy tokenizer. Step s
  takes ``batch_size`` pairs from a stream of seeded permutations (one per epoch), so the data
  order is a function of the step alone and a resumed run continues at its data position;
- one forward pass per micro-batch: prompts + chosen and prompts + rejected concatenated into
  one right-padded batch (2B, T), labels -100 on prompt and padding, log-probs summed over the
  completion tokens (B,) each (:mod:`dpo_lab.lm`);
- pi_ref = pi_SFT is frozen, so log pi_ref(y|x) of every pair is computed once and cached
  (``reference_logps-*`` folder, safetensors, keyed by pairs, policy and precision);
  ``reference="on-the-fly"`` recomputes it per batch instead (no cache, one extra forward pass);
- no dropout: policy and reference stay in eval mode while training (GPT-2 has no batch norm,
  so eval mode only switches dropout off), so the loss is Eq. 7 of the deterministic policy and
  CPU runs are repeatable;
- AdamW without weight decay (the KL to pi_ref is the regulariser) or RMSprop (the paper's),
  linear warm-up then constant learning rate, gradient norm clipped at ``max_grad_norm``;
- step 0 (pi_SFT), every ``eval_every`` steps and the last step are evaluated with the protocol
  of :mod:`dpo_lab.evaluate`, recorded, then checkpointed (:class:`dpo_lab.runs.Run`): a finished
  run is returned at once, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from dpo_lab import lm, processes, runtime, storage
from dpo_lab.guards import check_finite
from dpo_lab.losses import (
    LOSS_TYPES,
    dpo_loss,
    kto_loss,
    log1mexp,
    ordered_share,
    orpo_loss,
    preferred_ft_loss,
    simpo_loss,
    unlikelihood_loss,
)
from dpo_lab.preferences import load_preferences
from dpo_lab.profiles import OfflineTrainSpec
from dpo_lab.runs import Checkpointer, Run, start_or_resume, training_run

METHODS = ("dpo", "unlikelihood", "preferred-ft", "simpo", "orpo", "kto")
REFERENCE_MODES = ("cached", "on-the-fly")
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass(frozen=True)
class Objective:
    """What a run optimises: the method and its hyperparameters, validated on creation."""

    method: str
    """``dpo``, ``unlikelihood``, ``preferred-ft``, ``simpo``, ``orpo`` or ``kto``."""
    beta: float = 0.1
    """DPO and KTO: the KL coefficient beta of Eq. 3 and 7; SimPO: the reward scale."""
    loss_type: str = "sigmoid"
    """DPO: one of ``dpo_lab.losses.LOSS_TYPES``."""
    label_smoothing: float = 0.0
    """DPO (``cdpo``, ``robust``): the assumed label-flip rate, in [0, 0.5)."""
    alpha: float = 1.0
    """Unlikelihood: weight of the unlikelihood term on the rejected completion."""
    gamma: float = 0.5
    """SimPO: the target reward margin (>= 0)."""
    lam: float = 0.1
    """ORPO: the weight lambda of the odds-ratio term (>= 0)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown offline method {self.method!r}; known: {', '.join(METHODS)}")
        if self.method in ("dpo", "simpo", "kto") and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if self.method == "dpo":
            if self.loss_type not in LOSS_TYPES:
                raise ValueError(f"unknown loss type {self.loss_type!r}; known: {', '.join(LOSS_TYPES)}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name, method in (("alpha", "unlikelihood"), ("gamma", "simpo"), ("lam", "orpo")):
            value = getattr(self, name)
            if self.method == method and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @property
    def name(self) -> str:
        """The method column of the results table: the loss type for DPO variants (``sigmoid`` is ``dpo``)."""
        if self.method == "dpo" and self.loss_type != "sigmoid":
            return self.loss_type
        return self.method

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs log pi_ref (the DPO family and KTO; SimPO and ORPO are reference-free)."""
        return self.method in ("dpo", "kto")

    @property
    def uses_rejected(self) -> bool:
        """Whether the loss reads the rejected completion (all but Preferred-FT)."""
        return self.method != "preferred-ft"

    def settings(self) -> dict[str, float | str]:
        """The hyperparameters this method reads (the others do not enter the run's configuration)."""
        if self.method == "dpo":
            return {"beta": self.beta, "loss_type": self.loss_type, "label_smoothing": self.label_smoothing}
        return {"unlikelihood": {"alpha": self.alpha}, "simpo": {"beta": self.beta, "gamma": self.gamma},
                "orpo": {"lam": self.lam}, "kto": {"beta": self.beta}}.get(self.method, {})

    def hyperparameter(self, seed: int) -> tuple[str, float]:
        """``(name, value)`` of the swept hyperparameter: beta, alpha, lam, or the seed for Preferred-FT."""
        if self.method in ("dpo", "simpo", "kto"):
            return "beta", self.beta
        return {"unlikelihood": ("alpha", self.alpha), "orpo": ("lam", self.lam)}.get(self.method, ("seed", seed))

    def loss(self, token_logps: Tensor, mask: Tensor, reference: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss over a micro-batch of B pairs, and detached statistics.

        ``token_logps``, ``mask``: (2B, T) per-token log-probs of the completions, the B chosen
        rows first, then the B rejected ones ((B, T), chosen only, for Preferred-FT).
        ``reference``: (B, 2) summed log pi_ref of chosen and rejected (the DPO family and KTO, which
        compare with pi_ref; ``None`` for the reference-free objectives).
        """
        sequence = token_logps.sum(-1)
        if not self.uses_rejected:
            losses = preferred_ft_loss(token_logps, mask)
            stats = {"logps/chosen": sequence.mean()}
        else:
            n = sequence.shape[0] // 2
            stats = {"logps/chosen": sequence[:n].mean(), "logps/rejected": sequence[n:].mean()}
            losses, rewards = self.pair_losses(token_logps, mask, reference)
            if rewards is not None:
                reward_w, reward_l = rewards
                stats |= {"rewards/chosen": reward_w.mean(), "rewards/rejected": reward_l.mean(),
                          "rewards/accuracy": ordered_share(reward_w, reward_l),
                          "rewards/margin": (reward_w - reward_l).mean(),
                          "dpo_weight": torch.sigmoid(reward_l - reward_w).mean()}
        loss = losses.mean()
        return loss, {"loss": loss, **stats}

    def pair_losses(self, token_logps: Tensor, mask: Tensor,
                    reference: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(B,) losses of the pairs of :meth:`loss`'s (2B, T) inputs, and the implicit rewards of chosen and
        rejected ((B,) each; ``None`` for Unlikelihood; ORPO's are its per-completion log odds).

        KTO takes each pair as one desirable (y_w) and one undesirable (y_l) example; a pair's loss
        is the mean of the two, and the reference point z0 is the batch's mean log pi / pi_ref over
        its own 2B completions (detached, clamped at 0). That is not the paper's estimate (mismatched
        prompt-completion pairs, one more forward pass): once training pushes the rejected
        log-ratios down, the mean turns negative and the clamp holds z0 at 0, so this is close to
        KTO's z0 = 0 ablation.
        """
        n = token_logps.shape[0] // 2
        sequence, lengths = token_logps.sum(-1), mask.sum(-1)
        chosen, rejected = sequence[:n], sequence[n:]
        if self.method == "unlikelihood":
            return unlikelihood_loss(token_logps[:n], mask[:n], token_logps[n:], mask[n:], self.alpha), None
        if self.method == "simpo":
            losses, reward_w, reward_l = simpo_loss(chosen, lengths[:n], rejected, lengths[n:], self.beta, self.gamma)
            return losses, (reward_w, reward_l)
        if self.method == "orpo":
            losses, _ = orpo_loss(chosen, lengths[:n], rejected, lengths[n:], self.lam)
            means = (sequence / lengths).detach()
            odds = means - log1mexp(means)
            return losses, (odds[:n], odds[n:])
        if self.method == "kto":
            ref = torch.cat([reference[:, 0], reference[:, 1]])
            desirable = torch.arange(2 * n, device=sequence.device) < n
            z0 = (sequence - ref).detach().mean()
            losses, rewards = kto_loss(sequence, ref, desirable, z0, self.beta)
            return losses.view(2, n).mean(0), (rewards[:n], rewards[n:])
        losses, reward_w, reward_l = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta,
                                              self.loss_type, self.label_smoothing)
        return losses, (reward_w, reward_l)


@dataclass(frozen=True)
class Pairs:
    """Preference pairs as token ids of the policy tokenizer."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Sequence[int], pad_id: int, with_rejected: bool = True) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` of the pairs ``indices``, each (2B, T) or (B, T).

        Rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected (omitted without
        ``with_rejected``); right padding; labels -100 on prompt and padding tokens.
        """
        prompts = [self.prompts[i] for i in indices]
        completions = [self.chosen[i] for i in indices]
        if with_rejected:
            prompts, completions = prompts * 2, completions + [self.rejected[i] for i in indices]
        return lm.completion_batch(prompts, completions, pad_id)


def load_pairs(pairs_path: str | Path) -> Pairs:
    """Read the preference pairs at ``pairs_path``, validated by :func:`dpo_lab.preferences.load_preferences`.

    Malformed data (a missing column, an empty completion, chosen == rejected) raises
    :class:`dpo_lab.preferences.PreferenceDataError` naming the column and row, before any training.
    """
    dataset = load_preferences(pairs_path)
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    return Pairs(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"])


def completion_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the labelled completion tokens and their mask, both (N, T-1)."""
    return lm.token_logps(lm.forward_logits(model, batch["input_ids"], batch["attention_mask"]), batch["labels"])


@torch.no_grad()
def reference_pair_logps(reference, batch: dict[str, Tensor]) -> Tensor:
    """Summed log pi_ref of a (2B, T) pair batch, as (B, 2): chosen, rejected."""
    logps, _ = completion_logps(reference, batch)
    return logps.sum(-1).view(2, -1).T


def cached_reference_logps(world, pairs_path: Path, pairs: Pairs, reference, accelerator: Accelerator,
                           batch_size: int, progress: bool) -> Tensor:
    """log pi_ref of chosen and rejected for every pair, (N, 2), computed once and cached as safetensors."""
    pad_id = reference.config.pad_token_id

    def build(folder: Path) -> None:
        starts = range(0, len(pairs), batch_size)
        out = []
        for start in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
            batch = pairs.batch(range(start, min(start + batch_size, len(pairs))), pad_id)
            with accelerator.autocast():
                out.append(reference_pair_logps(reference, {k: v.to(accelerator.device) for k, v in batch.items()}))
        logps = torch.cat(out).float().cpu()
        save_file({"chosen": logps[:, 0].contiguous(), "rejected": logps[:, 1].contiguous()}, folder / REFERENCE_FILE)

    config = {"pairs": storage.cache_name(pairs_path), "policy": storage.cache_name(world.sft_dir),
              "mixed_precision": world.profile.mixed_precision}
    folder = storage.cached_artifact(world.profile.name, "reference_logps", config, build)
    tensors = load_file(folder / REFERENCE_FILE)
    if tensors["chosen"].numel() != len(pairs):
        raise ValueError(f"{folder / REFERENCE_FILE} holds {tensors['chosen'].numel()} pairs, {pairs_path} {len(pairs)}")
    return torch.stack([tensors["chosen"], tensors["rejected"]], dim=1).to(accelerator.device)


def total_steps(spec: OfflineTrainSpec, n_pairs: int) -> int:
    """Optimiser steps: ``epochs`` passes over ``n_pairs`` pairs, capped by ``max_steps`` if set."""
    steps = math.ceil(spec.epochs * n_pairs / spec.batch_size)
    return min(steps, spec.max_steps) if spec.max_steps > 0 else steps


def batch_schedule(n_pairs: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Pair indices of every optimiser step (entry s is step s + 1).

    A stream of permutations of the pairs, one per epoch, drawn from a generator seeded with
    ``seed``, cut into consecutive batches of ``batch_size`` (a batch may span two epochs).
    """
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n_pairs, generator=generator).tolist()
    return [stream[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def micro_batches(indices: list[int], grad_accum: int, accelerator: Accelerator) -> list[list[int]]:
    """This process's ``grad_accum`` micro-batches of one optimiser step's pairs.

    The step's pairs are cut into ``grad_accum * num_processes`` equal parts; process p takes parts
    p, p + P, p + 2P, ... (a single process takes them all, in order).
    """
    parts = grad_accum * accelerator.num_processes
    size = len(indices) // parts
    chunks = [indices[i * size:(i + 1) * size] for i in range(parts)]
    return chunks[accelerator.process_index::accelerator.num_processes]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimiser step ``step + 1``: linear warm-up to 1, then constant."""
    return min(1.0, (step + 1) / (warmup_steps + 1))


def make_optimizer(params, spec: OfflineTrainSpec) -> torch.optim.Optimizer:
    """AdamW without weight decay, or RMSprop (PyTorch defaults otherwise)."""
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    return torch.optim.RMSprop(params, lr=spec.lr)


NON_FINITE_CAUSES = ("a learning rate too high for the model (--lr), an extreme --beta or --alpha, or (at an "
                     "evaluation) a ground-truth scorer that returns NaN")


def check_processes(spec: OfflineTrainSpec, num_processes: int) -> None:
    """Raise ``ValueError`` unless a step's pairs split evenly over micro-batches and processes."""
    if spec.batch_size % (spec.grad_accum * num_processes):
        raise ValueError(f"OfflineTrainSpec.batch_size ({spec.batch_size}) must be a multiple of grad_accum "
                         f"({spec.grad_accum}) times the number of processes ({num_processes})")


class OfflineStep:
    """One optimiser step of the offline trainer, the same for every objective.

    Built by :meth:`create`, which makes the optimiser (``spec.optimizer``) and the warm-up
    schedule and prepares policy and optimiser with ``accelerator``. Calling it with the pair
    indices of one step runs the micro-batches (one forward pass each, chosen and rejected
    concatenated), accumulates their gradients, clips, steps optimiser and schedule, and returns
    the step's metrics: the objective's statistics averaged over micro-batches, ``grad_norm``
    (before clipping), ``lr`` and ``pairs_per_s``.
    """

    def __init__(self, objective: Objective, pairs: Pairs, spec: OfflineTrainSpec, accelerator: Accelerator,
                 policy, optimizer: torch.optim.Optimizer, scheduler, reference: Tensor | torch.nn.Module, pad_id: int):
        self.objective, self.pairs, self.spec, self.accelerator = objective, pairs, spec, accelerator
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.reference, self.pad_id = reference, pad_id

    @classmethod
    def create(cls, objective: Objective, pairs: Pairs, spec: OfflineTrainSpec, accelerator: Accelerator, policy,
               reference: Tensor | torch.nn.Module, pad_id: int) -> OfflineStep:
        """Optimiser and schedule for ``policy``, prepared by ``accelerator``; the policy is put in eval mode.

        ``reference``: the cached log pi_ref of every pair, (N, 2), or the frozen reference model
        (log pi_ref computed on the fly; unused by objectives without a reference).
        """
        optimizer = make_optimizer(policy.parameters(), spec)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, spec.warmup_steps))
        policy, optimizer = accelerator.prepare(policy, optimizer)
        policy.eval()  # no dropout while training: see the module docstring
        return cls(objective, pairs, spec, accelerator, policy, optimizer, scheduler, reference, pad_id)

    def reference_logps(self, indices: list[int], batch: dict[str, Tensor]) -> Tensor | None:
        """(B, 2) log pi_ref of chosen and rejected of the pairs ``indices`` (``None`` if the objective needs none)."""
        if not self.objective.uses_reference:
            return None
        if isinstance(self.reference, Tensor):
            return self.reference[indices]
        return reference_pair_logps(self.reference, batch)

    def __call__(self, indices: list[int]) -> dict[str, float]:
        started = time.perf_counter()
        accelerator, stats = self.accelerator, []
        for micro in micro_batches(indices, self.spec.grad_accum, accelerator):
            with accelerator.accumulate(self.policy):
                batch = self.pairs.batch(micro, self.pad_id, self.objective.uses_rejected)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    logps, mask = completion_logps(self.policy, batch)
                    loss, micro_stats = self.objective.loss(logps, mask, self.reference_logps(micro, batch))
                accelerator.backward(loss)
                stats.append(micro_stats)
        grad_norm = accelerator.clip_grad_norm_(self.policy.parameters(), self.spec.max_grad_norm)
        metrics = {key: torch.stack([s[key].detach() for s in stats]).mean().item() for key in stats[0]}
        metrics = processes.mean_over_processes(accelerator, metrics)  # every process stops on the same step
        check_finite(loss=metrics["loss"], grad_norm=runtime.overflow_checked(accelerator, grad_norm))
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: the scaler skipped an overflowing step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics | {"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                          "pairs_per_s": len(indices) / (time.perf_counter() - started)}

    def state_dict(self) -> dict:
        """Optimiser, schedule and (fp16) gradient-scaler state, for a checkpoint (the RNG state is the checkpointer's)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **runtime.scaler_state(self.accelerator)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        runtime.load_scaler_state(self.accelerator, state)


def offline_run(world, pairs_path: str | Path, objective: Objective, spec: OfflineTrainSpec, reference: str) -> Run:
    """The :class:`~dpo_lab.runs.Run` folder of one offline configuration."""
    return training_run(world, objective.name, objective.hyperparameter(spec.seed), spec.seed, **objective.settings(),
                        offline=spec, reference=reference, pairs=storage.cache_name(pairs_path),
                        ground_truth=world.ground_truth_key,
                        prompts=storage.fingerprint(world.test_prompts))


def offline_step(world, pairs_path: str | Path, pairs: Pairs, objective: Objective, spec: OfflineTrainSpec,
                 reference: str, accelerator: Accelerator, policy_dir: Path, progress: bool):
    """``(step, tokenizer, reference model)``: the policy from ``policy_dir``, pi_ref and the :class:`OfflineStep`."""
    policy, tokenizer = lm.load_causal_lm(policy_dir, accelerator.device)
    ref_model, _ = world.load_policy(accelerator.device)
    ref_model.requires_grad_(False)
    ref_source = ref_model
    if objective.uses_reference and reference == "cached":
        ref_source = cached_reference_logps(world, Path(pairs_path), pairs, ref_model, accelerator, spec.batch_size,
                                            progress)
    step = OfflineStep.create(objective, pairs, spec, accelerator, policy, ref_source, tokenizer.pad_token_id)
    return step, tokenizer, ref_model


def train_offline(world, pairs_path: str | Path, method: str, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, alpha: float = 1.0, gamma: float = 0.5, lam: float = 0.1,
                  seed: int | None = None,
                  overrides: OfflineTrainSpec | None = None, reference: str = "cached",
                  device: torch.device | str | None = None, progress: bool = True) -> Run:
    """Train (or resume, or find finished) one offline run and return its :class:`~dpo_lab.runs.Run`.

    ``world``: a :class:`dpo_lab.world.World`; ``pairs_path``: a folder of
    :func:`dpo_lab.preferences.build_preferences`. ``method``: ``dpo`` (with ``beta``, ``loss_type``,
    ``label_smoothing``), ``unlikelihood`` (with ``alpha``), ``preferred-ft``, ``kto`` (with ``beta``),
    ``simpo`` (with ``beta`` and ``gamma``) or ``orpo`` (with ``lam``); a method ignores the
    hyperparameters it does not name. ``overrides`` replaces the profile's ``OfflineTrainSpec``;
    ``seed`` (default: the spec's) replaces its seed. ``reference``: ``cached`` or ``on-the-fly``
    log pi_ref. The run's evaluations are ``run.evaluations()``, its step metrics ``run.metrics()``.
    Malformed preference data raises :class:`dpo_lab.preferences.PreferenceDataError` before training.
    """
    objective = Objective(method, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, alpha=alpha,
                          gamma=gamma, lam=lam)
    progress = progress and processes.is_main_process()
    spec = overrides or world.profile.offline
    spec = spec if seed is None else dataclasses.replace(spec, seed=seed)
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
    run = offline_run(world, pairs_path, objective, spec, reference)
    with run.exclusive():
        if run.finished:
            return run
        resume = run.resume_point()
        pairs = load_pairs(pairs_path)
        accelerator = runtime.make_accelerator(device, world.profile.mixed_precision, spec.grad_accum)
        check_processes(spec, accelerator.num_processes)
        train_step, tokenizer, ref_model = offline_step(world, pairs_path, pairs, objective, spec, reference,
                                                        accelerator, resume[0] if resume else world.sft_dir, progress)
        scorer = world.load_scorer(accelerator.device)
        if resume:
            train_step.load_state_dict(resume[1])
        done, seconds = start_or_resume(run, resume, spec.seed, accelerator.device)
        checkpoint = Checkpointer(run, world, ref_model, tokenizer, scorer, total_steps(spec, len(pairs)), accelerator)
        offline_loop(train_step, checkpoint, done, seconds, progress)
    return run


def offline_loop(train_step: OfflineStep, checkpoint: Checkpointer, done: int, seconds: float, progress: bool) -> None:
    """Steps ``done + 1`` to the last: train, log, and checkpoint (step 0 first for a fresh run); then finish."""
    run, accelerator, spec = checkpoint.run, train_step.accelerator, train_step.spec
    policy = accelerator.unwrap_model(train_step.policy)
    steps = checkpoint.last_step
    if done == 0:
        checkpoint(0, policy, seconds, train_step.state_dict)
    schedule = batch_schedule(len(train_step.pairs), spec.batch_size, steps, spec.seed)
    name, value = run.columns["hyperparameter_name"], run.columns["hyperparameter"]
    bar = tqdm(range(done + 1, steps + 1), initial=done, total=steps, disable=not progress,
               desc=f"{run.method} {name}={value:g}")
    for step in bar:
        started = time.perf_counter()
        with run.stopped_on_non_finite(f"step {step}", NON_FINITE_CAUSES):
            metrics = train_step(schedule[step - 1])
            seconds += time.perf_counter() - started
            run.log_metrics(step, metrics)
            postfix = {"loss": f"{metrics['loss']:.3f}"}
            if "rewards/accuracy" in metrics:
                postfix["acc"] = f"{metrics['rewards/accuracy']:.2f}"
            bar.set_postfix(postfix, refresh=False)
            if step % spec.eval_every == 0 or step == steps:
                checkpoint(step, policy, seconds, train_step.state_dict)
    run.finish(policy, checkpoint.tokenizer)
    run.log(f"finished after {seconds:.0f} s of training")
