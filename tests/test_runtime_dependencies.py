"""Every third-party package the runtime imports is declared in pyproject.toml.

`make serve` and the Docker image install only `[project] dependencies`; `make test` adds the test extra, which
pulls in more (numpy came with transformers), so an undeclared import passed every test and still broke the
quickstart. This walks the syntax tree of every installed module (attnserve/, engine/, kernels/, server/, clients/; imports at
module level, inside functions, and `import_module("...")` calls), maps each top-level module to the distribution
that installs it, and compares with the declared runtime list. A package may live in an extra only when every
import of it is guarded by a clear message (OPTIONAL below says where), and a child process with those packages
hidden must still import the runtime.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is what pip's own vendored parser grew from
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("attnserve", "engine", "kernels", "server", "clients")

# Imports allowed to come from an extra: module -> (extra, the guard that makes its absence a clear message).
OPTIONAL = {
    "matplotlib": ("plot", "clients/bench/report.py require_matplotlib(): --plot fails naming `pip install`"),
    "triton": ("triton", "kernels/backend.py _load_triton(): auto falls back to sdpa; 'triton' names pip install"),
}


# Packages of this repository that are not installed, imported only where their absence gets a clear message.
SOURCE_ONLY = {
    "benchmarks": "attnserve/cli.py _offline_command(): outside a clone, `bench offline` says it needs the source tree",
}


def _imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """(dotted module name, line) of every absolute import in a module, wherever it sits."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.args[0].value, node.lineno))
    return found


def third_party_imports(root: Path, packages: tuple[str, ...]) -> dict[str, list[str]]:
    """Top-level third-party module -> the 'path:line' places that import it."""
    first_party = set(packages) | set(SOURCE_ONLY)
    found: dict[str, list[str]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for module, line in _imported_modules(tree):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in first_party:
                    continue
                found.setdefault(top, []).append(f"{path.relative_to(root)}:{line}")
    return found


def declared(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(runtime distributions, extra -> distributions), names canonicalized."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {canonicalize_name(Requirement(r).name) for r in requirements}

    extras = {extra: names(reqs) for extra, reqs in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def undeclared_imports(root: Path, packages: tuple[str, ...], pyproject: Path,
                       optional: dict[str, tuple[str, str]]) -> list[str]:
    """One line per import that a runtime-only install would not satisfy."""
    runtime, extras = declared(pyproject)
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, places in sorted(third_party_imports(root, packages).items()):
        where = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
        dists = {canonicalize_name(d) for d in providers.get(module, ())}
        if not dists:
            problems.append(f"{module} ({where}): no installed distribution provides it, so nothing declares it")
        elif module in optional:
            extra = optional[module][0]
            if not dists & (extras.get(extra, set()) | runtime):
                problems.append(f"{module} ({where}): optional, but {sorted(dists)} is not in the [{extra}] extra")
        elif not dists & runtime:
            problems.append(f"{module} ({where}): {sorted(dists)} is not in [project] dependencies")
    return problems


def test_every_runtime_import_is_declared():
    problems = undeclared_imports(ROOT, RUNTIME_PACKAGES, ROOT / "pyproject.toml", OPTIONAL)
    assert not problems, "undeclared runtime imports:\n" + "\n".join(problems)


def test_the_check_catches_a_planted_undeclared_import(tmp_path):
    """yaml comes with the test extra (pyyaml) and is installed here, like numpy was: the check must still see it,
    inside a function too; a module nothing installs is reported as well; stdlib and declared imports are not."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "planted.py").write_text(textwrap.dedent("""
        import json
        import numpy as np
        from engine import config

        def load():
            import yaml
            return yaml

        def later():
            from importlib import import_module
            return import_module("attnserve_no_such_package_xyz.sub")
    """), encoding="utf-8")
    problems = undeclared_imports(tmp_path, ("engine",), ROOT / "pyproject.toml", OPTIONAL)
    assert len(problems) == 2, problems
    assert problems[0].startswith("attnserve_no_such_package_xyz (engine/planted.py:12)")
    assert problems[1] == "yaml (engine/planted.py:7): ['pyyaml'] is not in [project] dependencies"


def test_an_optional_import_must_be_in_its_extra(tmp_path):
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "plots.py").write_text("def plot():\n    import matplotlib\n", encoding="utf-8")
    assert undeclared_imports(tmp_path, ("clients",), ROOT / "pyproject.toml", OPTIONAL) == []
    wrong_extra = {"matplotlib": ("no-such-extra", "a guard")}
    problems = undeclared_imports(tmp_path, ("clients",), ROOT / "pyproject.toml", wrong_extra)
    assert problems == ["matplotlib (clients/plots.py:2): optional, but ['matplotlib'] is not in the "
                        "[no-such-extra] extra"]


# Imports every module a server, the CLI and the SDK load at start, and picks the CPU attention backend, with the
# optional packages made unimportable (as on an install without extras).
_HIDDEN_IMPORT_PROBE = """
import importlib.abc, sys
HIDDEN = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, Hide())
import attnserve.cli, clients, clients.bench.cli, clients.bench.runner, engine, server.cli, server.serve
from kernels.backend import choose_attention_backend, get_attention_backend
print(choose_attention_backend("auto", "cpu")[0], get_attention_backend(None, "cpu").name)
try:
    choose_attention_backend("triton", "cpu")
except RuntimeError as exc:
    print(exc)
"""


def test_the_runtime_imports_with_the_optional_packages_missing():
    hidden = sorted(OPTIONAL) + ["pytest", "yaml", "openai", "schemathesis"]
    run = subprocess.run([sys.executable, "-c", _HIDDEN_IMPORT_PROBE, ",".join(hidden)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    assert first == "sdpa sdpa"
    assert "triton package is not installed" in second and "pip install triton" in second
