"""Packages meet only through public interfaces: no module of one package imports a private
module or name (a dotted component starting with ``_``) of another package, or anything from
another package's ``tests/`` folder.

Read from the source with ``ast`` (nothing is imported), over every module of every package's
``src/`` and ``tests/`` under ``packages/`` and ``examples/``. Imports inside one package are its
own business and are not checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.parent for p in [*ROOT.glob("packages/*/src"), *ROOT.glob("examples/*/src")])


@dataclass(frozen=True)
class Package:
    folder: Path
    imports: frozenset[str]  # top-level import names under src/
    test_modules: frozenset[str]  # module names a tests/ folder offers on sys.path

    @property
    def name(self) -> str:
        return self.folder.name


def _package(folder: Path) -> Package:
    src = folder / "src"
    imports = {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
    imports |= {p.stem for p in src.glob("*.py")}
    tests = folder / "tests"
    test_modules = {p.stem for p in tests.glob("*.py")} | {"tests"} if tests.is_dir() else set()
    return Package(folder, frozenset(imports), frozenset(test_modules))


PACKAGES = [_package(f) for f in FOLDERS]


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not (part.startswith("__") and part.endswith("__"))
               for part in dotted.split("."))


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every absolute import, ``from a.b import c`` giving ``a.b.c``,
    and of ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _violations(own: Package, packages: list[Package] = PACKAGES) -> list[str]:
    others = [p for p in packages if p is not own]
    out = []
    for part in ("src", "tests"):
        for path in sorted((own.folder / part).rglob("*.py")):
            where = path.relative_to(own.folder.parent.parent)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, dotted in _imported(tree):
                top = dotted.split(".")[0]
                owner = next((p for p in others if top in p.imports), None)
                if owner is not None and _private(dotted):
                    out.append(f"{where}:{line}: imports {dotted}, private to {owner.name}")
                # a name only another package's tests/ folder provides (own tests/ may use its own)
                mine = own.test_modules if part == "tests" else frozenset()
                holder = next((p for p in others if top in p.test_modules), None)
                if holder is not None and top not in mine and top not in own.imports:
                    out.append(f"{where}:{line}: imports {dotted} from {holder.name}/tests")
    return out


def test_every_package_is_found():
    assert {p.name for p in PACKAGES} >= {"medsiglip", "medgemma-core", "medgemma-data",
                                          "medgemma-demo", "medgemma-ultrasound"}
    assert all(p.imports for p in PACKAGES)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_private_or_test_imports_across_packages(package):
    violations = _violations(package)
    assert not violations, "\n".join(violations)


def test_the_check_finds_what_it_forbids(tmp_path):
    """The checker itself, on two made-up packages: each forbidden form is reported and the
    allowed ones (public names, own private modules, own tests helpers) are not."""
    for name, module in (("pkg-a", "pkg_a"), ("pkg-b", "pkg_b")):
        (tmp_path / name / "src" / module).mkdir(parents=True)
        (tmp_path / name / "src" / module / "__init__.py").write_text("")
        (tmp_path / name / "tests").mkdir()
    (tmp_path / "pkg-b" / "tests" / "b_helpers.py").write_text("")
    (tmp_path / "pkg-a" / "src" / "pkg_a" / "use.py").write_text(
        "from __future__ import annotations\n"
        "import pkg_b\n"
        "from pkg_b import public, __version__\n"
        "from pkg_a import _mine\n"
        "from pkg_b._impl import thing\n"
        "import pkg_b.sub._helpers\n"
        "from pkg_b.sub import _hidden\n"
        "import importlib\n"
        "importlib.import_module('pkg_b._lazy')\n"
        "from b_helpers import make\n")
    fake = [_package(tmp_path / "pkg-a"), _package(tmp_path / "pkg-b")]
    found = [v.split(": ", 1)[1] for v in _violations(fake[0], fake)]
    assert found == ["imports pkg_b._impl.thing, private to pkg-b",
                     "imports pkg_b.sub._helpers, private to pkg-b",
                     "imports pkg_b.sub._hidden, private to pkg-b",
                     "imports pkg_b._lazy, private to pkg-b",
                     "imports b_helpers.make from pkg-b/tests"]
