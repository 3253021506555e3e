"""The architecture as a test: imports run one way, down the layers; there is no import cycle
anywhere in confpy/; nothing in the runtime reaches the development tools (docs/architecture.md).

The layers, bottom to top (a module imports its own layer and those below, never one above):

    0  errors, durations, builtin, model, wire, and the package itself (`confpy/__init__.py`)
    1  config
    2  registry
    3  watch, render
    4  apply
    5  pipeline
    6  daemon                        (0-6 are the runtime: what the daemon and `--once` run)
    7  admin, dev                    the shells: `confpy upstream ...`; dev-consul, lab, demo
    8  cli                           the command line, which reaches the shells by lazy imports
    9  __main__                      `python -m confpy`

Every import counts: at module level, inside a function (lazy: it runs when the function is called,
and is a dependency all the same), relative (`from . import x`) and `from confpy import x` where x
is a submodule. For the cycle check an import under `if TYPE_CHECKING:` is left out (it never runs);
a lazy one is not, since a cycle hidden in a function is still a cycle in the design.

The checker is a few functions over module sources, so the tests below feed it small synthetic
packages as well as the real one: each rule is shown to fail when it should.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "confpy"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS: dict[str, int] = {
    "": 0, "errors": 0, "durations": 0, "boundedjson": 0, "builtin": 0, "model": 0, "wire": 0, "retry": 0, "timer": 0, "settings": 0,
    "config": 1, "config_doc": 1,
    "registry": 2,
    "watch": 3, "render": 3, "guard": 3,
    "apply": 4,
    "pipeline": 5,
    "plan": 5,
    "daemon": 6,
    "admin": 7, "dev": 7,
    "cli": 8,
    "__main__": 9,
}  # fmt: skip
RUNTIME_TOP = LAYERS["daemon"]
DEV = f"{PACKAGE}.dev"


@dataclass(frozen=True)
class Source:
    """One module's text, and whether it is a package's `__init__.py`."""

    text: str
    is_package: bool = False


@dataclass(frozen=True)
class Import:
    """One import of a package module by another, resolved to the module it loads."""

    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function: runs when the function is called
    type_checking: bool  # under `if TYPE_CHECKING:`: for the type checker only, never runs

    def __str__(self) -> str:
        how = " (under TYPE_CHECKING)" if self.type_checking else " (in a function)" if self.lazy else ""
        return f"{self.importer}:{self.line} imports {self.imported}{how}"


def read_package(root: Path, package: str = PACKAGE) -> dict[str, Source]:
    """Every module under `root`, by its dotted name (a package by its own name, from its `__init__.py`)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Source(path.read_text(encoding="utf-8"), is_package)
    return modules


def resolve(name: str, modules: Collection[str]) -> str | None:
    """The module `name` loads: itself, else its closest enclosing package among `modules`; None outside them."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _from_base(importer: str, source: Source, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative forms (`from ..x import y`) included."""
    if not node.level:
        return node.module or ""
    package = importer.split(".") if source.is_package else importer.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def imports_of(importer: str, source: Source, modules: Collection[str]) -> list[Import]:
    """The imports of `modules` that `importer`'s source makes, wherever they stand in it."""
    found: list[Import] = []

    def add(name: str, node: ast.stmt, lazy: bool, type_checking: bool) -> None:
        imported = resolve(name, modules)
        if imported is not None and imported != importer:
            found.append(Import(importer, imported, node.lineno, lazy, type_checking))

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy, type_checking)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(importer, source, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node, lazy, type_checking)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, type_checking)
            return
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(ast.parse(source.text, filename=importer), False, False)
    return found


def package_imports(modules: Mapping[str, Source]) -> list[Import]:
    """Every import among `modules`."""
    return [imp for name, source in sorted(modules.items()) for imp in imports_of(name, source, modules)]


def layer_of(module: str, layers: Mapping[str, int] = LAYERS) -> int | None:
    """The layer of a module, from the first part of its name below the package; None when it has none."""
    parts = module.split(".")
    return layers.get(parts[1] if len(parts) > 1 else "")


def unlayered(modules: Iterable[str], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """The modules the layer table does not place."""
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_imports(imports: Iterable[Import], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """The imports of a layer above the importer's (TYPE_CHECKING ones too: the dependency is real)."""
    wrong = []
    for imp in imports:
        importer, imported = layer_of(imp.importer, layers), layer_of(imp.imported, layers)
        if importer is not None and imported is not None and imported > importer:
            wrong.append(str(imp))
    return wrong


def _graph(imports: Iterable[Import]) -> dict[str, set[str]]:
    """Who imports whom, among the imports that run (TYPE_CHECKING ones left out)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.type_checking:
            graph.setdefault(imp.importer, set()).add(imp.imported)
            graph.setdefault(imp.imported, set())
    return graph


def _path(graph: Mapping[str, set[str]], start: str, goal: Collection[str], within: Collection[str]) -> list[str]:
    """The shortest path of imports from `start` (not counting it as reached) to a module of `goal`."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for nxt in sorted(graph[module]):
                if nxt not in within or nxt in parents:
                    continue
                parents[nxt] = module
                if nxt in goal:
                    path = [nxt]
                    while path[-1] != start or len(path) == 1:
                        path.append(parents[path[-1]])
                    return path[::-1]
                following.append(nxt)
        frontier = following
    return []


def cycles(imports: Iterable[Import]) -> list[list[str]]:
    """One cycle per strongly connected group of modules, as `a, b, ..., a`; none when imports run one way."""
    graph = _graph(imports)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for nxt in sorted(graph[module]):
            if nxt not in index:
                connect(nxt)
                low[module] = min(low[module], low[nxt])
            elif nxt in stack:
                low[module] = min(low[module], index[nxt])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return sorted(_path(graph, group[0], {group[0]}, set(group)) for group in groups)


def runtime_reaching_dev(imports: Iterable[Import], layers: Mapping[str, int] = LAYERS) -> list[str]:
    """Each runtime module from which imports that run (module-level or in a function) reach `confpy.dev`."""
    graph = _graph(imports)
    dev = {m for m in graph if m == DEV or m.startswith(DEV + ".")}
    found = []
    for module in sorted(graph):
        layer = layer_of(module, layers)
        if layer is not None and layer <= RUNTIME_TOP and (path := _path(graph, module, dev, set(graph))):
            found.append(" -> ".join(path))
    return found


# --- the real package --------------------------------------------------------------------------

MODULES = read_package(ROOT)
IMPORTS = package_imports(MODULES)


def test_the_reader_sees_the_whole_package_and_its_lazy_imports() -> None:
    """Guards the checks below against reading nothing: the shells and the dev tools are nodes, and
    the CLI's lazy imports of the dev tools and of the admin commands are found as lazy."""
    assert {"confpy", "confpy.__main__", "confpy.cli", "confpy.admin.etcd", "confpy.dev.lab"} <= MODULES.keys()
    assert "confpy.dev.devconsul.server" in MODULES and MODULES["confpy.dev"].is_package
    lazy = {(i.importer, i.imported) for i in IMPORTS if i.lazy}
    assert {("confpy.cli", "confpy.dev.demo"), ("confpy.cli", "confpy.dev.devconsul.server")} <= lazy
    assert ("confpy.cli", "confpy.admin.command") in lazy


def test_every_module_has_a_layer() -> None:
    assert unlayered(MODULES) == []


def test_imports_run_down_the_layers() -> None:
    """A module imports only its own layer and those below; nothing in the runtime imports cli, admin or dev."""
    assert upward_imports(IMPORTS) == []


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(IMPORTS) == []


def test_the_runtime_never_reaches_the_dev_tools() -> None:
    assert runtime_reaching_dev(IMPORTS) == []


# --- the checker, shown to fail on small synthetic packages --------------------------------------


def synthetic(**modules: str) -> list[Import]:
    """The imports of a made-up confpy: keyword `daemon__page` is module `confpy.daemon.page`;
    a package's `__init__` is given by its own name and marked by a trailing `__` (`dev__`)."""
    sources = {}
    for key, text in modules.items():
        is_package = key.endswith("__")
        parts = [part for part in key.removesuffix("__").split("__") if part]
        sources[".".join([PACKAGE, *parts])] = Source(text, is_package)
    sources.setdefault(PACKAGE, Source("", True))
    return package_imports(sources)


CYCLES = {
    "module level, `from confpy import x`": (
        {
            "config": "from confpy.model import X\n",
            "model": "import confpy.errors\n",
            "errors": "from confpy import model\n",
        },
        [["confpy.errors", "confpy.model", "confpy.errors"]],
    ),
    # The shape admin.py and admin_etcd.py had: one side imports the other inside a function.
    "through a function-level import": (
        {
            "admin__": "",
            "admin__consul": "def run():\n    from confpy.admin import etcd\n    return etcd\n",
            "admin__etcd": "from confpy.admin.consul import NGINX_TAG\n",
        },
        [["confpy.admin.consul", "confpy.admin.etcd", "confpy.admin.consul"]],
    ),
    "through relative imports, over three modules": (
        {
            "daemon__": "",
            "daemon__page": "from .status import Snapshot\nfrom ..model import X\n",
            "daemon__status": "from . import timeline\n",
            "daemon__timeline": "from .page import Page\n",
            "model": "",
        },
        [["confpy.daemon.page", "confpy.daemon.status", "confpy.daemon.timeline", "confpy.daemon.page"]],
    ),
}


@pytest.mark.parametrize(("modules", "expected"), CYCLES.values(), ids=CYCLES.keys())
def test_a_cycle_is_found_and_listed(modules: dict[str, str], expected: list[list[str]]) -> None:
    assert cycles(synthetic(**modules)) == expected


def test_a_type_checking_only_import_makes_no_cycle() -> None:
    imports = synthetic(
        daemon__page="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from confpy.daemon.status import S\n",
        daemon__status=(
            "import typing\nfrom confpy.daemon.page import Page\n"
            "if typing.TYPE_CHECKING:\n    pass\nelse:\n    from confpy.daemon import page\n"
        ),
    )
    assert cycles(imports) == []
    checked = {(i.importer, i.imported, i.type_checking) for i in imports}
    assert ("confpy.daemon.page", "confpy.daemon.status", True) in checked
    assert ("confpy.daemon.status", "confpy.daemon.page", False) in checked  # the `else:` runs


# A runtime module that imports a dev tool inside a function; the CLI, a shell, may.
DEV_IN_A_FUNCTION = {
    "dev__": "",
    "dev__lab": "from confpy.config import split_host_port\n",
    "apply__live": "def probe():\n    from confpy.dev.lab import free_port\n    return free_port()\n",
    "cli": "def main():\n    from confpy.dev import lab\n",
    "config": "",
}

UPWARD = {
    "a layer above (a downward one is allowed)": (
        {
            "config": "from confpy.daemon.loop import Daemon\n",
            "daemon__loop": "from confpy.config import Config\nfrom confpy import pipeline\n",
            "pipeline": "",
        },
        ["confpy.config:1 imports confpy.daemon.loop"],
    ),
    "a shell, even for types or in a function": (
        {
            "daemon__status": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from confpy.cli import X\n",
            "render": "def f():\n    from confpy.admin import common\n",
            "admin__common": "",
            "cli": "",
        },
        [
            "confpy.daemon.status:3 imports confpy.cli (under TYPE_CHECKING)",
            "confpy.render:2 imports confpy.admin.common (in a function)",
        ],
    ),
    "a dev tool, in a function": (DEV_IN_A_FUNCTION, ["confpy.apply.live:2 imports confpy.dev.lab (in a function)"]),
}


@pytest.mark.parametrize(("modules", "expected"), UPWARD.values(), ids=UPWARD.keys())
def test_an_import_of_a_layer_above_is_refused(modules: dict[str, str], expected: list[str]) -> None:
    assert upward_imports(synthetic(**modules)) == expected


DEV_REACHED = {
    "in a function": (DEV_IN_A_FUNCTION, ["confpy.apply.live -> confpy.dev.lab"]),
    # However it is reached: `from confpy import dev` loads the package.
    "through a middle module": (
        {
            "dev__": "from confpy.dev import lab\n",
            "dev__lab": "",
            "watch": "def f():\n    from confpy import dev\n",
            "render": "import confpy.watch\n",
        },
        ["confpy.render -> confpy.watch -> confpy.dev", "confpy.watch -> confpy.dev"],
    ),
}


@pytest.mark.parametrize(("modules", "expected"), DEV_REACHED.values(), ids=DEV_REACHED.keys())
def test_the_runtime_reaching_the_dev_tools_is_refused(modules: dict[str, str], expected: list[str]) -> None:
    assert runtime_reaching_dev(synthetic(**modules)) == expected


@pytest.mark.parametrize(
    ("text", "imported"),
    [
        ("from confpy import __version__\n", "confpy"),
        ("from confpy import dev\n", "confpy.dev"),
        ("from confpy.dev import lab as L\n", "confpy.dev.lab"),
        ("import confpy.dev.lab as L\n", "confpy.dev.lab"),
        ("from confpy.dev.lab import *\n", "confpy.dev.lab"),
        ("from ..dev import lab\n", "confpy.dev.lab"),
        ("from ..dev.lab import free_port\n", "confpy.dev.lab"),
        ("from . import dev\n", "confpy.dev"),
    ],
)
def test_every_form_of_import_is_resolved_to_the_module_it_loads(text: str, imported: str) -> None:
    importer = "admin__x" if text.startswith("from ..") else "cli"
    imports = synthetic(**{importer: text}, admin__="", dev__="", dev__lab="")
    expected = "confpy.admin.x" if importer == "admin__x" else "confpy.cli"
    assert [(i.importer, i.imported) for i in imports] == [(expected, imported)]


def test_a_module_outside_the_layer_table_is_reported() -> None:
    assert unlayered(["confpy.model", "confpy.plugins.x", "confpy"]) == ["confpy.plugins.x"]


def test_no_class_of_the_daemon_is_over_300_lines() -> None:
    """The daemon stays in small parts (each timer-driven concern its own object): a class that
    grows past 300 lines is doing more than one job."""
    daemon = ROOT / "daemon"
    sizes = {
        f"{path.name}:{node.name}": (node.end_lineno or node.lineno) - node.lineno + 1
        for path in sorted(daemon.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    assert sizes and all(size > 0 for size in sizes.values())
    assert {name: size for name, size in sizes.items() if size > 300} == {}
