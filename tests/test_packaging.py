"""The project installs as a package that finds its own data, and the lock
agrees with what a Space installs."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside the unpacked wheel, from a directory that is not the checkout:
# every asset must be found through the installed package.
FIND_ASSETS = r"""
import json, sys
from pathlib import Path
import polar_core, app.handlers as handlers
from polar_core.study import tasks, router, redundancy
from polar_core.engine.cpu import packed
assert not Path(polar_core.__file__).is_relative_to(sys.argv[1]), polar_core.__file__
assert len(tasks.load_suite("capitals")) > 10
assert (router.default_router_path("smollm2-135m-instruct") / "model.safetensors").is_file()
assert redundancy.load_redundancy("smollm2-135m-instruct") is not None
assert packed.SOURCE.is_file()
assert json.loads(handlers.learn_file("smollm2-135m-instruct").read_text())
assert handlers.learn_examples("gemma3-270m")
print("ok")
"""


def test_an_installed_wheel_finds_its_assets(tmp_path):
    """Guards paths built from __file__/..: an installed package has no checkout around it."""
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for part in ("polar_core", "app", "kernels"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("polar_explorer-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = subprocess.run([sys.executable, "-c", FIND_ASSETS, str(ROOT)], cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


def _pins(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    return dict(line.lower().split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_requirements_txt_pins_the_locked_versions():
    locked, space = _pins("requirements.lock"), _pins("requirements.txt")
    assert space, "requirements.txt pins nothing"
    assert {name: locked.get(name) for name in space} == space


def test_every_locked_requirement_is_exact():
    for name in ("requirements.lock", "requirements.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"{name}: {line!r} is not exact"


def test_pyproject_ranges_admit_the_locked_versions():
    import tomllib
    from packaging.requirements import Requirement

    locked = _pins("requirements.lock")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in dependencies:
        req = Requirement(line)
        version = locked[req.name.lower()]
        assert req.specifier.contains(version), f"pyproject's {line!r} excludes the locked {version}"
