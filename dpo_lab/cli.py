"""The ``dpo-lab`` command line: one subcommand per pipeline stage.

Each subcommand parses its options from dataclasses with ``transformers.HfArgumentParser`` (every
option documented by its field's docstring-style ``help``) and calls the same library function a
notebook calls. Subcommands are imported lazily, so ``dpo-lab --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from dpo_lab.profiles import get_profile, profile_table


@dataclass
class CommonArgs:
    """Options every subcommand takes."""

    profile: str | None = field(default=None, metadata={
        "help": "Profile name (ci, tiny, gpt2, paper); default: $DPO_LAB_PROFILE or tiny."})
    device: str | None = field(default=None, metadata={
        "help": "Device override (cpu, cuda, cuda:1, mps); default: CUDA, then MPS, then CPU."})


def parse(prog: str, argv: list[str], *dataclass_types):
    """Parse ``argv`` into ``CommonArgs`` plus the given dataclasses; unknown options are errors."""
    parser = HfArgumentParser((CommonArgs, *dataclass_types), prog=prog)
    return parser.parse_args_into_dataclasses(args=argv)


def run_profiles(argv: list[str]) -> None:
    """Print every profile as a table."""
    (common,) = parse("dpo-lab profiles", argv)
    if common.profile:
        get_profile(common.profile)
    print(profile_table())


# method -> (one-line help, "module:function" taking argv), for ``dpo-lab train <method>``.
TRAIN_METHODS: dict[str, tuple[str, str]] = {
    "dpo": ("Direct Preference Optimization (Eq. 7) and its variants (--loss-type)", "dpo_lab.train.dpo:run_dpo"),
    "unlikelihood": ("the Unlikelihood baseline (--alpha)", "dpo_lab.train.dpo:run_unlikelihood"),
    "preferred-ft": ("supervised fine-tuning on the chosen completions", "dpo_lab.train.dpo:run_preferred_ft"),
    "ppo": ("PPO against the learned reward model (--target-kl)", "dpo_lab.train.ppo:run_ppo"),
    "ppo-gt": ("PPO against the ground-truth classifier (--target-kl)", "dpo_lab.train.ppo:run_ppo_gt"),
}


def run_train(argv: list[str]) -> None:
    """Dispatch ``dpo-lab train <method> ...`` to the method's trainer."""
    if not argv or argv[0] in ("-h", "--help"):
        print(listing("usage: dpo-lab train <method> [--profile NAME] [options]", "methods", TRAIN_METHODS))
        return
    if argv[0] not in TRAIN_METHODS:
        raise ValueError(f"unknown training method {argv[0]!r}; known: {', '.join(TRAIN_METHODS)}")
    call(TRAIN_METHODS[argv[0]][1], argv[1:])


# name -> (one-line help, "module:function" taking argv). Later stages register themselves here.
COMMANDS: dict[str, tuple[str, str]] = {
    "profiles": ("print the scale profiles (ci, tiny, gpt2, paper) as a table", "dpo_lab.cli:run_profiles"),
    "prepare": ("build the corpus, prompts, SFT policy and ground-truth scorer", "dpo_lab.world:run_prepare"),
    "preferences": ("sample pi_SFT, score with the ground truth, write the preference pairs",
                    "dpo_lab.preferences:run_preferences"),
    "reward": ("train the reward model r_phi on the preference pairs (Bradley-Terry, Eq. 2)",
               "dpo_lab.train.reward:run_reward"),
    "train": ("train a policy: dpo, unlikelihood, preferred-ft, ppo, ppo-gt", "dpo_lab.cli:run_train"),
    "best-of-n": ("best-of-N sampling from pi_SFT: ground-truth reward and KL per N (--n, --scorer)",
                  "dpo_lab.best_of_n:run_best_of_n"),
    "frontier": ("the main job: every method of Figure 2 (left), evaluated, tabled and plotted",
                 "dpo_lab.frontier:run_frontier"),
    "figures": ("redraw every figure from the committed results tables (no training)", "dpo_lab.frontier:run_figures"),
}


def listing(title: str, heading: str, entries: dict[str, tuple[str, str]]) -> str:
    """A help block: a title line, then one line per entry with its help text."""
    width = max(len(name) for name in entries)
    return "\n".join([title, "", f"{heading}:"] + [f"  {n.ljust(width)}  {h}" for n, (h, _) in entries.items()])


def call(target: str, argv: list[str]) -> None:
    """Import ``module:function`` lazily and call it with ``argv``."""
    module_name, func_name = target.split(":")
    getattr(importlib.import_module(module_name), func_name)(argv)


def usage() -> str:
    """Top-level help text listing the subcommands."""
    title = ("usage: dpo-lab <command> [--profile NAME] [options]\n\n"
             "From Bradley-Terry to DPO on the IMDb controlled-sentiment task (Rafailov et al. 2023).\n"
             "Run `dpo-lab <command> --help` for a command's options.")
    return listing(title, "commands", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpo-lab`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dpo-lab: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        call(COMMANDS[name][1], rest)
    except ValueError as err:
        print(f"dpo-lab {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
