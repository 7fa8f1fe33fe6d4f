"""Safety properties that hold by construction, checked over the source tree:
no pickle-based loading, never trust_remote_code (the import layers: tests/test_layers.py)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("polar_core", "app", "kernels") for p in (ROOT / d).rglob("*.py")] + [ROOT / "app.py"]


def _code(path: Path) -> str:
    # Drop comments and docstring-ish lines that merely *mention* the words.
    return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())


def test_sources_exist():
    assert len(SOURCES) > 10


def test_no_pickle_based_loading():
    pattern = re.compile(r"\btorch\.load\(|\bpickle\.loads?\(|\bjoblib\.load\(|np\.load\([^)]*allow_pickle=True")
    offenders = [str(p) for p in SOURCES if p.exists() and pattern.search(_code(p))]
    assert offenders == []


def test_never_trust_remote_code():
    offenders = [str(p) for p in SOURCES if p.exists() and re.search(r"trust_remote_code\s*=\s*True", _code(p))]
    assert offenders == []
