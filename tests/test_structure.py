"""The package's shape: imports follow the data flow, modules stay small, and archive paths
are spelled in one place (exporter/archive/layout.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
MAX_LINES = 400
# String constants that name a place inside an archive.
ARCHIVE_PATH = re.compile(
    r"(^|/)(steps/|index/(tensors|checkpoints)|manifest\.json$|\.push\b|optimizer/|"
    r"buffers\.safetensors|state\.safetensors|state\.json$|neox\.yml$|config\.json$|assets/)"
)

ARCHIVE_FOLDERS = {"steps", "index", "tensors", "checkpoints", "optimizer", ".push", "assets",
                   ".downloads"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module_level: bool) -> set[str]:
    """Modules of the package that ``path`` imports (at module level only, if asked;
    ``if TYPE_CHECKING:`` blocks never count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and _is_type_checking(node) for n in ast.walk(node)}
    if module_level:
        nodes: list[ast.AST] = []
        pending: list[ast.stmt] = list(tree.body)
        while pending:
            node = pending.pop()
            nodes.append(node)
            if isinstance(node, ast.If | ast.Try):
                pending += node.body + node.orelse + getattr(node, "finalbody", [])
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("exporter"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("exporter"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph(module_level: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path, module_level) if t in modules and t != name}
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        for target in list(targets):
            parts = target.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts)) if
                           ".".join(parts[:i]) in modules)
        targets.discard(name)
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle() -> None:
    assert _cycle(_graph(module_level=True)) is None


def test_neox_imports_nothing_from_convert() -> None:
    offenders = {name: sorted(t for t in targets if t.startswith("exporter.convert"))
                 for name, targets in _graph(module_level=False).items()
                 if name.startswith("exporter.neox")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_under_the_size_limit(name: str) -> None:
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def _archive_path_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings and ARCHIVE_PATH.search(node.value):
            found.append(node.value)
        # root / "index" / "tensors": folder names joined with the path operator
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                and isinstance(node.right, ast.Constant) and node.right.value in ARCHIVE_FOLDERS:
            found.append(node.right.value)
    return found


def test_the_path_rule_sees_a_hard_coded_archive_path(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text('"""Writes steps/step8/config.json."""\nP = f"steps/step{8}"\n'
                      'Q = root / "index" / "tensors"\n')
    assert sorted(_archive_path_literals(sample)) == ["index", "steps/step", "tensors"]


def test_only_the_layout_module_spells_archive_paths() -> None:
    layout = PACKAGE / "archive" / "layout.py"
    offenders = {str(path.relative_to(PACKAGE)): literals
                 for path in sorted(PACKAGE.rglob("*.py"))
                 if path != layout and (literals := _archive_path_literals(path))}
    assert offenders == {}


def _loaded_after(imports: str, modules: list[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded once it ran ``import {imports}``."""
    import ast
    import subprocess
    import sys

    code = f"import sys, {imports}; print([m for m in {modules!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return ast.literal_eval(out.stdout.strip())


def test_the_command_line_starts_without_the_readers_it_does_not_use() -> None:
    # Every `neox-export` run pays its imports before any work: the catalog readers, plots,
    # pandas and pyarrow.dataset load only when a command that needs them runs.
    heavy = ["pandas", "pyarrow.dataset", "exporter.catalog.reader", "exporter.archive.plot",
             "exporter.archive.loader", "matplotlib"]
    assert _loaded_after("exporter.cli.main", heavy) == []


def test_exporting_a_checkpoint_imports_no_index_code() -> None:
    # `convert` writes no index: pyarrow (0.07 s), the index and its validation (pyarrow.compute
    # and parquet, 0.05 s more) would only lengthen its start.
    heavy = ["pyarrow", "pyarrow.compute", "pyarrow.parquet", "exporter.archive.index",
             "exporter.archive.validate", "exporter.archive.schema"]
    assert _loaded_after("exporter.cli.main, exporter.pipeline.export", heavy) == []
