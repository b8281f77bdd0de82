"""The package's shape: no import cycle anywhere, the layers contract holds, every subpackage says what it is."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import xlora

SRC = Path(xlora.__file__).resolve().parent


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("xlora", exclude_type_checking_imports=True)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert cycles(graph) == [["p.a", "p.b"]]


def test_core_never_imports_an_upper_layer():
    graph = grimp.build_graph("xlora", exclude_type_checking_imports=True)
    upper = ["xlora.formats", "xlora.bases", "xlora.train", "xlora.serve", "xlora.science", "xlora.cli"]
    for layer in upper:
        assert not graph.chain_exists(importer="xlora.core", imported=layer, as_packages=True), layer


def test_every_subpackage_has_a_one_line_docstring():
    for init in SRC.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{init.relative_to(SRC)}: expected a one-line docstring"


def test_the_formats_layer_registered_the_checkpoint_functions():
    """The core reaches the formats layer only through register_checkpoint_io (round trips: tests/formats)."""
    from xlora.core import model
    from xlora.formats import checkpoint

    assert model._CHECKPOINT_IO == {"load": checkpoint.load_checkpoint, "save": checkpoint.save_checkpoint}
