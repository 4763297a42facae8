"""StoreFed installs as one top-level name, ``storefed``, with its presets as package data.

The wheel is built from this checkout and installed (not editable) into a target directory; the
installed package then runs a federated simulation from an empty directory outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_WORLD


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600, cwd=build,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("storefed-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_the_distribution_has_exactly_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"storefed"}
    (info,) = dist_info
    top_level = zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split()
    assert top_level == ["storefed"]


def test_presets_and_the_flower_app_are_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("storefed/conf/data/amazon.yaml", "storefed/conf/privacy/none.yaml",
                 "storefed/conf/federation/deployment.yaml", "storefed/flower_app/pyproject.toml",
                 "storefed/server/server_app.py", "storefed/client/client_app.py", "storefed/data/schema.py"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "server/", "client/", "benchmarks/", "examples/")) for n in names)


def _run_installed(installed: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(installed), PYTHONSAFEPATH="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_installed_package_simulates_from_an_empty_directory(installed, tmp_path):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    where = _run_installed(installed, empty, "-c", "import storefed.server.server_app as m, storefed.conf as c; "
                           "print(m.__file__); print(list(c.__path__)[0])")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(str(installed)) for line in where.stdout.split()), where.stdout
    shadow = _run_installed(installed, empty, "-c", "import server")
    assert shadow.returncode != 0 and "No module named 'server'" in shadow.stderr
    world = [f"data.generator.{k}={v}" for k, v in SMALL_WORLD.items()]
    done = _run_installed(installed, empty, "-m", "storefed", "simulate", "federation.num_stores=4",
                          "federation.stores_per_round=2", "federation.rounds=1", "task.epochs=1", *world)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (empty / "runs").glob("*-recommender")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "global_model.safetensors").exists() and (run_dir / "config.yaml").exists()
    assert not any(installed.rglob("status.json")), "a run wrote into the installed package"
