"""The public face and the shape of the tree: what users may import, and what keeps the
architecture readable (no import cycle, the core knows no transport, small modules)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import gateway

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
MAX_LINES = 420  # "about 400": a module past this is doing more than one thing

STABLE = {
    "AppPeer",
    "Batch",
    "Bus",
    "Config",
    "ConfigError",
    "GatewayService",
    "IFramer",
    "IPeer",
    "Kind",
    "ListenError",
    "Message",
    "Origin",
    "__version__",
    "load",
    "parse",
}


def test_the_stable_names_are_exported_and_nothing_else():
    assert set(gateway.__all__) == STABLE
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None
    assert sorted(dir(gateway)) == sorted(STABLE)


def test_exports_are_the_real_objects():
    from gateway.core.bus import Bus
    from gateway.server import GatewayService
    from gateway.testing import MemoryGateway

    assert gateway.Bus is Bus
    assert gateway.GatewayService is GatewayService
    assert MemoryGateway.__module__.startswith("gateway.testing")


def test_an_unknown_name_is_an_attribute_error():
    try:
        gateway.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("gateway.NoSuchThing resolved")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """The gateway modules ``path`` imports at run time (anywhere in it; not under
    ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                type_only.add(id(inner))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {
        # A module inside a package may import from it (the package is loaded first).
        name: {dep for dep in _imports(path, known) if not (name + ".").startswith(dep + ".")}
        for name, path in modules.items()
    }
    # Importing a module runs its packages' __init__ first.
    for name in list(graph):
        for deps in list(graph[name]):
            parts = deps.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in known and parent != name and not name.startswith(parent + "."):
                    graph[name].add(parent)
    return graph


def test_no_import_cycles():
    graph = _graph()
    # gateway/__init__ loads its exports lazily (module __getattr__), at first use.
    graph["gateway"] = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_core_imports_no_transport():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("gateway.core"):
            outside = {
                d
                for d in deps
                if not d.startswith(("gateway.core", "gateway.config")) and d != "gateway"
            }
            assert not outside, f"{name} imports {outside}"


def test_the_load_generator_loads_nothing_of_the_server():
    code = "import gateway.bench, sys; print(sorted(m for m in sys.modules if m.startswith(('twisted', 'autobahn'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_is_much_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_packaging_lists_every_package():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {
        ".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")
    }
    assert listed == packages | {"twisted.plugins"}
    assert (ROOT / "twisted" / "plugins" / "gateway_plugin.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
