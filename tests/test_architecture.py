"""The package's shape: imports point down (no cycle, the import-linter contract in
pyproject.toml kept), function-local imports only for heavy optional dependencies and each with
its reason, small modules, a small public face."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import gpconv
from import_graph import cycles, imports, modules

ROOT = Path(__file__).resolve().parents[1]


def test_import_graph_has_no_cycle():
    assert cycles(imports()) == []


def test_function_local_imports_are_few_and_explained():
    import ast

    local = []
    for mod, path in modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        local.append((mod, node.lineno, lines[node.lineno - 1]))
    intra = [e for e in imports() if e.local]
    assert len(intra) <= 10, intra
    unexplained = [f"{m}:{n}: {text.strip()}" for m, n, text in local if "#" not in text]
    assert unexplained == []


def test_import_linter_contract_is_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_modules_are_small():
    sizes = {mod: len(path.read_text().splitlines()) for mod, path in modules().items()}
    assert max(sizes.values()) <= 500, max(sizes.items(), key=lambda kv: kv[1])


def test_public_face_is_small_and_real():
    assert len(gpconv.__all__) <= 16
    for name in gpconv.__all__:
        assert getattr(gpconv, name) is not None


def test_moved_names_still_resolve_with_a_warning():
    from gpconv.surgery import count_parameters

    with pytest.warns(DeprecationWarning, match="gpconv.count_parameters moved to gpconv.surgery"):
        assert gpconv.count_parameters is count_parameters
    with pytest.raises(AttributeError):
        gpconv.no_such_name  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpconv.shrink  # noqa: B018  (the public names do not warn)
