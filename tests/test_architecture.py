"""ARCHITECTURE.md against the code: its table names every module of every package, and no
module imports a package the table places above its own.

The oracle is the document, read as a reader reads it (the table's rows, bottom to top), and
each module's imports, read with ``ast`` (lazy imports inside functions included): neither is
derived from the other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stuseg"


def _table() -> list[tuple[str, set[str]]]:
    """The table's rows in order: (package folder, or "" for the top level; its modules)."""
    rows = []
    for line in (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        package = cells[0].strip("`").split("`")[0].rstrip("/")
        modules = set(re.findall(r"`([a-z_]+)`", cells[1]))
        rows.append(("" if package == "stuseg" else package, modules))
    return rows


def _modules_on_disk(package: str) -> set[str]:
    folder = PACKAGE / package if package else PACKAGE
    return {p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__")}


def test_the_table_names_every_module_of_every_package() -> None:
    rows = _table()
    assert len(rows) >= 10
    documented: dict[str, set[str]] = {}
    for package, modules in rows:  # the top level has a row at each of its modules' layers
        assert not documented.get(package, set()) & modules, f"a module of {package or 'stuseg'} twice"
        documented.setdefault(package, set()).update(modules)
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(documented) - {""} == folders
    for package, modules in documented.items():
        assert modules == _modules_on_disk(package), f"ARCHITECTURE.md's rows for {package or 'stuseg'}"


def _rank() -> dict[str, int]:
    """Module (dotted, below stuseg) -> its row's place in the table, bottom = 0."""
    rank = {}
    for place, (package, modules) in enumerate(_table()):
        for module in modules:
            rank[f"{package}.{module}" if package else module] = place
    return rank


def _owner(dotted: str, rank: dict[str, int]) -> str | None:
    """The table entry a ``stuseg....`` import names: a module, or a package (its first module's row)."""
    parts = dotted.split(".")[1:]
    if not parts:
        return None  # ``from stuseg import __version__``: the package's own metadata
    if len(parts) >= 2 and f"{parts[0]}.{parts[1]}" in rank:
        return f"{parts[0]}.{parts[1]}"
    if parts[0] in rank:
        return parts[0]
    package_rows = [k for k in rank if k.startswith(parts[0] + ".")]
    return package_rows[0] if package_rows else None


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stuseg":
            if node.module == "stuseg":  # from stuseg import batch, ...: each name may be a module
                names += [f"stuseg.{a.name}" for a in node.names]
            else:
                names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "stuseg"]
    return names


MODULES = sorted(
    p
    for p in PACKAGE.rglob("*.py")
    if p.stem not in ("__init__", "__main__") and "nnunet_trainers" not in p.parts
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_package_above_its_own(path: Path) -> None:
    rank = _rank()
    relative = path.relative_to(PACKAGE).with_suffix("")
    me = ".".join(relative.parts)
    if me.startswith("_"):
        return  # the old paths' finder names every module by design
    upward = []
    for name in _imports(path):
        owner = _owner(name, rank)
        if owner is not None and owner != me and rank[owner] > rank[me]:
            upward.append(name)
    assert upward == [], f"{me} (row {rank[me]}) imports what the table places above it"
