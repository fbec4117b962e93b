"""The method registry: the one place that names each method of the frontier.

A :class:`Method` says everything the rest of the package needs to know about a method:

- its name (the ``method`` column of the results table and the ``dpo-lab train <name>`` command),
  a one-line summary, and how it is plotted (legend label, colour, marker);
- its family: ``paper`` (Figure 2's methods: the first panel and the default sweep), ``offline`` or
  ``online`` (the methods since the paper: the second panel, swept with ``--methods modern`` or ``all``);
- the hyperparameter it sweeps and that hyperparameter's values per profile (``sweep_values``,
  read from the profile's ``SweepSpec``); a method with no values in a profile is not swept there;
- the function that trains one run, ``train(pipeline, request) -> rows``: it receives the
  :class:`~dpo_lab.pipeline.Pipeline` (world, pairs, reward model, each built on first access)
  and a :class:`RunRequest`, and returns the run's evaluation rows (results-table columns);
- which profile section ``dpo-lab train`` can override field by field (``spec_section``), and
  extra command-line options (``options``, a dataclass).

:mod:`dpo_lab.frontier` builds the sweep from the registry, :mod:`dpo_lab.cli` the ``train``
subcommands and their options, :mod:`dpo_lab.plots` the legend. Adding a method is one
:func:`register` call plus its training function (the README shows one).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dpo_lab.best_of_n import best_of_n
from dpo_lab.pipeline import Pipeline
from dpo_lab.profiles import Profile
from dpo_lab.train.dpo import REFERENCE_MODES, Objective, train_offline
from dpo_lab.train.online import check_method, train_online
from dpo_lab.train.ppo import KLController, train_ppo


@dataclass(frozen=True)
class RunRequest:
    """One run of a method."""

    value: float | None
    """The swept hyperparameter's value (``None``: the method's default behaviour)."""
    seed: int = 0
    """Seed of the run (for methods that sweep the seed, equal to ``value``)."""
    spec: Any = None
    """The method's profile section with command-line overrides applied; ``None``: the profile's."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's extra options (its ``options`` dataclass, as a dict)."""
    device: str | None = None
    progress: bool = True


TrainFn = Callable[[Pipeline, RunRequest], pd.DataFrame]


@dataclass(frozen=True)
class Method:
    """A registry entry: see the module docstring."""

    name: str
    """Method column of the results table; ``dpo-lab train <name>``."""
    summary: str
    """One line for ``--help``."""
    label: str
    """Legend label."""
    colour: str
    """Matplotlib colour."""
    marker: str
    """Matplotlib marker."""
    hyperparameter: str
    """Name of the swept hyperparameter (``seed`` when only the seed varies)."""
    sweep_values: Callable[[Profile], Sequence[float]]
    """The hyperparameter's values in a profile's sweep (empty: not swept)."""
    train: TrainFn
    """Trains (or finds finished) one run and returns its evaluation rows."""
    default: float | None = None
    """The hyperparameter's value when ``dpo-lab train`` is not given one."""
    check: Callable[[float | None], Any] | None = None
    """Raises ``ValueError`` for a bad hyperparameter value, before anything is loaded."""
    spec_section: str | None = None
    """The ``Profile`` section whose fields ``dpo-lab train <name>`` can override."""
    options: type | None = None
    """A dataclass of extra ``dpo-lab train`` options, passed to ``train`` as ``request.options``."""
    curve: bool = False
    """All values form one run, drawn in order of the hyperparameter (Best-of-N); no ``train`` command."""
    relative_cost: float = 1.0
    """Rough run time against one DPO run on the CPU profiles: a parallel sweep starts the longest runs first."""
    needs: str = "pairs"
    """The last upstream artifact its runs read (a :class:`~dpo_lab.pipeline.Pipeline` attribute: ``world``,
    ``pairs`` or ``reward_model``), built before a parallel sweep starts its jobs."""
    family: str = "paper"
    """``paper`` (Figure 2, left), ``offline`` or ``online`` (the methods since the paper): see :data:`GROUPS`."""
    oracle: bool = False
    """Trained on the ground truth itself (PPO-GT and the ``-gt`` variants): a reference no real task can run."""

    def default_options(self) -> dict[str, Any]:
        """Its ``options`` dataclass at its defaults, as a dict (what a sweep run uses)."""
        return dataclasses.asdict(self.options()) if self.options else {}


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (replacing an entry of the same name) and return it."""
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None


GROUPS = {"paper": ("paper",), "modern": ("offline", "online"), "all": ("paper", "offline", "online")}
"""Names ``--methods`` accepts for a whole group of families; ``paper`` is the default sweep."""


def swept_methods(profile: Profile, group: str = "paper") -> list[str]:
    """The registered methods of ``group`` (:data:`GROUPS`) with values in ``profile``'s sweep, in registry order."""
    families = GROUPS[group]
    return [name for name, method in REGISTRY.items() if method.family in families and method.sweep_values(profile)]


def expand_methods(names: Sequence[str], profile: Profile) -> list[str]:
    """Method names with each group name (``paper``, ``modern``, ``all``) replaced by its swept methods."""
    expanded: list[str] = []
    for name in names:
        expanded += swept_methods(profile, name) if name in GROUPS else [name]
    return list(dict.fromkeys(expanded))


def family(name: str) -> str:
    """The family of a method name; a name not in the registry (a user's own method) counts as ``paper``."""
    return REGISTRY[name].family if name in REGISTRY else "paper"


def group_rows(table: pd.DataFrame, group: str) -> pd.DataFrame:
    """The rows of a results table whose method belongs to ``group`` (``paper``, ``modern`` or ``all``)."""
    return table[table["method"].map(lambda name: family(name) in GROUPS[group]).astype(bool)]


def is_curve(name: str) -> bool:
    """Whether ``name`` is a registered method whose runs form one curve (Best-of-N)."""
    return name in REGISTRY and REGISTRY[name].curve


def style(name: str) -> tuple[str, str, str]:
    """(label, colour, marker) of a method; a name not in the registry gets a neutral style."""
    method = REGISTRY.get(name)
    return (method.label, method.colour, method.marker) if method else (name, "black", "x")


# ----------------------------------------------------------------------------------------------
# The paper's methods (Figure 2, left), the DPO variants, and Best-of-N
# ----------------------------------------------------------------------------------------------


@dataclass
class OfflineOptions:
    """Options of the DPO family."""

    label_smoothing: float = field(default=0.0, metadata={
        "help": "Assumed label-flip rate in [0, 0.5) of cdpo and robust."})
    reference: str = field(default="cached", metadata={
        "help": "cached: log pi_ref computed once per preference dataset; on-the-fly: recomputed every batch.",
        "choices": REFERENCE_MODES})


@dataclass
class SimPOOptions:
    """Options of SimPO."""

    gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin (>= 0)."})


def offline_trainer(method: str, loss_type: str = "sigmoid") -> TrainFn:
    """The training function of an offline method: :func:`dpo_lab.train.dpo.train_offline` on the pairs."""
    def train(pipeline: Pipeline, request: RunRequest) -> pd.DataFrame:
        knob = {"dpo": {"beta": request.value, "loss_type": loss_type}, "unlikelihood": {"alpha": request.value},
                "preferred-ft": {}, "simpo": {"beta": request.value}, "orpo": {"lam": request.value},
                "kto": {"beta": request.value}}[method]
        run = train_offline(pipeline.world, pipeline.pairs, method, **knob, **request.options, seed=request.seed,
                            overrides=request.spec, device=request.device, progress=request.progress)
        return run.evaluations()
    return train


def ppo_trainer(use_ground_truth: bool) -> TrainFn:
    """The training function of PPO (learned reward) or PPO-GT (ground truth)."""
    def train(pipeline: Pipeline, request: RunRequest) -> pd.DataFrame:
        spec = request.spec or pipeline.profile.ppo
        KLController(spec.init_kl_coef, request.value, spec.adaptive_kl_horizon)  # fails before the world is built
        run = train_ppo(pipeline.world, target_kl=request.value, use_ground_truth=use_ground_truth,
                        reward_model_path=None if use_ground_truth else pipeline.reward_model, seed=request.seed,
                        overrides=request.spec, device=request.device, progress=request.progress)
        return run.evaluations()
    return train


def online_trainer(method: str, use_ground_truth: bool) -> TrainFn:
    """The training function of RLOO, GRPO or online DPO, with r_phi or (``-gt``) the ground truth."""
    def train(pipeline: Pipeline, request: RunRequest) -> pd.DataFrame:
        run = train_online(pipeline.world, method, beta=request.value, use_ground_truth=use_ground_truth,
                           reward_model_path=None if use_ground_truth else pipeline.reward_model, seed=request.seed,
                           overrides=request.spec, device=request.device, progress=request.progress)
        return run.evaluations()
    return train


def train_best_of_n(pipeline: Pipeline, request: RunRequest) -> pd.DataFrame:
    """Best-of-N from pi_SFT, selected by r_phi, for every N of the profile's sweep (one run)."""
    return best_of_n(pipeline.world, pipeline.reward_model, ns=pipeline.profile.sweep.best_of_n,
                     device=request.device, progress=request.progress)


def check_beta(beta: float | None) -> None:
    """Raise ``ValueError`` unless beta is a finite number > 0."""
    Objective("dpo", beta=beta)


def check_target_kl(target_kl: float) -> None:
    """Raise ``ValueError`` unless the PPO target KL is a finite number > 0 (before any loading)."""
    KLController(1.0, target_kl)


register(Method("dpo", "Direct Preference Optimization (Eq. 7)", "DPO", "tab:red", "o", "beta",
                lambda p: p.sweep.dpo_betas, offline_trainer("dpo"), default=0.1, check=check_beta,
                spec_section="offline", options=OfflineOptions))
register(Method("ppo", "PPO against the learned reward model (--target-kl)", "PPO", "tab:blue", "s", "target_kl",
                lambda p: p.sweep.ppo_target_kls, ppo_trainer(False), check=check_target_kl,
                spec_section="ppo", needs="reward_model", relative_cost=4.0))
register(Method("ppo-gt", "PPO against the ground-truth classifier (--target-kl)", "PPO-GT", "tab:green", "s",
                "target_kl", lambda p: p.sweep.ppo_target_kls, ppo_trainer(True),
                check=check_target_kl, spec_section="ppo", needs="world", relative_cost=4.0, oracle=True))
register(Method("unlikelihood", "the Unlikelihood baseline (--alpha)", "Unlikelihood", "tab:orange", "^", "alpha",
                lambda p: p.sweep.unlikelihood_alphas, offline_trainer("unlikelihood"), default=1.0,
                check=lambda v: Objective("unlikelihood", alpha=v), spec_section="offline"))
register(Method("preferred-ft", "supervised fine-tuning on the chosen completions", "Preferred-FT", "tab:brown", "v",
                "seed", lambda p: p.sweep.preferred_ft_seeds, offline_trainer("preferred-ft"), spec_section="offline"))
register(Method("best-of-n", "best-of-N sampling from pi_SFT, selected by r_phi", "Best of N", "tab:gray", "D", "n",
                lambda p: (float(max(p.sweep.best_of_n)),), train_best_of_n, curve=True, needs="reward_model",
                relative_cost=8.0))


# ----------------------------------------------------------------------------------------------
# Methods since the paper: offline (the DPO variants, SimPO, ORPO, KTO) and online (RLOO, GRPO,
# online DPO). Their values come from the profile's SweepSpec; ``--methods modern`` sweeps them.
# ----------------------------------------------------------------------------------------------


@dataclass
class NoisyLabelOptions(OfflineOptions):
    """Options of cDPO and rDPO: as DPO's, with a label-flip rate that makes them differ from DPO."""

    label_smoothing: float = field(default=0.1, metadata={
        "help": "Assumed label-flip rate in [0, 0.5) (0 would make the loss DPO's)."})


for variant, label, colour, options in (("ipo", "IPO", "tab:pink", OfflineOptions),
                                        ("cdpo", "cDPO", "tab:purple", NoisyLabelOptions),
                                        ("hinge", "SLiC (hinge)", "tab:olive", OfflineOptions),
                                        ("robust", "rDPO", "tab:cyan", NoisyLabelOptions)):
    register(dataclasses.replace(REGISTRY["dpo"], name=variant, summary=f"the {label} variant of DPO (--beta)",
                                 label=label, colour=colour, sweep_values=lambda p: p.sweep.dpo_variant_betas,
                                 train=offline_trainer("dpo", loss_type=variant), options=options, family="offline"))
register(Method("simpo", "SimPO: reference-free, length-normalised, with a target margin (--beta, --gamma)", "SimPO",
                "darkred", "P", "beta", lambda p: p.sweep.simpo_betas, offline_trainer("simpo"), default=2.0,
                check=lambda v: Objective("simpo", beta=v), spec_section="offline", options=SimPOOptions,
                family="offline", relative_cost=0.8))
register(Method("orpo", "ORPO: SFT on y_w plus an odds-ratio term, reference-free (--lam)", "ORPO", "goldenrod", "X",
                "lam", lambda p: p.sweep.orpo_lams, offline_trainer("orpo"), default=0.1,
                check=lambda v: Objective("orpo", lam=v), spec_section="offline", family="offline",
                relative_cost=0.8))
register(Method("kto", "KTO: each pair as one desirable and one undesirable completion (--beta)", "KTO", "teal", "h",
                "beta", lambda p: p.sweep.kto_betas, offline_trainer("kto"), default=0.1,
                check=lambda v: Objective("kto", beta=v), spec_section="offline", family="offline"))

ONLINE_SWEEPS = {"rloo": "rloo_betas", "grpo": "grpo_betas", "online-dpo": "online_dpo_betas"}
"""The ``SweepSpec`` field holding each online method's betas (its ``-gt`` variant sweeps the same)."""

for online, label, colour, default in (("rloo", "RLOO", "slateblue", 0.1), ("grpo", "GRPO", "darkcyan", 0.05),
                                       ("online-dpo", "online DPO", "crimson", 0.1)):
    for gt in (False, True):
        register(Method(online + ("-gt" if gt else ""), f"{label} against the {'ground truth' if gt else 'learned reward'} "
                        "(--beta: its KL knob)", label + ("-GT" if gt else ""), colour, "*" if gt else "p", "beta",
                        functools.partial(lambda field_name, p: getattr(p.sweep, field_name), ONLINE_SWEEPS[online]),
                        online_trainer(online, gt), default=default,
                        check=functools.partial(check_method, online), spec_section="online",
                        needs="world" if gt else "reward_model", relative_cost=2.0, family="online", oracle=gt))
