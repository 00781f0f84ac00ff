"""The layers depend one way, and no module imports itself back through others.

server -> engine -> kernels; the clients speak HTTP only; the `attnserve` command (attnserve/) is the one place that
composes server and clients; benchmarks/ and tools/ sit on top of the engine. Imports are read from the syntax tree,
module level and inside functions alike (a lazy import is still a dependency), and resolved to this repository's
modules; every forbidden edge and every cycle among modules is reported.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attnserve", "benchmarks", "clients", "engine", "kernels", "server", "tools")

# package -> the packages of ours it must not import.
FORBIDDEN = {
    "kernels": {"engine", "server", "clients", "attnserve", "benchmarks", "tools"},
    "engine": {"server", "clients", "attnserve", "benchmarks", "tools"},
    "server": {"clients", "attnserve", "benchmarks", "tools"},
    "clients": {"engine", "kernels", "server", "attnserve", "benchmarks", "tools"},
    "tools": {"server", "clients", "attnserve", "benchmarks"},
    "benchmarks": {"server", "attnserve"},
}


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is named by its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: line of the first such import}."""
    modules = module_files(root, packages)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                # `from a import b` imports module a.b when there is one, else the name b from a.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
                targets = [node.args[0].value]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != module:
                    edges.setdefault(resolved, node.lineno)
        graph[module] = edges
    return graph


def forbidden_edges(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in sorted(graph.items()):
        banned = FORBIDDEN.get(module.split(".")[0], set())
        found += [f"{module} (line {line}) imports {target}" for target, line in sorted(edges.items())
                  if target.split(".")[0] in banned]
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def test_imports_follow_the_layers():
    problems = forbidden_edges(import_graph(ROOT, PACKAGES))
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph(ROOT, PACKAGES))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_a_planted_violation_and_a_planted_cycle(tmp_path):
    files = {
        "engine/__init__.py": "",
        "engine/step.py": "import torch\n\ndef run():\n    from server.app import build_app\n    return build_app\n",
        "server/__init__.py": "",
        "server/app.py": "from engine import step\n\ndef build_app():\n    return step\n",
        "clients/__init__.py": "",
        "clients/a.py": "from . import b\n",
        "clients/b.py": "from clients.a import thing\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text), encoding="utf-8")
    graph = import_graph(tmp_path, ("clients", "engine", "server"))
    assert forbidden_edges(graph) == ["engine.step (line 4) imports server.app"]
    assert cycles(graph) == [["clients.a", "clients.b"], ["engine.step", "server.app"]]


def test_the_graph_sees_this_repositorys_real_edges():
    """A checker that resolved nothing would pass everything: known edges must be in the graph."""
    graph = import_graph(ROOT, PACKAGES)
    assert "engine.llm_engine" in graph["engine.async_engine"]
    assert "engine.async_engine" in graph["server.serve"]
    assert "server.cli" in graph["attnserve.cli"] and "clients.bench.cli" in graph["attnserve.cli"]
