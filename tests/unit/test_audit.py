"""Audit: nothing in fedtune can turn bytes from a peer into code.

No pickle-family module is imported anywhere in the package, `torch.load` is only called with
`weights_only=True`, `numpy.load` never with `allow_pickle=True`, and `exec`/`eval` appear only in
the HumanEval sandbox child, which runs in its own resource-limited process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedtune

PACKAGE = Path(fedtune.__file__).parent
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "_pickle"}
EXEC_ALLOWED = {"eval/sandbox_child.py"}  # runs generated code in a separate, limited process


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the scan really covers the package
    for path in files:
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _call_name(node: ast.Call) -> str:
    parts, target = [], node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.append(target.id)
    return ".".join(reversed(parts))


def _keyword_is(node: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in node.keywords)


def find_violations() -> list[str]:
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{rel}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                name = _call_name(node)
                if name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
                    found.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
                if name in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True):
                    found.append(f"{rel}:{node.lineno}: numpy.load with allow_pickle=True")
                if name in ("exec", "eval") and rel not in EXEC_ALLOWED:
                    found.append(f"{rel}:{node.lineno}: {name}()")
    return found


def test_no_unsafe_deserialisation_or_code_execution_in_the_package():
    assert find_violations() == []


def test_the_audit_catches_what_it_looks_for(tmp_path, monkeypatch):
    bad = tmp_path / "fedtune"
    bad.mkdir()
    for i in range(31):
        (bad / f"ok{i}.py").write_text("x = 1\n")
    (bad / "bad.py").write_text(
        "import pickle\nfrom dill import loads\nimport torch, numpy as np\n"
        "torch.load('f')\ntorch.load('f', weights_only=True)\nnp.load('f', allow_pickle=True)\n"
        "eval('1')\n"
    )
    monkeypatch.setitem(globals(), "PACKAGE", bad)
    found = find_violations()
    assert found == [
        "bad.py:1: import pickle",
        "bad.py:2: from dill import ...",
        "bad.py:4: torch.load without weights_only=True",
        "bad.py:6: numpy.load with allow_pickle=True",
        "bad.py:7: eval()",
    ]
