"""The house drawn from imports: backends sit below the engine (no arrow back), and no module
import cycle anywhere in the project's packages. Read from the source with `ast`, so lazy imports
inside functions count too."""
import ast
import pytest

from helpers import REPO

pytestmark = pytest.mark.fast

PACKAGES = ("engine", "backends", "launch", "benchmarks")


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for f in (REPO / package).rglob("*.py"):
            if "results" in f.relative_to(REPO).parts:
                continue
            name = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = f

    def resolve(name: str) -> str:  # `from engine.tasks import Task` -> engine.tasks
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in map(resolve, targets) if t and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_backends_import_nothing_from_the_engine():
    graph = import_graph()
    back = sorted((m, t) for m, ts in graph.items() for t in ts
                  if m.split(".")[0] == "backends" and t.split(".")[0] == "engine")
    assert back == []
    assert any(t.startswith("backends") for t in graph["engine.loop"])  # the graph really was read


def test_no_import_cycles():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the detector detects


def test_the_loop_names_no_backend():
    """No backend name in the loop's code (comments may explain a backend's needs)."""
    import io
    import tokenize
    from backends.base import backend_names
    source = (REPO / "engine" / "loop.py").read_text()
    code = " ".join(tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type not in (tokenize.COMMENT, tokenize.STRING)).lower()
    names = backend_names()
    assert set(names) >= {"ddp", "deepspeed", "colossal"}
    for name in names:
        assert name not in code, name
