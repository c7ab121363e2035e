"""The package's layering: arrows point one way (core -> training -> commands).

Read statically with ``ast``, imports inside functions included: the library never imports its
command line, no module imports another that (directly or not) imports it back, and every
layer family registers its layers one way. A fresh interpreter shows what building a network
loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, fresh_interpreter_env

PACKAGE = ROOT / "jaxbp"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The jaxbp modules ``name`` imports, anywhere in its source (late imports too)."""
    path = MODULES[name]
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(
                (base[: len(base) - node.level + 1] if node.level else [])
                + ([node.module] if node.module else [])
            )
            # "from . import compiled" names a submodule, not the package being imported
            submodules = [f"{module}.{a.name}" for a in node.names]
            named = [m for m in submodules if m in MODULES]
            candidates = named if len(named) == len(submodules) else [module, *named]
        else:
            continue
        found.update(c for c in candidates if c in MODULES and c != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _is_command_line(name: str) -> bool:
    return name == "jaxbp.cli" or name == "jaxbp.commands" or name.startswith("jaxbp.commands.")


def test_the_import_graph_is_read():
    # The reader must see real edges, or the tests below would pass on an empty graph.
    assert "jaxbp.registry" in GRAPH["jaxbp.layers"]
    assert "jaxbp.training.progress" in GRAPH["jaxbp.commands.train"]  # a late import
    assert {"jaxbp.layers", "jaxbp.registry"} <= GRAPH["jaxbp.model"]


def test_the_library_never_imports_its_command_line():
    offenders = {
        name: sorted(filter(_is_command_line, targets))
        for name, targets in GRAPH.items()
        if not _is_command_line(name) and any(map(_is_command_line, targets))
    }
    assert offenders == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycles_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    # jaxbp/__init__.py re-exports the public names and is imported first by any submodule, so
    # the edges into it say nothing about order; a submodule must never name it.
    graph = {name: targets - {"jaxbp"} for name, targets in GRAPH.items()}
    assert _cycles(graph) == []
    assert sorted(name for name, targets in GRAPH.items() if "jaxbp" in targets) == []


def _calls_register_layer(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_layer"
        for node in ast.walk(tree)
    )


def test_every_layer_family_registers_the_same_way():
    """``register_layer`` imported from the registry at the top of the module, called at
    module level at its bottom: no late import, no import below code (``noqa: E402``), no
    registering function."""
    families = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if name == "jaxbp.registry" or not _calls_register_layer(tree):
            continue
        families.append(name)
        top_imports = [
            node
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            and node.module == "registry"
            and any(a.name == "register_layer" for a in node.names)
        ]
        assert top_imports, f"{name}: register_layer is not imported from the registry at the top"
        first_code = next(
            i
            for i, node in enumerate(tree.body)
            if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr))
        )
        late = [
            node.lineno
            for node in tree.body[first_code:]
            if isinstance(node, (ast.Import, ast.ImportFrom))
        ]
        assert late == [], f"{name}: imports below code at lines {late}"
        registering_functions = [
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and _calls_register_layer(node)
        ]
        assert registering_functions == [], f"{name}: registers inside {registering_functions}"
    assert {"jaxbp.layers", "jaxbp.conv", "jaxbp.attention", "jaxbp.interop"} <= set(families)


def _loaded_after(code: str) -> list[str]:
    """The jaxbp modules loaded after running ``code`` in a fresh interpreter."""
    script = code + (
        "\nimport json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'jaxbp')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=fresh_interpreter_env(),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_building_a_network_loads_no_fault_injection_and_no_command_line():
    loaded = _loaded_after(
        "import jaxbp\n"
        "jaxbp.serial(jaxbp.Dense(2))\n"
        "jaxbp.build({'name': 'serial', 'layers': [{'name': 'Dense', 'out_dim': 2}]})\n"
        "import jaxbp.training"
    )
    assert "jaxbp.layers" in loaded and "jaxbp.training.session" in loaded
    assert "jaxbp.faults" not in loaded
    assert [m for m in loaded if _is_command_line(m)] == []
