"""fedtune's package import graph: edges, cycles, upward edges, by-name algorithm branches.

Every `import` / `from ... import` in src/fedtune is read with `ast`, the deferred ones inside
functions included (TYPE_CHECKING-only imports are left out: they never run). Modules are grouped
by their first package below `fedtune` (`fedtune.runtime.server` -> `runtime`; top-level modules
such as `config.py` are their own group). An edge is *upward* when it goes from a lower layer to
a higher one in LAYERS (the intended order, bottom first). Outside `fedtune/algorithms/`, a *by-name branch* is
the test of an `if`, conditional expression, loop or comparison that names an algorithm (a string
literal equal to one, or an identifier with a word such as `offsite` or `emulator`); docstrings
and comments are not counted. Every line of code that names one is counted as well.

    python scripts/import_graph.py            # the report
    python scripts/import_graph.py --check    # exit 1 on cycles, upward edges or by-name branches
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "fedtune"

# The intended layers, bottom first; a group may import only its own layer and those below.
LAYERS: list[set[str]] = [
    {"errors", "seeding", "wire"},
    {"ranks"},
    {"config"},
    {"data", "models", "track"},
    {"privacy", "transport"},
    {"train", "eval"},
    {"algorithms"},
    {"runtime"},
    {"baselines", "tune"},
    {"cli", "cli_common", "cli_deploy", "cli_export", "__init__", "__main__"},
]

# Algorithm names that a module outside algorithms/ would use to branch on one of them.
ALGORITHMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold",
              "dp_fedavg", "flexlora", "median", "trimmed_mean", "krum", "norm_bounding",
              "fedmezo", "fedkseed", "offsite")
# Names used by all algorithms alike (the default recipe's algorithm, a bench default).
NEUTRAL = {"fedavg"}
# Words of an identifier (split at `_` and `.`) that name an algorithm or its own machinery.
WORDS = {"offsite", "fedkseed", "kseed", "fedmezo", "mezo", "emulator", "scaffold", "flexlora",
         "krum", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}


def group(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fedtune":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    return next((i for i, g in enumerate(LAYERS) if name in g), -1)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, deferred) for every runtime import of `path`."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _in_type_checking(node, parents):
            continue
        deferred = any(isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef)
                       for p in _ancestors(node, parents))
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from fedtune.x import y`: y may be a module; the group is the same either way
            names = [base]
        out.extend((n, node.lineno, deferred) for n in names)
    return out


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]):
    while node in parents:
        node = parents[node]
        yield node


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(from group, to group) -> the `file:line` places that import across groups."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        src = group(_module_name(path))
        for target, line, deferred in imports_of(path):
            dst = group(target)
            if dst is None or dst == src or src is None:
                continue
            where = f"{path.relative_to(ROOT.parent)}:{line}" + (" (deferred)" if deferred else "")
            edges[(src, dst)].append(where)
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one group (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(edges) -> list[tuple[str, str, list[str]]]:
    """Edges from a group to a group in a higher layer (or to one in no layer)."""
    return [(a, b, places) for (a, b), places in sorted(edges.items())
            if layer(a) < layer(b) or layer(b) < 0 or layer(a) < 0]


def _names_algorithm(node: ast.AST, docstrings: set[int]) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return id(node) not in docstrings and node.value in ALGORITHMS and node.value not in NEUTRAL
    if isinstance(node, ast.Name):
        word = node.id
    elif isinstance(node, ast.Attribute):
        word = node.attr
    elif isinstance(node, ast.alias):
        word = node.name
    elif isinstance(node, ast.ImportFrom):
        word = node.module or ""
    else:
        return False
    return bool(set(re.split(r"[_.]", word.lower())) & WORDS)


def by_name(branches_only: bool) -> list[str]:
    """`file:line` outside algorithms/ where code names an algorithm: with `branches_only`, only
    the tests of `if` / conditional expressions / `and` / `or` / comparisons (a by-name branch)."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        if "algorithms" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                                    | ast.AsyncFunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        if branches_only:
            roots = [n.test for n in ast.walk(tree) if isinstance(n, ast.If | ast.IfExp | ast.While)]
            roots += [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
            roots += [c.iter for n in ast.walk(tree) if isinstance(n, ast.comprehension)
                      for c in [n]]
        else:
            roots = [tree]
        lines = set()
        for root in roots:
            for node in ast.walk(root):
                if _names_algorithm(node, docstrings):
                    lines.add(getattr(node, "lineno", getattr(root, "lineno", 0)))
        out.extend(f"{path.relative_to(ROOT.parent)}:{line}" for line in sorted(lines))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on cycles, upward edges or code naming an algorithm")
    parser.add_argument("--verbose", action="store_true", help="list every line naming one")
    opts = parser.parse_args()
    edges = package_edges()
    print("package edges (from -> to: places):")
    for (a, b), places in sorted(edges.items()):
        print(f"  {a} -> {b}: {len(places)}")
    found_cycles = cycles(edges)
    print(f"cycles: {len(found_cycles)}")
    for comp in found_cycles:
        print(f"  {' <-> '.join(comp)}")
    up = upward(edges)
    print(f"upward edges: {len(up)}")
    for a, b, places in up:
        print(f"  {a} -> {b}: {', '.join(places)}")
    branches = by_name(branches_only=True)
    print(f"by-name algorithm branches outside algorithms/: {len(branches)}")
    for place in branches:
        print(f"  {place}")
    mentions = by_name(branches_only=False)
    print(f"lines of code naming an algorithm outside algorithms/: {len(mentions)} "
          f"in {len({m.rsplit(':', 1)[0] for m in mentions})} modules")
    if opts.verbose:
        for place in mentions:
            print(f"  {place}")
    return 1 if opts.check and (found_cycles or up or branches or mentions) else 0


if __name__ == "__main__":
    sys.exit(main())
