"""The package stays easy to extend: no import cycles (module- or function-level), no function over 60 lines."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_lab"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The dpo_lab modules ``path`` imports anywhere in its body (inside functions too)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != own}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if not state.get(target) and (cycle := visit(target, stack)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if not state.get(module) and (cycle := visit(module, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "dpo_lab.train.dpo" in graph and "dpo_lab.runs" in graph["dpo_lab.train.dpo"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_cli_knows_the_cli():
    graph = import_graph()
    assert [m for m, targets in graph.items() if "dpo_lab.cli" in targets] == []


def test_no_function_is_over_60_lines():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_readme_equation_map_names_tests_and_functions_that_exist():
    import importlib
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme[readme.index("### Equation map"):readme.index("## The pipeline")]
    tests = re.findall(r"`(test_\w+\.py)::(test_\w+)`", table)
    functions = re.findall(r"`(\w+)\.(\w+)`", table)
    assert len(tests) >= 12 and functions
    for file, name in tests:
        assert f"def {name}(" in (root / "tests" / file).read_text(), f"{file}::{name}"
    for module, name in functions:  # `bandit.objective`: a function of dpo_lab.bandit
        assert hasattr(importlib.import_module(f"dpo_lab.{module}"), name), f"dpo_lab.{module}.{name}"
