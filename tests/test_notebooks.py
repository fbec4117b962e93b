"""The notebooks and the package cannot drift apart: every dpo_lab name a notebook imports exists,
and every committed notebook is executed, error-free, and follows the series' conventions."""

import ast
import importlib
import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


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
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


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
    assert any("exercise" in "".join(c["source"]).lower() for c in cells if c["cell_type"] == "markdown")
    assert any(c["metadata"].get("jupyter", {}).get("source_hidden") for c in code), "solutions kept out of sight"
