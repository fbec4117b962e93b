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


# name -> (one-line help, "module:function" taking argv). Later stages register themselves here.
COMMANDS: dict[str, tuple[str, str]] = {
    "profiles": ("print the scale profiles (ci, tiny, gpt2, paper) as a table", "dpo_lab.cli:run_profiles"),
}


def usage() -> str:
    """Top-level help text listing the subcommands."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: dpo-lab <command> [--profile NAME] [options]",
        "",
        "From Bradley-Terry to DPO on the IMDb controlled-sentiment task (Rafailov et al. 2023).",
        "Run `dpo-lab <command> --help` for a command's options.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {text}" for name, (text, _) in COMMANDS.items()]
    return "\n".join(lines)


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
    module_name, func_name = COMMANDS[name][1].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        handler(rest)
    except ValueError as err:
        print(f"dpo-lab {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
