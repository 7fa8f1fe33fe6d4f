"""The layers contract: imports point down, never up.

    app            may import polar_core and kernels
    polar_core.study   may import polar_core.engine, program, limits, assets, kernels
    polar_core.engine  may import program, limits, assets; never study or app
    kernels        imports nothing of polar_core (kernels know nothing of models)

Checked on the source (every import statement, also inside functions), so
adding a forbidden import fails here naming the file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> prefixes it must never import
FORBIDDEN = {
    "polar_core": ("app", "gradio"),
    "polar_core.engine": ("polar_core.study", "polar_core.cli"),
    "polar_core.study": ("polar_core.cli",),
    "kernels": ("polar_core", "app", "gradio"),
}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from x import module`
    return found


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for package, banned in FORBIDDEN.items():
        folder = root / package.replace(".", "/")
        for path in sorted(folder.rglob("*.py")):
            for line, module in imports_of(path, root):
                for prefix in banned:
                    if module == prefix or module.startswith(prefix + "."):
                        out.append(f"{path.relative_to(root)}:{line} imports {module} ({package} must not import {prefix})")
    return sorted(set(out))


def test_imports_point_down():
    assert violations() == []


@pytest.mark.parametrize("package, module, line", [
    ("polar_core/engine", "polar_core.study.tasks", "from polar_core.study.tasks import build_prompt"),
    ("polar_core/engine", "polar_core.study", "from polar_core.study import tasks"),
    ("polar_core/study", "app.handlers", "import app.handlers"),
    ("kernels", "polar_core.program", "from polar_core.program import Program"),
    ("polar_core/engine/cpu", "polar_core.study.analysis", "from ...study import analysis"),
])
def test_a_forbidden_import_is_caught(tmp_path, package, module, line):
    """The contract test itself can fail: plant a forbidden import in a copy of the tree."""
    for part in ("polar_core", "kernels", "app"):
        (tmp_path / part).mkdir()
    target = tmp_path / package / "planted.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"def f():\n    {line}\n")
    found = violations(tmp_path)
    assert len(found) >= 1 and all("planted.py:2" in v for v in found), found
