"""Profiles: registry, lookup by name or environment, clear errors, and a printable table."""

import dataclasses
import typing

import pytest

from dpo_lab.cli import main
from dpo_lab.profiles import PROFILES, Profile, get_profile, profile_table


def test_registry_holds_the_five_profiles():
    assert list(PROFILES) == ["ci", "tiny", "smol", "gpt2", "paper"]
    assert all(isinstance(p, Profile) and p.name == name for name, p in PROFILES.items())


def test_default_is_tiny_and_env_var_overrides(monkeypatch):
    monkeypatch.delenv("DPO_LAB_PROFILE", raising=False)
    assert get_profile().name == "tiny"
    monkeypatch.setenv("DPO_LAB_PROFILE", "ci")
    assert get_profile().name == "ci"
    assert get_profile("paper").name == "paper"


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'nope'.*ci, tiny, smol, gpt2, paper"):
        get_profile("nope")


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("tiny").mixed_precision = "bf16"


def test_paper_profile_uses_the_papers_settings():
    paper = get_profile("paper")
    assert paper.policy.base == "gpt2-large"
    assert paper.ground_truth.model == "siebert/sentiment-roberta-large-english"
    assert (paper.offline.optimizer, paper.offline.lr, paper.offline.batch_size,
            paper.offline.warmup_steps) == ("rmsprop", 1e-6, 64, 150)
    assert paper.sweep.dpo_betas == (0.05, 0.1, 1.0, 5.0)
    assert paper.preferences.samples_per_prompt == 4
    assert (paper.prompts.min_tokens, paper.prompts.max_tokens) == (2, 8)


def test_every_field_is_documented():
    """Each spec field carries a docstring in the source (the CLI and README rely on them)."""
    import inspect

    from dpo_lab import profiles

    source = inspect.getsource(profiles)
    for spec in (profiles.CorpusSpec, profiles.PromptSpec, profiles.PolicySpec, profiles.OfflineTrainSpec,
                 profiles.PPOSpec, profiles.SweepSpec):
        for f in dataclasses.fields(spec):
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
            after = source.split(line, 1)[1].lstrip()
            assert after.startswith('"""'), f"{spec.__name__}.{f.name} has no docstring"


def test_table_and_cli(capsys):
    table = profile_table()
    for name, profile in PROFILES.items():
        assert f"{name}: {profile.description}" in table
        assert profile.needs and profile.runs_on, f"profile {name} does not say what it needs and where it runs"
        assert f"  needs:   {profile.needs}" in table and f"  runs on: {profile.runs_on}" in table
    assert main(["profiles"]) == 0
    assert "gpt2-large" in capsys.readouterr().out
    assert main(["profiles", "--profile", "nope"]) == 2
    assert "known profiles" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "profiles" in out and "commands:" in out
    assert main(["no-such-command"]) == 2
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help over lines
    assert all(name in out and name in help_text for name in PROFILES), "a profile missing from the CLI's help"


def test_every_numeric_knob_has_a_rule():
    """Every int, float or tuple field of every profile section is validated (finiteness and range) on creation."""
    for section in typing.get_type_hints(Profile).values():
        if not dataclasses.is_dataclass(section):
            continue
        hints = typing.get_type_hints(section)
        numeric = [f.name for f in dataclasses.fields(section)
                   if hints[f.name] in (int, float) or typing.get_origin(hints[f.name]) is tuple]
        assert numeric and set(numeric) <= set(section.RULES), (section.__name__, set(numeric) - set(section.RULES))
        for name in numeric:
            bad = (float("nan"),) if typing.get_origin(hints[name]) is tuple else float("nan")
            with pytest.raises(ValueError, match=f"{section.__name__}.{name} must be"):
                section(**{name: bad})


def test_threads_come_from_the_profile_and_the_command_line_overrides_them(monkeypatch):
    from dpo_lab.cli import CommonArgs, profile_of

    monkeypatch.delenv("DPO_LAB_THREADS", raising=False)

    assert get_profile("ci").threads == 1
    assert profile_of(CommonArgs(profile="ci")).threads == 1
    assert profile_of(CommonArgs(profile="ci", threads=2)).threads == 2
    with pytest.raises(ValueError, match="threads"):
        profile_of(CommonArgs(profile="ci", threads=-1))


def test_threads_env_var_reaches_the_notebooks_and_is_checked(monkeypatch):
    monkeypatch.setenv("DPO_LAB_THREADS", "2")
    assert get_profile("ci").threads == 2 and get_profile("tiny").threads == 2
    monkeypatch.setenv("DPO_LAB_THREADS", "two")
    with pytest.raises(ValueError, match="DPO_LAB_THREADS"):
        get_profile("ci")


def test_use_threads_sets_torch_and_zero_keeps_it():
    import torch

    from dpo_lab.runtime import use_threads

    before = torch.get_num_threads()
    try:
        use_threads(2)
        assert torch.get_num_threads() == 2
        use_threads(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
