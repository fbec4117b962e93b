"""One trainer for pairwise offline objectives: DPO and its variants, Unlikelihood, Preferred-FT.

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

import ast
import dataclasses
import inspect
import math
import textwrap
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from dpo_lab import lm, runtime, storage
from dpo_lab.evaluate import evaluate_policy
from dpo_lab.losses import LOSS_TYPES, dpo_loss, preferred_ft_loss, unlikelihood_loss
from dpo_lab.preferences import load_preferences
from dpo_lab.profiles import OfflineTrainSpec, get_profile
from dpo_lab.runs import Run

METHODS = ("dpo", "unlikelihood", "preferred-ft")
OPTIMIZERS = ("adamw", "rmsprop")
REFERENCE_MODES = ("cached", "on-the-fly")
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass(frozen=True)
class Objective:
    """What a run optimises: the method and its hyperparameters, validated on creation."""

    method: str
    """``dpo``, ``unlikelihood`` or ``preferred-ft``."""
    beta: float = 0.1
    """DPO: the KL coefficient beta of Eq. 3 and 7."""
    loss_type: str = "sigmoid"
    """DPO: one of ``dpo_lab.losses.LOSS_TYPES``."""
    label_smoothing: float = 0.0
    """DPO (``cdpo``, ``robust``): the assumed label-flip rate, in [0, 0.5)."""
    alpha: float = 1.0
    """Unlikelihood: weight of the unlikelihood term on the rejected completion."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown offline method {self.method!r}; known: {', '.join(METHODS)}")
        if self.method == "dpo":
            if self.loss_type not in LOSS_TYPES:
                raise ValueError(f"unknown loss type {self.loss_type!r}; known: {', '.join(LOSS_TYPES)}")
            if not self.beta > 0:
                raise ValueError(f"beta must be > 0, got {self.beta}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.method == "unlikelihood" and not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")

    @property
    def name(self) -> str:
        """The method column of the results table: the loss type for DPO variants (``sigmoid`` is ``dpo``)."""
        if self.method == "dpo" and self.loss_type != "sigmoid":
            return self.loss_type
        return self.method

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs log pi_ref (only the DPO family)."""
        return self.method == "dpo"

    @property
    def uses_rejected(self) -> bool:
        """Whether the loss reads the rejected completion (all but Preferred-FT)."""
        return self.method != "preferred-ft"

    def settings(self) -> dict[str, float | str]:
        """The hyperparameters this method reads (the others do not enter the run's configuration)."""
        if self.method == "dpo":
            return {"beta": self.beta, "loss_type": self.loss_type, "label_smoothing": self.label_smoothing}
        return {"alpha": self.alpha} if self.method == "unlikelihood" else {}

    def hyperparameter(self, seed: int) -> tuple[str, float]:
        """``(name, value)`` of the swept hyperparameter: beta, alpha, or the seed for Preferred-FT."""
        if self.method == "dpo":
            return "beta", self.beta
        return ("alpha", self.alpha) if self.method == "unlikelihood" else ("seed", seed)

    def loss(self, token_logps: Tensor, mask: Tensor, reference: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss over a micro-batch of B pairs, and detached statistics.

        ``token_logps``, ``mask``: (2B, T) per-token log-probs of the completions, the B chosen
        rows first, then the B rejected ones ((B, T), chosen only, for Preferred-FT).
        ``reference``: (B, 2) summed log pi_ref of chosen and rejected (DPO only, else ``None``).
        """
        sequence = token_logps.sum(-1)
        if not self.uses_rejected:
            losses = preferred_ft_loss(token_logps, mask)
            stats = {"logps/chosen": sequence.mean()}
        else:
            n = sequence.shape[0] // 2
            chosen, rejected = sequence[:n], sequence[n:]
            stats = {"logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
            if self.method == "unlikelihood":
                losses = unlikelihood_loss(token_logps[:n], mask[:n], token_logps[n:], mask[n:], self.alpha)
            else:
                losses, reward_w, reward_l = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta,
                                                      self.loss_type, self.label_smoothing)
                stats |= {"rewards/chosen": reward_w.mean(), "rewards/rejected": reward_l.mean(),
                          "rewards/accuracy": (reward_w > reward_l).float().mean(),
                          "rewards/margin": (reward_w - reward_l).mean(),
                          "dpo_weight": torch.sigmoid(reward_l - reward_w).mean()}
        loss = losses.mean()
        return loss, {"loss": loss, **stats}


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
    with accelerator.main_process_first():
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


def check_spec(spec: OfflineTrainSpec, num_processes: int = 1) -> OfflineTrainSpec:
    """Return ``spec`` or raise ``ValueError`` naming the first bad setting."""
    problems = [
        (spec.optimizer not in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {spec.optimizer!r}"),
        (not spec.lr > 0, f"lr must be > 0, got {spec.lr}"),
        (spec.warmup_steps < 0, f"warmup_steps must be >= 0, got {spec.warmup_steps}"),
        (spec.grad_accum < 1, f"grad_accum must be >= 1, got {spec.grad_accum}"),
        (spec.batch_size < 1 or spec.batch_size % (spec.grad_accum * num_processes),
         f"batch_size ({spec.batch_size}) must be a positive multiple of grad_accum ({spec.grad_accum}) "
         f"times the number of processes ({num_processes})"),
        (not (spec.epochs > 0 or spec.max_steps > 0), "set epochs > 0 or max_steps > 0"),
        (not spec.max_grad_norm > 0, f"max_grad_norm must be > 0, got {spec.max_grad_norm}"),
        (spec.eval_every < 1, f"eval_every must be >= 1, got {spec.eval_every}"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    return spec


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
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {key: torch.stack([s[key].detach() for s in stats]).mean().item() for key in stats[0]}
        return metrics | {"grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                          "pairs_per_s": len(indices) / (time.perf_counter() - started)}

    def state_dict(self) -> dict:
        """Optimiser, schedule and RNG state, for a checkpoint."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state()}
        if self.accelerator.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.accelerator.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.accelerator.device)


def train_offline(world, pairs_path: str | Path, method: str, *, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, alpha: float = 1.0, seed: int | None = None,
                  overrides: OfflineTrainSpec | None = None, reference: str = "cached",
                  device: torch.device | str | None = None, progress: bool = True) -> Run:
    """Train (or resume, or find finished) one offline run and return its :class:`~dpo_lab.runs.Run`.

    ``world``: a :class:`dpo_lab.world.World`; ``pairs_path``: a folder of
    :func:`dpo_lab.preferences.build_preferences`. ``method``: ``dpo`` (with ``beta``, ``loss_type``,
    ``label_smoothing``), ``unlikelihood`` (with ``alpha``) or ``preferred-ft``; the other
    hyperparameters are ignored. ``overrides`` replaces the profile's ``OfflineTrainSpec``;
    ``seed`` (default: the spec's) replaces its seed. ``reference``: ``cached`` or ``on-the-fly``
    log pi_ref. The run's evaluations are ``run.evaluations()``, its step metrics ``run.metrics()``.
    Malformed preference data raises :class:`dpo_lab.preferences.PreferenceDataError` before training.
    """
    profile = world.profile
    objective = Objective(method, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, alpha=alpha)
    spec = overrides or profile.offline
    spec = check_spec(spec if seed is None else dataclasses.replace(spec, seed=seed))
    if reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
    hyperparameter_name, hyperparameter = objective.hyperparameter(spec.seed)
    config = {"profile": profile.name, "method": objective.name, **objective.settings(), "seed": spec.seed,
              "offline": spec, "reference": reference, "sampling": profile.sampling, "evaluation": profile.evaluation,
              "mixed_precision": profile.mixed_precision, "policy": storage.cache_name(world.sft_dir),
              "pairs": storage.cache_name(pairs_path), "ground_truth": storage.cache_name(world.ground_truth),
              "prompts": storage.fingerprint(world.test_prompts)}
    label = f"seed{spec.seed}" if hyperparameter_name == "seed" else f"{hyperparameter_name}{hyperparameter:g}-seed{spec.seed}"
    run = Run(profile.name, objective.name, label, config)
    if run.finished:
        return run
    pairs = load_pairs(pairs_path)

    device = runtime.pick_device(device)
    accelerator = Accelerator(mixed_precision=profile.mixed_precision, cpu=device.type == "cpu",
                              gradient_accumulation_steps=spec.grad_accum)
    check_spec(spec, accelerator.num_processes)
    resume = run.latest_checkpoint()
    policy, tokenizer = lm.load_causal_lm(resume[0] if resume else world.sft_dir, accelerator.device)
    ref_model, _ = world.load_policy(accelerator.device)
    ref_model.requires_grad_(False)
    scorer = world.load_scorer(accelerator.device)
    ref_source = ref_model
    if objective.uses_reference and reference == "cached":
        ref_source = cached_reference_logps(world, Path(pairs_path), pairs, ref_model, accelerator, spec.batch_size,
                                            progress)
    train_step = OfflineStep.create(objective, pairs, spec, accelerator, policy, ref_source, tokenizer.pad_token_id)
    unwrapped = accelerator.unwrap_model(train_step.policy)
    steps = total_steps(spec, len(pairs))
    if resume:
        train_step.load_state_dict(resume[1])
        first, train_seconds = resume[1]["step"], resume[1]["wall_s"]
    else:
        runtime.seed_everything(spec.seed)
        first, train_seconds = 0, 0.0

    def checkpoint(step: int) -> None:
        """Evaluate, record the row, then (unless it is the last step) save the checkpoint."""
        if accelerator.is_main_process:
            evaluation = evaluate_policy(unwrapped, ref_model, tokenizer, scorer, world.test_prompts,
                                         max_new_tokens=profile.sampling.max_new_tokens,
                                         seed=profile.evaluation.seed, batch_size=profile.evaluation.batch_size)
            run.add_evaluation({"profile": profile.name, "run_id": run.run_id, "method": objective.name,
                                "hyperparameter_name": hyperparameter_name, "hyperparameter": hyperparameter,
                                "seed": spec.seed, "step": step, **evaluation.row(), "wall_s": train_seconds})
            if step < steps:
                run.save_checkpoint(step, unwrapped, tokenizer, {**train_step.state_dict(), "wall_s": train_seconds})
        accelerator.wait_for_everyone()

    if first == 0:
        checkpoint(0)
    schedule = batch_schedule(len(pairs), spec.batch_size, steps, spec.seed)
    bar = tqdm(range(first + 1, steps + 1), initial=first, total=steps, disable=not progress,
               desc=f"{objective.name} {hyperparameter_name}={hyperparameter:g}")
    for step in bar:
        started = time.perf_counter()
        metrics = train_step(schedule[step - 1])
        train_seconds += time.perf_counter() - started
        if accelerator.is_main_process:
            run.log_metrics(step, metrics)
        postfix = {"loss": f"{metrics['loss']:.3f}"}
        if "rewards/accuracy" in metrics:
            postfix["acc"] = f"{metrics['rewards/accuracy']:.2f}"
        bar.set_postfix(postfix, refresh=False)
        if step % spec.eval_every == 0 or step == steps:
            checkpoint(step)
    if accelerator.is_main_process:
        run.finish(unwrapped, tokenizer)
    accelerator.wait_for_everyone()
    return run


# ----------------------------------------------------------------------------------------------
# Command line: ``dpo-lab train dpo | unlikelihood | preferred-ft``
# ----------------------------------------------------------------------------------------------


@dataclass
class DPOArgs:
    """Options of ``dpo-lab train dpo``."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient beta (the paper sweeps 0.05, 0.1, 1, 5)."})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "sigmoid (DPO, Eq. 7), ipo, cdpo, hinge or robust.", "choices": LOSS_TYPES})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Assumed label-flip rate in [0, 0.5) of cdpo and robust."})


@dataclass
class UnlikelihoodArgs:
    """Options of ``dpo-lab train unlikelihood``."""

    alpha: float = field(default=1.0, metadata={
        "help": "Weight of the unlikelihood term (the paper sweeps 0.05, 0.1, 0.5, 1)."})


@dataclass
class ReferenceArgs:
    """How log pi_ref is obtained."""

    reference: str = field(default="cached", metadata={
        "help": "cached: computed once per preference dataset; on-the-fly: recomputed every batch.",
        "choices": REFERENCE_MODES})


def _attribute_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {node.target.id: doc.value.value for node, doc in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}


def _override_args(spec_type: type) -> type:
    """A dataclass with every field of ``spec_type`` as an optional CLI option, default None (the profile's)."""
    docs = _attribute_docs(spec_type)
    fields = [(name, typ | None, field(default=None, metadata={"help": f"{docs.get(name, '')} Default: the profile's."}))
              for name, typ in typing.get_type_hints(spec_type).items()]
    return dataclasses.make_dataclass(f"{spec_type.__name__}Overrides", fields)


OfflineOverrides = _override_args(OfflineTrainSpec)
"""``--lr``, ``--batch-size``, ``--optimizer``, ... : overrides of the profile's ``OfflineTrainSpec``."""


def apply_overrides(spec: OfflineTrainSpec, overrides) -> OfflineTrainSpec:
    """``spec`` with the fields set (not None) in ``overrides`` replaced, validated."""
    changed = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    return check_spec(dataclasses.replace(spec, **changed))


def run_cli(prog: str, method: str, argv: list[str], *method_args: type) -> Run:
    """Parse ``argv``, build what is missing upstream (world, preferences), train, print the evaluations."""
    from dpo_lab.cli import parse
    from dpo_lab.frontier import Pipeline

    common, *parsed = parse(prog, argv, *method_args, ReferenceArgs, OfflineOverrides)
    *hyper, reference, overrides = parsed
    options = {k: v for args in hyper for k, v in dataclasses.asdict(args).items()}
    Objective(method, **options)  # bad hyperparameters fail before any long work
    profile = get_profile(common.profile)
    spec = apply_overrides(profile.offline, overrides)
    pipeline = Pipeline(profile, device=common.device)
    run = train_offline(pipeline.world, pipeline.pairs, method, **options, overrides=spec,
                        reference=reference.reference, device=common.device)
    print(f"{run.run_id}: {run.path}")
    print(run.evaluations()[["step", "reward", "reward_se", "kl", "kl_se", "length", "wall_s"]].to_string(index=False))
    return run


def run_dpo(argv: list[str]) -> None:
    """``dpo-lab train dpo --beta B [--loss-type T]``: DPO (Eq. 7) or a variant."""
    run_cli("dpo-lab train dpo", "dpo", argv, DPOArgs)


def run_unlikelihood(argv: list[str]) -> None:
    """``dpo-lab train unlikelihood --alpha A``: the Unlikelihood baseline."""
    run_cli("dpo-lab train unlikelihood", "unlikelihood", argv, UnlikelihoodArgs)


def run_preferred_ft(argv: list[str]) -> None:
    """``dpo-lab train preferred-ft [--seed S]``: fine-tuning on the chosen completions."""
    run_cli("dpo-lab train preferred-ft", "preferred-ft", argv)
