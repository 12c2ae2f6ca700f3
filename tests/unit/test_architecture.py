"""The layout rules of docs/architecture.md, checked on the code as it is.

- product code (``gateway/``, ``python_backend/``) imports nothing that lives under ``tools/``,
  and ``python_backend/`` imports nothing of ``gateway/``;
- no import cycles between product modules, counting every import (``TYPE_CHECKING`` blocks
  and imports inside functions included);
- no product module over 400 lines, no product function over 60 lines;
- route handlers are module-level functions, not closures.

The checks read the source with ``ast``; the tests on small synthetic trees show they catch
what they are meant to catch.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("gateway", "python_backend")
#: the import name of the tooling package that lives under tools/
TOOLING = "rtinfer"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
ROUTE_DECORATORS = {"get", "post", "put", "patch", "delete", "api_route", "websocket"}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Module]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            out[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return out


def imported(module: Module) -> Iterator[str]:
    """Every module name ``module`` imports, wherever the import statement is."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def resolve(name: str, known: dict[str, Module]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, module in known.items():
        deps = {resolve(i, known) for i in imported(module)} - {None, name}
        # importing a submodule runs its packages' __init__: not a dependency of the code
        graph[name] = {d for d in deps if d is not None and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def oversized(known: dict[str, Module], root: Path) -> list[str]:
    out = []
    for module in known.values():
        lines = module.path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            out.append(f"{module.path.relative_to(root)}: {lines} lines")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    where = module.path.relative_to(root)
                    out.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    return out


def nested_routes(known: dict[str, Module]) -> list[str]:
    """Route handlers defined inside another function (closures over the app's state)."""
    out = []
    for module in known.values():
        for outer in ast.walk(module.tree):
            if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(outer):
                if inner is outer or not isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for deco in inner.decorator_list:
                    call = deco.func if isinstance(deco, ast.Call) else deco
                    if isinstance(call, ast.Attribute) and call.attr in ROUTE_DECORATORS:
                        out.append(f"{module.name}: {outer.name} defines route {inner.name}")
    return out


@pytest.fixture(scope="module")
def product() -> dict[str, Module]:
    return modules(ROOT, PRODUCT)


def test_product_code_imports_nothing_from_tools(product: dict[str, Module]) -> None:
    offenders = sorted(
        f"{m.name} imports {i}"
        for m in product.values()
        for i in imported(m)
        if i == TOOLING or i.startswith(TOOLING + ".")
    )
    assert not offenders
    assert not any((ROOT / "tools" / p).exists() for p in PRODUCT)


def test_python_backend_imports_nothing_of_the_gateway(product: dict[str, Module]) -> None:
    offenders = sorted(
        f"{m.name} imports {i}"
        for m in product.values()
        if m.name.startswith("python_backend")
        for i in imported(m)
        if i == "gateway" or i.startswith("gateway.")
    )
    assert not offenders


def test_no_import_cycles(product: dict[str, Module]) -> None:
    assert cycles(import_graph(product)) == []


def test_no_oversized_modules_or_functions(product: dict[str, Module]) -> None:
    assert oversized(product, ROOT) == []


#: modules that assemble the subpackages: the settings tree (each package declares its section,
#: ``config.py`` the gateway section with its async part) and ``python -m gateway``
ASSEMBLY_POINTS = {"gateway.settings", "gateway.config", "gateway.__main__"}


def package_of(module: str) -> str:
    """``gateway.<sub>`` for a module of a subpackage, else its top-level package."""
    parts = module.split(".")
    if parts[0] == "gateway" and len(parts) > 2:
        return ".".join(parts[:2])
    if parts[0] == "gateway" and len(parts) == 2 and (ROOT / "gateway" / parts[1]).is_dir():
        return module
    return parts[0]


def test_packages_are_layered(product: dict[str, Module]) -> None:
    """Between packages, imports go one way only (docs/architecture.md, "Packages")."""
    graph: dict[str, set[str]] = {}
    for module, deps in import_graph(product).items():
        if module in ASSEMBLY_POINTS:
            continue
        source = package_of(module)
        graph.setdefault(source, set()).update(
            package_of(d) for d in deps if package_of(d) != source
        )
    assert cycles(graph) == []


def test_route_handlers_are_module_level(product: dict[str, Module]) -> None:
    assert nested_routes(product) == []


# ----------------------------------------------------------------- the checks themselves


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return modules(tmp_path, ("pkg",))


def test_a_cycle_through_type_checking_and_function_imports_is_found(tmp_path: Path) -> None:
    known = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n"
            ),
            "pkg/b.py": "def f():\n    from pkg import c\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": "from pkg.a import x\n",
        },
    )
    assert cycles(import_graph(known)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_package_importing_its_submodule_is_not_a_cycle(tmp_path: Path) -> None:
    known = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import x\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/m.py": "",
        },
    )
    assert cycles(import_graph(known)) == []


def test_long_functions_modules_and_closure_routes_are_reported(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    known = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/long.py": "def long():\n" + body,
            "pkg/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
            "pkg/routes.py": (
                "def build(router):\n    @router.get('/x')\n    def x():\n        pass\n"
            ),
        },
    )
    reported = oversized(known, tmp_path)
    assert any("long.py:1 long: 61 lines" in r for r in reported)
    assert any(r.startswith("pkg/big.py: 401 lines") for r in reported)
    assert nested_routes(known) == ["pkg.routes: build defines route x"]
