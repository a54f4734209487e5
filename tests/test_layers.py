"""The import graph matches the layers (docs/architecture.md).

protocol < zpcid.vfio_user < zpcid.pci < zpcid.zpci < zpcid.devices < zpcid.service;
zpcid's top-level helper modules (log, snapshot) sit just above protocol; the
VMM-side toolkit (zpcid.vmm), the tools (zpcid.tools) and the command-line entry
(zpcid.cli) sit on top and are never imported by the daemon. Every import counts,
also one inside a function or under TYPE_CHECKING: a lazy import still couples
the layers. No module may take part in an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("protocol", "zpcid")

# Lower number = lower layer; a module may import its own layer and lower ones.
LAYERS = [
    ("protocol", 0),
    ("zpcid.vfio_user", 2),
    ("zpcid.pci", 3),
    ("zpcid.zpci", 4),
    ("zpcid.devices", 5),
    ("zpcid.service", 6),
    ("zpcid.vmm", 9),
    ("zpcid.tools", 9),
    ("zpcid.cli", 9),
    ("zpcid", 1),  # the package and its shared helpers (log, snapshot)
]
DAEMON = ("zpcid.vfio_user", "zpcid.pci", "zpcid.zpci", "zpcid.devices", "zpcid.service")
APPLICATION = ("zpcid.vmm", "zpcid.tools", "zpcid.cli")

# Known upward edges, each with the reason it is still there.
ALLOWED: set[tuple[str, str]] = {
    # The PCI function still creates its zPCI layer; the abi11 helper replaces
    # this with a narrow attach interface composed from above (issue 11).
    ("zpcid.pci.function", "zpcid.zpci.core"),
    ("zpcid.pci.function", "zpcid.zpci.properties"),
}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> int:
    return next(n for pkg, n in LAYERS if within(module, pkg))


def modules() -> dict[str, Path]:
    found = {}
    for top in TOPS:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                # "from pkg import mod" imports the submodule; "from mod import name" the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.split(".")[0] not in TOPS:
                    continue
                while t not in mods:  # "import a.b.c" of a name inside a module
                    t = t.rpartition(".")[0]
                if t != name:
                    graph[name].add(t)
    return graph


GRAPH = imports(modules())


def test_the_scan_sees_the_tree():
    # Guards the scanner itself: known edges must be found.
    assert "zpcid.vfio_user.endpoint" in GRAPH and "protocol.vfio_user.framing" in GRAPH
    assert "protocol.vfio_user.framing" in GRAPH["zpcid.vfio_user.endpoint"]
    assert "zpcid.vfio_user.server" in GRAPH["zpcid.service.daemon"]


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = sorted((m, t) for m, ts in GRAPH.items() for t in ts
                 if layer(t) > layer(m) and (m, t) not in ALLOWED)
    assert not bad, "upward imports:\n" + "\n".join(f"  {m} -> {t}" for m, t in bad)


def test_protocol_imports_nothing_from_zpcid():
    bad = sorted((m, t) for m, ts in GRAPH.items() if within(m, "protocol")
                 for t in ts if within(t, "zpcid"))
    assert not bad


def test_the_daemon_never_imports_the_vmm_toolkit_or_the_tools():
    bad = sorted((m, t) for m, ts in GRAPH.items() if any(within(m, p) for p in DAEMON)
                 for t in ts if any(within(t, p) for p in APPLICATION))
    assert not bad, bad


def test_allow_list_has_no_stale_entries():
    stale = sorted(e for e in ALLOWED if e[1] not in GRAPH.get(e[0], ()))
    assert not stale, f"edges gone, drop them from ALLOWED: {stale}"


def test_no_import_cycles():
    # (An allow-listed edge is left out: it is the one known way round a cycle.)
    # Tarjan's strongly connected components; any component of 2+ modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v] - {t for m, t in ALLOWED if m == v}):
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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
