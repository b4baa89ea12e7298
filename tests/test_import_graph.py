"""No import cycles between the package's modules (issue 15): the import graph, read from the source
(module-level and function-level imports alike: a function-level import hides a cycle, it does not
remove it), has no strongly connected component of more than one module. And modules that once took
part in a runtime cycle import on their own in a fresh interpreter."""
import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "tvm_intlstm"


def _modules() -> dict:
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        mods[name] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict) -> set:
    """The package modules `name` imports (a package's own ancestors excluded: importing a module
    always runs its packages' __init__, which is not an edge of the module's own making)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name if is_pkg else name.rsplit(".", 1)[0]
            if node.level:
                parts = base.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                full = base + ("." + node.module if node.module else "")
            else:
                full = node.module or ""
            targets = [f"{full}.{a.name}" if f"{full}.{a.name}" in mods else full for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not name.startswith(t + "."):
                out.add(t)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert len(graph) > 50 and graph["tvm_intlstm.quant.graph"], "the walker found the package"
    cycles = _cycles(graph)
    assert not cycles, "import cycles (break them with a leaf module):\n" + "\n".join(
        " <-> ".join(c) + "\n    " + "; ".join(f"{a} -> {sorted(set(graph[a]) & set(c))}" for a in c)
        for c in cycles)


def test_the_walker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["tvm_intlstm.nn.modules", "tvm_intlstm.nn.intmodules",
                                    "tvm_intlstm.quant.layers", "tvm_intlstm.kernels._gemm",
                                    "tvm_intlstm.tuning.x86_wide"])
def test_imports_on_its_own(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                       timeout=300, cwd=str(PKG.parent))
    assert r.returncode == 0, r.stderr[-2000:]
