"""Every exercise checker accepts the reference solution (read from the solution notebooks, so the
two cannot drift apart), rejects wrong answers with a hint, and says "not written yet" for a stub."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpo_lab import exercises

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHECKERS = sorted(name for name in dir(exercises) if name.startswith("check_"))


def _tagged_cells(path: Path, tag: str) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and tag in c["metadata"].get("tags", [])]


def _checked_name(source: str, checker: str) -> str | None:
    """The name passed to ``checker(...)`` in ``source``, if the cell calls it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == checker:
            return node.args[0].id
    return None


def _solution(checker: str):
    """The learner-facing function the solution notebooks pass to ``checker``, defined by its cell."""
    for path in sorted((NOTEBOOKS / "solutions").glob("[0-9][0-9]_*.ipynb")):
        for source in _tagged_cells(path, "solution"):
            name = _checked_name(source, checker)
            if name:
                namespace: dict = {}
                definitions = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom,
                                                                                   ast.FunctionDef))]
                exec(compile(ast.Module(definitions, []), path.name, "exec"), namespace)
                return namespace[name]
    raise AssertionError(f"no solution cell calls {checker}")


def test_there_is_a_checker_for_every_notebook():
    assert len(CHECKERS) >= 6


@pytest.mark.parametrize("checker", CHECKERS)
def test_every_checker_is_an_exercise_in_a_main_notebook(checker):
    calls = [s for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") for s in _tagged_cells(p, "exercise")
             if _checked_name(s, checker)]
    assert len(calls) == 1, f"{checker} is used by {len(calls)} exercise cells"
    assert "raise NotImplementedError" in calls[0]


@pytest.mark.parametrize("checker", CHECKERS)
def test_checker_accepts_the_reference_solution(checker, capsys):
    assert getattr(exercises, checker)(_solution(checker)) is True
    assert capsys.readouterr().out.startswith("✓")


@pytest.mark.parametrize("checker", CHECKERS)
def test_checker_says_not_written_yet_for_a_stub(checker, capsys):
    def stub(*args):
        raise NotImplementedError

    assert getattr(exercises, checker)(stub) is False
    assert exercises.NOT_WRITTEN in capsys.readouterr().out


def _pl_without_tail(scores, ranking):
    ordered = scores[list(ranking)]
    return (ordered - torch.logsumexp(ordered, 0)).sum()  # normalises over all items at every position


def _pairs_keeping_ties(scores):
    return [(i, j) if scores[i] >= scores[j] else (j, i) for i in range(len(scores)) for j in range(i + 1, len(scores))]


def _unnormalised_optimum(ref_probs, rewards, beta):
    return ref_probs * torch.exp(rewards / beta)  # forgets Z(x)


def _gae_forward(rewards, values, gamma, lam):
    advantages, running = torch.zeros_like(rewards), 0.0
    for t in range(len(rewards)):  # the wrong direction
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def _ipo_as_dpo(chosen, rejected, ref_chosen, ref_rejected, beta):
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def _frontier_without_sorting(kl, reward):
    best, keep = -np.inf, []
    for i, r in enumerate(reward):
        if r > best:
            keep.append(i)
            best = r
    return keep


def _baseline_includes_itself(rewards):
    return rewards - rewards.mean(-1, keepdim=True)  # the plain mean keeps sample i in its own baseline


def _k3_wrong_direction(logprobs, ref_logprobs):
    log_ratio = logprobs - ref_logprobs  # pi / pi_ref instead of pi_ref / pi
    return torch.expm1(log_ratio) - log_ratio


WRONG = {"check_plackett_luce": _pl_without_tail, "check_preference_pairs": _pairs_keeping_ties,
         "check_optimal_policy": _unnormalised_optimum, "check_gae": _gae_forward, "check_ipo_loss": _ipo_as_dpo,
         "check_pareto_frontier": _frontier_without_sorting, "check_rloo_advantages": _baseline_includes_itself,
         "check_k3_kl": _k3_wrong_direction}


@pytest.mark.parametrize("checker", CHECKERS)
def test_checker_rejects_a_plausible_mistake_with_a_hint(checker, capsys):
    assert checker in WRONG, f"add a plausible wrong answer for {checker}"
    assert getattr(exercises, checker)(WRONG[checker]) is False
    out = capsys.readouterr().out
    assert out.startswith("✗") and "hint:" in out and "expected" in out


def test_a_crashing_answer_is_reported_not_raised(capsys):
    assert exercises.check_gae(lambda *args: 1 / 0) is False
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_an_answer_that_writes_into_its_inputs_is_judged_on_what_it_returns(capsys):
    right = _solution("check_gae")

    def right_but_in_place(rewards, values, gamma, lam):
        rewards.copy_(right(rewards.clone(), values, gamma, lam))  # a correct answer that reuses its input
        return rewards

    def zeroes_its_reference(logprobs, ref_logprobs):
        ref_logprobs.copy_(logprobs)  # would make the expected k3 zero if the checker reused the case
        return torch.zeros_like(logprobs)

    assert exercises.check_gae(right_but_in_place) is True
    assert exercises.check_k3_kl(zeroes_its_reference) is False
    assert capsys.readouterr().out.count("✗") == 1
