"""Imports point downward: kernels are pure, only execution/ talks to Parsl or processes."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lsst_prod"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level and node.module:
                out.add("." * node.level + node.module.split(".")[0])
    return out


def test_kernels_are_pure():
    forbidden = {"parsl", "yaml", "sqlalchemy", "subprocess", "fitsio", "pyarrow"}
    for path in (PKG / "algorithms").glob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.name} imports {bad}: kernels take arrays, not files, SQL or processes"
        assert not any(i.startswith("..") and i[2:] in {"stages", "execution", "repo", "provenance", "graph"}
                       for i in _imports(path)), f"{path.name} imports upward"


def test_only_execution_imports_parsl_or_subprocess():
    for path in PKG.rglob("*.py"):
        if path.parent.name == "execution":
            continue
        bad = _imports(path) & {"parsl", "subprocess"}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}; keep it in lsst_prod/execution"


def test_only_config_reads_yaml():
    for path in PKG.rglob("*.py"):
        if path.parent.name == "config":
            continue
        assert "yaml" not in _imports(path), f"{path.relative_to(PKG)} reads YAML; use lsst_prod.config"
