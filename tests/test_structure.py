"""The house drawn from imports: the command line (launch/cli.py) on top, then launch/ and
benchmarks/, then engine/, then backends/; every arrow between packages points down, no module
import cycle anywhere, and the engine imports no concrete backend (it asks the registry). Read from
the source with `ast`, so lazy imports inside functions count too."""
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


# the floors of the house, top first (launch/ holds the command line, which drives the benchmarks)
FLOORS = {"launch": 3, "benchmarks": 2, "engine": 1, "backends": 0}


def test_every_arrow_between_packages_points_down():
    graph = import_graph()
    up = sorted((m, t) for m, ts in graph.items() for t in ts
                if FLOORS[m.split(".")[0]] <= FLOORS[t.split(".")[0]] and m.split(".")[0] != t.split(".")[0])
    assert up == []
    assert "benchmarks.runner" in graph["launch.cli"] and "engine.loop" in graph["engine.worker"]  # really read
    assert any(t.startswith("backends") for t in graph["engine.loop"])


def test_no_import_cycles():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the detector detects


def _concrete_backend_modules(graph) -> set[str]:
    from backends.base import _BUILTIN_MODULES
    return {m for m in graph for b in _BUILTIN_MODULES if m == b or m.startswith(b + ".")}


def test_the_engine_imports_no_concrete_backend():
    """engine/ reaches a backend only through the registry (backend_class(layout.json's name), ...):
    a new backend touches backends/ and the registry line, nothing under engine/."""
    graph = import_graph()
    concrete = _concrete_backend_modules(graph)
    assert {"backends.ddp", "backends.deepspeed_zero", "backends.colossal"} <= concrete
    named = sorted((m, t) for m, ts in graph.items() for t in ts if m.split(".")[0] == "engine" and t in concrete)
    assert named == []


def _code_without_comments(path) -> str:
    import io
    import tokenize
    return " ".join(tok.string for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                    if tok.type not in (tokenize.COMMENT, tokenize.STRING)).lower()


@pytest.mark.parametrize("module", ["loop", "checkpoint", "export", "universal"])
def test_the_loop_and_the_checkpoint_path_name_no_backend(module):
    """No backend name in their code (comments and docstrings may explain a backend's needs)."""
    from backends.base import backend_names
    code = _code_without_comments(REPO / "engine" / f"{module}.py")
    names = backend_names()
    assert set(names) >= {"ddp", "deepspeed", "colossal"}
    for name in names:
        assert name not in code, name
