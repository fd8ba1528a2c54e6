"""The built wheel: only the `xsam` package (profiles inside it), the console scripts, dependency ranges
that take newer patches; installed into a bare folder it runs the workflow's plan from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"xsam-convert", "xsam-train", "xsam-evaluate", "xsam-tune", "xsam-run", "xsam-predict",
           "xsam-import-original"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # setuptools' build folder outside the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=build, capture_output=True)
    (whl,) = out.glob("xsam-*.whl")
    return whl


def test_wheel_holds_only_the_package_with_its_profiles_and_scripts(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        metadata = z.read(meta).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"xsam"}, f"only the xsam package is installed, not {sorted(tops - {'xsam'})}"
    assert {"xsam/profiles/local.yaml", "xsam/profiles/paper.yaml", "xsam/pipelines/full_run.py"} <= set(names)
    scripts = {line.split("=")[0].strip() for line in entry_points.splitlines() if "=" in line}
    assert SCRIPTS <= scripts
    from packaging.requirements import Requirement

    reqs = {r.name: r for r in (Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                                if line.startswith("Requires-Dist:"))}
    assert reqs["torch"].specifier.contains("2.14.2") and reqs["torchvision"].specifier.contains("0.29.2")


def test_installed_wheel_finds_its_profiles_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import xsam.pipelines.full_run as f, sys; print(f.__file__); sys.exit(f.main(['--dry-run']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(str(site)), "the installed copy ran, not the checkout"
    assert "[plan] profile 'local'" in proc.stdout
    assert (site / "bin" / "xsam-run").exists()
