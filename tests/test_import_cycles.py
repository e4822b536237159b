"""No import cycle among the project's modules: the imports of `kdlab` (`kdlab.worker`,
`kdlab.backend`, `kdlab.distill`) form a DAG, counting imports inside functions too (config ↔
catalog was one); and nothing imports the repository's folders as top-level `worker` or `backend`
(a second copy of every module). Which package may import which is import-linter's job
(`lint-imports`, contracts in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# kdlab/worker and kdlab/backend are links to these folders; kdlab/ itself holds the rest
LINKED = ("worker", "backend")
TOP_LEVEL_DIRS = ("backend", "benchmarks", "kdlab", "migrations", "tests", "worker")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] in LINKED:
        parts = ("kdlab", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> list[Path]:
    """Every module of `kdlab`, by its real path (links not followed twice)."""
    own = [p for p in (ROOT / "kdlab").rglob("*.py") if not p.is_symlink() and all(
        part not in LINKED for part in p.relative_to(ROOT / "kdlab").parts)]  # fmt: skip
    return [*own, *(p for pkg in LINKED for p in (ROOT / pkg).rglob("*.py"))]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its code: at module level and inside
    functions (a late import hides a cycle, it does not remove it), but not under
    `if TYPE_CHECKING:`. A package's imports of its own submodules are not edges."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(sub)
        for node in tree.body
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name and not m.startswith(f"{name}.")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, pending = stack[-1]
            if not pending:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = pending.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def project_graph() -> dict[str, set[str]]:
    files = package_files()
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def test_no_import_cycle() -> None:
    graph = project_graph()
    assert len(graph) > 50  # the walk found the project
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle or [])


def test_the_graph_has_the_edges_a_reader_sees() -> None:
    graph = project_graph()
    assert "kdlab.worker.kd.distillation_model" in graph["kdlab.worker.kd.conversion"]
    assert "kdlab.worker.config" in graph["kdlab.backend.services.validation"]


def bare_imports(path: Path) -> list[str]:
    """`import worker…` / `from backend… import …` in `path`: the folders as top-level packages."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                  if n.split(".")[0] in LINKED]  # fmt: skip
    return found


def test_nothing_imports_the_folders_as_top_level_packages() -> None:
    files = [p for d in TOP_LEVEL_DIRS for p in (ROOT / d).rglob("*.py") if d != "kdlab"]
    assert len(files) > 100
    found = [hit for p in files for hit in bare_imports(p)]
    assert not found, "import through kdlab.…: " + ", ".join(found)


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
