"""The project's import graph, read from the source (every import, at module level or inside a
function): no cycles, and the layering the install relies on: the server never imports the trainer
(``model``) nor the trainer the server, and the client (the torch-free base install) reaches neither
them nor torch; bench/ never imports tests/. Inside the server, the serving core speaks no protocol
(no generated code, no grpc, no aiohttp), each API's front-end stands alone over it, and the Open
Inference Protocol's front-ends (gRPC and HTTP) reach no cifar10.v1 code. No module imports another's
underscore names. Each rule is a function that lists its violations, and is also run on a planted
violation that it alone would catch, so that a rule that cannot fail fails."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"protos": "cifar10_serving.protos", "server": "cifar10_serving.server",
            "client": "cifar10_serving.client", "model": "cifar10_serving.model", "bench": "bench", "tests": "tests"}
V1 = "cifar10_serving.server.cifar10_v1"
OPEN_INFERENCE = "cifar10_serving.server.open_inference"
HTTP_API = "cifar10_serving.server.http_api"
FRONT_ENDS = (V1, OPEN_INFERENCE, HTTP_API)  # one per API, each over the core alone
# The Open Inference Protocol's side: its two front-ends, the HTTP one's framing and listener, and the
# protocol's rules that both share.
OPEN_INFERENCE_SIDE = (OPEN_INFERENCE, HTTP_API, "cifar10_serving.server.http_tensors",
                       "cifar10_serving.server.http_server", "cifar10_serving.server.v2_tensors")
CORE = "cifar10_serving.server.core"
PROTOCOL_LIBRARIES = ("grpc", "grpc_health", "aiohttp")  # the transports are the front-ends' to know
V1_MESSAGES = "cifar10_serving.protos.cifar10"  # the generated code of the cifar10.v1 API
V2_MESSAGES = "cifar10_serving.protos.inference"  # the Open Inference Protocol's


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1][: -len(".py")]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (project modules and third-party top-level names alike)."""
    return imports_in(name, path.read_text(), known, is_package=path.name == "__init__.py")


def imports_in(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # "from pkg import mod" imports the module pkg.mod when there is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = sources()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def own(graph: dict[str, set[str]], name: str) -> set[str]:
    return {m for m in graph[name] if m in graph}


def cycles(graph: dict[str, set[str]], among: set[str]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a few dozen nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in own(graph, v) & among:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(path_through(graph, sorted(component)))

    for v in sorted(among):
        if v not in index:
            visit(v)
    return found


def path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete cycle inside a strongly connected component, start -> ... -> start, for the message."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(own(graph, v) & members):
                if w == start:
                    chain = [v]
                    while chain[-1] != start:
                        chain.append(previous[chain[-1]])
                    return [*reversed(chain), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or through others: module -> the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in sorted(graph.get(v, ())):
            if w not in seen and w != start:
                seen[w] = v
                todo.append(w)
    return seen


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def private_imports(name: str, source: str, known: set[str]) -> list[str]:
    """``from project.module import _name``: another module's underscore name, which is its own to
    change. (A public name imported under a private alias is not one: ``import x as _x``.)"""
    bad = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.ImportFrom) and node.module and _project(node.module):
            bad += [f"{name} imports {node.module}.{alias.name}" for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                    and f"{node.module}.{alias.name}" not in known]  # a private module is a module
    return bad


def front_end_crossings(graph: dict[str, set[str]]) -> list[str]:
    """A front-end that reaches another front-end: each API translates for itself, over the core."""
    bad = []
    for start in FRONT_ENDS:
        via = reach(graph, start)
        bad += [chain(via, start, other) for other in FRONT_ENDS if other != start and other in via]
    return bad


def protocol_leaks(graph: dict[str, set[str]]) -> list[str]:
    """The core reaching a front-end, either API's generated code, gRPC or aiohttp, and the Open
    Inference Protocol's modules (over gRPC and over HTTP) reaching cifar10.v1's front-end or code."""
    rules = [(CORE, (*FRONT_ENDS, V1_MESSAGES, V2_MESSAGES, *PROTOCOL_LIBRARIES)),
             *((start, (V1, V1_MESSAGES)) for start in OPEN_INFERENCE_SIDE)]
    bad = []
    for start, forbidden in rules:
        via = reach(graph, start)
        bad += [chain(via, start, target) for target in sorted(via) if any(_in(target, f) for f in forbidden)]
    return bad


def layering_violations(graph: dict[str, set[str]], importer: str, forbidden: str) -> list[str]:
    """A module in package ``importer`` that imports one in package ``forbidden`` directly."""
    return sorted(f"{m} imports {d}" for m in graph if _in(m, importer)
                  for d in graph[m] if _in(d, forbidden))


def chain(via: dict[str, str], start: str, target: str) -> str:
    links = [target]
    while links[-1] != start:
        links.append(via[links[-1]])
    return " -> ".join(reversed(links))


def _project(module: str) -> bool:
    return module.split(".")[0] in ("cifar10_serving", "bench", "tests")


def test_the_graph_is_read(graph):
    # guards the reader itself: these edges exist, so an empty or wrong graph fails here first
    assert "cifar10_serving.protos.artifact" in graph["cifar10_serving.server.models"]
    assert "cifar10_serving.model.network" in graph["cifar10_serving.model.export"]
    assert "torch" in graph["cifar10_serving.server.models"]
    assert "cifar10_serving.protos.cifar10.v1.classifier_pb2" in graph["cifar10_serving.protos.cifar10.v1.classifier_pb2_grpc"]


def test_no_import_cycles_in_the_packages(graph):
    among = {m for m in graph if m.startswith("cifar10_serving.")}
    found = cycles(graph, among)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_import_cycles_in_bench(graph):
    # Apart from the packages' test: bench/ is rewritten on other branches, and a cycle there is theirs.
    found = [c for c in cycles(graph, set(graph)) if any(m.startswith("bench") for m in c)]
    assert not found, "import cycles through bench/: " + "; ".join(" -> ".join(c) for c in found)


# (importer, forbidden): no module of the first package imports one of the second
LAYERS = [
    ("cifar10_serving.server", "cifar10_serving.model"),
    ("cifar10_serving.model", "cifar10_serving.server"),
    ("cifar10_serving.protos", "cifar10_serving.server"),
    ("cifar10_serving.protos", "cifar10_serving.model"),
    ("cifar10_serving.protos", "cifar10_serving.client"),
    ("bench", "tests"),  # tests may use bench's tools, not the other way: bench runs without the suite
]


@pytest.mark.parametrize("importer,forbidden", LAYERS)
def test_layering(graph, importer, forbidden):
    bad = layering_violations(graph, importer, forbidden)
    assert not bad, "\n".join(bad)


def test_the_client_reaches_neither_torch_nor_the_server_nor_the_trainer(graph):
    """The client is the base install, without torch: nothing it imports, however indirectly, may
    need torch, the server or the trainer."""
    forbidden = ("torch", "torchvision", "cifar10_serving.server", "cifar10_serving.model")
    bad = []
    for start in sorted(m for m in graph if _in(m, "cifar10_serving.client")):
        via = reach(graph, start)
        for target in sorted(via):
            if any(_in(target, f) for f in forbidden):
                chain = [target]
                while chain[-1] != start:
                    chain.append(via[chain[-1]])
                bad.append(" -> ".join(reversed(chain)))
    assert not bad, "\n".join(bad)


def test_the_artifact_format_needs_only_the_standard_library(graph):
    third_party = {m.split(".")[0] for m in graph["cifar10_serving.protos.artifact"]} - {"__future__"}
    assert third_party <= set(sys.stdlib_module_names), third_party - set(sys.stdlib_module_names)


# ----------------------------------------------------------------------------- the server's structure
def test_no_front_end_reaches_another(graph):
    assert all(f in graph for f in FRONT_ENDS), "a front-end moved: update FRONT_ENDS"
    assert not front_end_crossings(graph), "\n".join(front_end_crossings(graph))


def test_the_core_speaks_no_protocol_and_open_inference_no_cifar10_v1(graph):
    assert all(m in graph for m in OPEN_INFERENCE_SIDE), "a module moved: update OPEN_INFERENCE_SIDE"
    assert all(CORE in graph[f] for f in FRONT_ENDS)  # each stands on the core
    assert not protocol_leaks(graph), "\n".join(protocol_leaks(graph))


def test_no_module_imports_another_modules_underscore_names():
    files = sources()
    bad = [line for name, path in files.items() for line in private_imports(name, path.read_text(), set(files))]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- each rule can fail
def planted(graph: dict[str, set[str]], importer: str, imported: str) -> dict[str, set[str]]:
    copy = {name: set(edges) for name, edges in graph.items()}
    copy[importer].add(imported)
    return copy


HEALTH = "cifar10_serving.server.health"  # a module no front-end reaches, and that reaches none


@pytest.mark.parametrize("edges", [
    [(OPEN_INFERENCE, V1)],
    [(V1, OPEN_INFERENCE)],
    [(HTTP_API, OPEN_INFERENCE)],
    [(OPEN_INFERENCE, HEALTH), (HEALTH, V1)],  # through another module, caught only with both edges
], ids=lambda edges: ",".join(f"{a.rpartition('.')[2]}->{b.rpartition('.')[2]}" for a, b in edges))
def test_a_planted_front_end_crossing_is_caught(graph, edges):
    # Each plant must be what is caught: the graph has no crossing without it, nor with any one
    # edge of a two-edge plant alone.
    assert not front_end_crossings(graph)
    if len(edges) > 1:
        assert not any(front_end_crossings(planted(graph, *edge)) for edge in edges), "plant an edge that is new"
    for edge in edges:
        graph = planted(graph, *edge)
    assert front_end_crossings(graph)


@pytest.mark.parametrize("importer,imported", [
    (CORE, "cifar10_serving.protos.cifar10.v1.classifier_pb2"),
    (CORE, "cifar10_serving.protos.inference.open_inference_grpc_pb2"),
    (CORE, V1),
    (CORE, "grpc"),
    (CORE, "grpc_health.v1"),
    (CORE, "aiohttp"),
    ("cifar10_serving.server.images", "cifar10_serving.protos.cifar10.v1.classifier_pb2"),  # through the core
    ("cifar10_serving.server.batching", "grpc.aio"),  # through the core
    (OPEN_INFERENCE, "cifar10_serving.protos.cifar10.v1.classifier_pb2"),
    (HTTP_API, "cifar10_serving.protos.cifar10.v1.classifier_pb2"),
    ("cifar10_serving.server.http_tensors", V1),
    ("cifar10_serving.server.v2_tensors", "cifar10_serving.protos.cifar10.v1.classifier_pb2"),
])
def test_a_planted_protocol_leak_is_caught(graph, importer, imported):
    assert not protocol_leaks(graph)  # so what is caught is the plant
    assert protocol_leaks(planted(graph, importer, imported))


@pytest.mark.parametrize("importer,imported", [("bench.load", "tests.helpers.servers"),
                                               ("bench", "tests")])
def test_a_planted_bench_import_of_tests_is_caught(graph, importer, imported):
    def violations(g):
        return [line for pair in LAYERS for line in layering_violations(g, *pair)]

    assert not violations(graph)
    assert violations(planted(graph, importer, imported))


@pytest.mark.parametrize("source,caught", [
    ("from cifar10_serving.server.cifar10_v1 import _encode", True),
    ("from tests.test_faults import _wait_for", True),
    ("def f():\n    from bench.load import _percentile", True),
    ("from cifar10_serving.server.cifar10_v1 import source as _source", False),  # a public name, privately bound
    ("from torchvision.io import _image", False),  # not the project's
    ("from cifar10_serving.server import __version__", False),
])
def test_a_planted_underscore_import_is_caught(source, caught):
    assert bool(private_imports("tests.planted", source, set())) is caught
