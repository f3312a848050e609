"""``models`` must never import ``assim`` (DESIGN.md §1)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_models_never_imports_assim():
    files = sorted((ROOT / "models").rglob("*.py"))
    assert files, "models/ has no modules"
    offenders = [str(f.relative_to(ROOT)) for f in files if "assim" in _imports(f)]
    assert offenders == []


def test_the_ast_check_detects_an_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom assim.obs import Observation\n")
    assert "assim" in _imports(bad)
