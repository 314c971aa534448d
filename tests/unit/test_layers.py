"""The house's import rules (docs/architecture.md), read from the source: every import statement, at module
level or inside a function, of every module of a package."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"contract", "inference", "export_jobs", "serve_app"}
HEAVY = {"ray", "torch", "tensorflow", "transformers", "fastapi", "starlette", "tf2onnx", "onnx"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of what `path` imports (relative imports resolve to its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package it lives in
                names.add(path.relative_to(ROOT).parts[0])
            elif node.module:
                names.add(node.module)
    return names


def violations(package: str, allowed_ours: set[str], banned: set[str], exempt: set[str] = frozenset(),
               root: Path = ROOT) -> list[str]:
    """'file: module' for each import in `package` of one of our packages outside `allowed_ours` or of a
    `banned` third-party package; files in `exempt` (paths relative to root) may import any of ours."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        rel = str(path.relative_to(root))
        for module in imported_modules(path) if root == ROOT else _imports_under(path, root):
            top = module.split(".")[0]
            if top in OURS and top not in allowed_ours and rel not in exempt:
                found.append(f"{rel}: {module}")
            elif top in banned:
                found.append(f"{rel}: {module}")
    return found


def _imports_under(path: Path, root: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(path.relative_to(root).parts[0] if node.level else node.module or "")
    return names


def test_contract_imports_nothing_of_ours_and_no_framework():
    assert violations("contract", {"contract"}, HEAVY | {"numpy", "onnxruntime", "tokenizers"}) == []


def test_inference_imports_only_the_contract_and_onnx_runtime():
    assert violations("inference", {"contract", "inference"}, HEAVY) == []


def test_export_jobs_never_imports_serve_app():
    assert violations("export_jobs", {"contract", "inference", "export_jobs"}, set()) == []


def test_serve_app_reaches_export_jobs_from_the_app_builder_only():
    assert violations("serve_app", {"contract", "inference", "serve_app"}, {"torch", "tensorflow", "transformers"},
                      exempt={"serve_app/app.py"}) == []


def test_the_routes_and_in_process_backends_never_import_ray():
    """The HTTP contract runs without Ray (tests/unit/test_routes.py): only the remote backends, the build specs
    and the deployments reach it."""
    ours = {"contract", "inference", "serve_app"}
    assert violations("serve_app/http", ours, {"ray", "torch", "tensorflow", "transformers"}) == []
    for name in ("base", "embedding", "generation"):
        path = ROOT / "serve_app" / "backends" / f"{name}.py"
        assert "ray" not in {module.split(".")[0] for module in imported_modules(path)}, path
    code = ("import sys, serve_app.http.routes, serve_app.backends.embedding, serve_app.backends.generation; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_a_broken_rule_is_caught(tmp_path):
    """The checker itself: a runtime module that imports torch inside a function, and one that reaches into the
    serving package, are both reported."""
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "bad.py").write_text("def f():\n    import torch\n    from serve_app import app\n")
    (tmp_path / "inference" / "good.py").write_text("import numpy\nfrom . import bad\nfrom contract import errors\n")
    found = violations("inference", {"contract", "inference"}, HEAVY, root=tmp_path)
    assert found == ["inference/bad.py: serve_app", "inference/bad.py: torch"] or \
        sorted(found) == ["inference/bad.py: serve_app", "inference/bad.py: torch"]


@pytest.mark.parametrize("module", ["inference.textgen", "inference.encoder", "inference.string_encoder",
                                    "serve_app.deployments.generator", "serve_app.deployments.embedder",
                                    "serve_app.deployments.ingress", "serve_app.http.routes"])
def test_serving_modules_load_without_torch_tensorflow_or_transformers(module):
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
