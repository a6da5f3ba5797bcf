"""Dependencies inside ``lightning_tokens/`` run one way: no import circle, not even one closed by an import
inside a function (Python resolves those late, so they run, but they tie the two modules into one).

Every ``import``/``from ... import`` of a package module anywhere in a file is an edge, except under
``if TYPE_CHECKING:``. ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``;
a package's ``__init__`` is the module ``a.b``, so a submodule importing names from its own package's
``__init__`` that re-exports it closes a circle like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path
from textwrap import dedent

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of ``root/package``."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node of ``tree`` outside ``if TYPE_CHECKING:`` bodies (their ``else`` counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = [child for child in children if child not in node.body]
        stack.extend(children)


def import_graph(root: Path, package: str) -> nx.DiGraph:
    """Modules of ``root/package`` and their imports of each other; each edge has the ``lines`` importing it."""
    files = module_files(root, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: one level is the module's own package
                    anchor = own_package.split(".")[:len(own_package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in set(targets) & files.keys():
                lines = graph.edges[name, target]["lines"] if graph.has_edge(name, target) else []
                graph.add_edge(name, target, lines=sorted({*lines, node.lineno}))
    return graph


def import_cycles(graph: nx.DiGraph) -> list[str]:
    """One line per circle (a strongly connected component of several modules, or a module importing
    itself): its modules and each import inside it, as ``module:line -> module``."""
    circles = [sorted(component) for component in nx.strongly_connected_components(graph) if len(component) > 1]
    circles += [[node] for node, _ in nx.selfloop_edges(graph)]
    report = []
    for modules in sorted(circles):
        inside = graph.subgraph(modules)
        edges = ", ".join(f"{a}:{line} -> {b}" for a, b, lines in sorted(inside.edges(data="lines")) for line in lines)
        report.append(f"{' <-> '.join(modules)} ({edges})")
    return report


def test_no_import_circle_in_the_package():
    cycles = import_cycles(import_graph(ROOT, "lightning_tokens"))
    assert not cycles, "import circles in lightning_tokens/:\n" + "\n".join(cycles)


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))


def test_the_check_finds_function_level_relative_and_package_circles(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.sub.a import A\n",
        "pkg/core.py": "import pkg.core\n",  # a self-edge
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "from . import b\nA = 1\n",  # relative: an edge to the module pkg.sub.b
        "pkg/sub/b.py": "def f():\n    from ..sub.a import A\n    return A\n",  # function level, two levels up
        "pkg/sub/c.py": "from pkg import other\n",  # pkg.other is a module: no edge to pkg/__init__
        "pkg/other.py": "from pkg import core\n",
        "pkg/uses_init.py": "from pkg import A\n",  # a name of pkg/__init__: an edge to pkg, not a circle
    })
    graph = import_graph(tmp_path, "pkg")
    assert set(graph.edges) == {("pkg", "pkg.sub.a"), ("pkg.core", "pkg.core"), ("pkg.sub.a", "pkg.sub.b"),
                                ("pkg.sub.b", "pkg.sub.a"), ("pkg.sub.c", "pkg.other"),
                                ("pkg.other", "pkg.core"), ("pkg.uses_init", "pkg")}
    assert import_cycles(graph) == ["pkg.core (pkg.core:1 -> pkg.core)",
                                    "pkg.sub.a <-> pkg.sub.b (pkg.sub.a:1 -> pkg.sub.b, pkg.sub.b:2 -> pkg.sub.a)"]


def test_the_check_skips_type_checking_imports_and_sees_a_package_init_circle(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": """\
            from typing import TYPE_CHECKING
            import typing
            if TYPE_CHECKING:
                from pkg.b import B
            if typing.TYPE_CHECKING:
                import pkg.b
            else:
                import pkg.c
            A = 1
            """,
        "pkg/b.py": "from pkg.a import A\n",
        "pkg/c.py": "from pkg import A\n",  # a submodule using its own package's __init__, which imports a
    })
    graph = import_graph(tmp_path, "pkg")
    assert not graph.has_edge("pkg.a", "pkg.b")
    assert import_cycles(graph) == ["pkg <-> pkg.a <-> pkg.c (pkg:1 -> pkg.a, pkg.a:8 -> pkg.c, pkg.c:1 -> pkg)"]
