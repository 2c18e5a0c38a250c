"""The package's layers point one way: no import cycle between its modules (counting imports
inside functions, which hide cycles rather than remove them), and no production module
imports the executable spec (reference.py may use production's vocabulary, not the reverse)."""

import ast
from pathlib import Path

import vskip_kernels

PKG = Path(vskip_kernels.__file__).resolve().parent
SPEC = "vskip_kernels.reference"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """Package modules ``path`` imports, resolved (``from . import x`` names the submodule x)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    out.add(sub)
                elif target in modules:
                    out.add(target)
    out.discard(name)
    return out


def _graph() -> dict:
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def _is_parent_package_import(a: str, b: str) -> bool:
    """a package's __init__ importing its own submodule (and the submodule the package) is
    Python's package mechanics, not a layering cycle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_cycles():
    graph = _graph()
    # drop package <-> own submodule edges, then look for cycles among the rest
    pruned = {a: {b for b in bs if not _is_parent_package_import(a, b)} for a, bs in graph.items()}
    assert _cycles(pruned) == []


def test_the_checker_sees_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_production_code_does_not_import_the_spec():
    offenders = sorted(m for m, deps in _graph().items() if SPEC in deps and m != SPEC)
    assert offenders == []


def test_the_aot_gate_is_a_leaf():
    # ops/static.py reads what the gate compiles; only the static report (bench/static_report.py)
    # and the vLLM peer (bench/vllm_peer.py) import it, and nothing imports them but the runner
    graph = _graph()
    readers = {"vskip_kernels.bench.static_report", "vskip_kernels.bench.vllm_peer"}
    assert not [m for m, deps in graph.items() if "vskip_kernels.ops.aot" in deps and m != "vskip_kernels.ops.static"]
    assert not [m for m, deps in graph.items() if "vskip_kernels.ops.static" in deps and m not in readers]
    assert not [m for m, deps in graph.items() if deps & readers and m not in readers | {"vskip_kernels.bench.run"}]
