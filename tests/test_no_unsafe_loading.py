"""No code path can unpickle: weights come from safetensors only, and nothing calls torch.load, pickle, marshal,
eval or exec (a checkpoint or a request could otherwise run code). Checked on the syntax tree of every shipped
module, so comments and strings that mention these names do not count, and an alias import is caught."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["engine", "server", "kernels", "clients"]
BANNED_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
BANNED_CALLS = {("torch", "load"), ("builtins", "eval"), ("builtins", "exec")}


def shipped_files() -> list[Path]:
    return sorted(p for d in SHIPPED for p in (REPO / d).rglob("*.py"))


def violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in BANNED_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            found += [f"from torch import {a.name}" for a in node.names if a.name == "load"]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{func.id}(...)")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                    (func.value.id, func.attr) in BANNED_CALLS:
                found.append(f"{func.value.id}.{func.attr}(...)")
    return found


def test_the_checker_catches_what_it_looks_for():
    bad = "import pickle\nfrom torch import load\nimport torch\ntorch.load('x')\neval('1')\nfrom marshal import loads\n"
    assert len(violations(bad)) == 5
    assert violations("model.eval()\n# torch.load is never used\ns = 'pickle'\n") == []


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_unpickling_anywhere(path):
    assert violations(path.read_text()) == [], path
