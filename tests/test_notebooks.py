"""The notebooks and the package cannot drift apart: every dpo_lab name a notebook imports exists,
and every committed notebook is executed, error-free, and follows the series' conventions."""

import ast
import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

from dpo_lab.exercises import NOT_WRITTEN

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = NOTEBOOK_DIR / "solutions"


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _printed(cells: list[dict]) -> str:
    """Everything the cells wrote to stdout or stderr (a stream's text is a string or a list of lines)."""
    return "".join("".join(o.get("text", "")) for c in cells for o in c["outputs"])


def _dpo_lab_imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) for every `from dpo_lab... import name` and (module, None) for `import dpo_lab...`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpo_lab":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "dpo_lab"]
    return found


def test_the_series_is_complete_and_ordered():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_imported_dpo_lab_name_exists(path):
    imports = [imp for cell in _code_cells(path) for imp in _dpo_lab_imports("".join(cell["source"]))]
    assert imports, f"{path.name} imports nothing from dpo_lab"
    for module_name, name in imports:
        module = importlib.import_module(module_name)
        if name is not None:
            assert hasattr(module, name) or importlib.util.find_spec(f"{module_name}.{name}"), \
                f"{path.name} imports {name} from {module_name}, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_executed_and_follows_the_conventions(path):
    cells = json.loads(path.read_text())["cells"]
    code = _code_cells(path)
    assert all(c["execution_count"] is not None for c in code if "".join(c["source"]).strip()), "unexecuted cell"
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"], "error output"
    intro = "".join(cells[0]["source"]).lower()
    assert cells[0]["cell_type"] == "markdown" and "run time" in intro and "learn" in intro
    assert "__version__" in "".join(code[0]["source"]), "the first code cell prints the versions"
    exercises = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"])]
    assert exercises, "an Exercises section"
    assert f"(solutions/{path.name})" in "".join(cells[exercises[0]]["source"]), "a link to the solutions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_has_a_solution_notebook_and_keeps_no_solution_itself(path):
    solution = SOLUTIONS / path.name
    assert solution.exists(), f"no {solution.relative_to(NOTEBOOK_DIR.parent)}"
    cells = json.loads(path.read_text())["cells"]
    assert not [c for c in cells if "solution" in c["metadata"].get("tags", [])], "a solution cell in the main notebook"
    assert not [c for c in _code_cells(path) if "".join(c["source"]).lstrip().lower().startswith("# solution")]
    exercises = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"]))
    stubs = [c for c in cells[exercises:] if c["cell_type"] == "code"]
    assert all("exercise" in c["metadata"].get("tags", []) and "raise NotImplementedError" in "".join(c["source"])
               for c in stubs), "code after the exercises that is not an exercise stub (an answer?)"
    printed = _printed(stubs)
    assert printed.count(NOT_WRITTEN) == len(stubs) and "✓" not in printed, "an exercise cell prints an answer"
    solved = json.loads(solution.read_text())["cells"]
    assert f"%run ../{path.name}" in "".join(solved[1]["source"]), "the solutions run their notebook first"
    code = [c for c in solved[2:] if c["cell_type"] == "code"]
    assert code and all(c["execution_count"] is not None for c in code), "executed solutions"
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"], "error output"
    printed = _printed(code)
    assert printed.count("✓") == len(stubs) and "✗" not in printed, "every implementation exercise solved and checked"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_at_least_five_exercises_of_all_three_kinds(path):
    cells = json.loads(path.read_text())["cells"]
    text = next("".join(c["source"]) for c in cells if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"]))
    items = [line for line in text.split("## Exercises")[1].splitlines() if line[:1].isdigit()]
    assert len(items) >= 5, f"{len(items)} exercises"
    for kind in ("derivation", "implement", "experiment"):
        assert any(f"*({kind}" in item for item in items), f"no {kind} exercise"
    solved = json.loads((SOLUTIONS / path.name).read_text())["cells"]
    answered = [c for c in solved if "solution" in c["metadata"].get("tags", [])]
    numbers = {int(m) for c in answered for m in re.findall(r"Solution (\d+)", "".join(c["source"])[:40])}
    assert numbers == set(range(1, len(items) + 1)), f"solutions for {sorted(numbers)} of {len(items)} exercises"
