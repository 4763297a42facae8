"""Scale-out: the same simulation on an existing multi-node Ray cluster (federation.ray_address).

The cluster is real: a head and a second node started with `ray start` on 127.0.0.1, token
authentication on, one CPU each, so Flower's two ClientApp actors (one per CPU) sit on both nodes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_WORLD
from storefed.simulations.deployment_load import free_ports

RAY = str(Path(sys.executable).with_name("ray"))
SMALL = ["federation.num_stores=6", "federation.stores_per_round=2", "federation.eval_stores_per_round=2",
         "federation.rounds=2", "task.epochs=1"] + [f"data.generator.{k}={v}" for k, v in SMALL_WORLD.items()]


def _storefed(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storefed", *args], capture_output=True, text=True, timeout=600,
                          env=dict(env, PYTHONPATH=str(ROOT)), cwd=cwd)


def _nodes(address: str, env: dict) -> int:
    status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, env=env, timeout=60)
    return sum(line.strip().startswith("1 node_") for line in status.stdout.splitlines())


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-node Ray cluster on loopback (head + one more node, 1 CPU each), torn down with its process groups."""
    (port,) = free_ports(1)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "token",
                                                                             "RAY_AUTH_TOKEN": token}
    temp = tempfile.mkdtemp(prefix="sfray", dir="/tmp")  # Ray's socket paths must stay short
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    procs = [subprocess.Popen([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                               "--include-dashboard=false", f"--temp-dir={temp}", *common], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 120
        while _nodes(address, env) < 1:
            assert time.time() < deadline and procs[0].poll() is None, "the Ray head did not start"
            time.sleep(1)
        procs.append(subprocess.Popen([RAY, "start", f"--address={address}", *common], env=env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while _nodes(address, env) < 2:
            assert time.time() < deadline and procs[1].poll() is None, "the second Ray node did not join"
            time.sleep(1)
        yield address, env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_simulation_runs_on_an_existing_two_node_ray_cluster(ray_cluster, tmp_path):
    address, env = ray_cluster
    run_dir = tmp_path / "run"
    done = _storefed("simulate", *SMALL, f"federation.ray_address={address}", f"run_dir={run_dir}", env=env,
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"on the Ray cluster at {address}: 2 node(s), 2 CPUs, 0 GPUs (token authentication on)" in done.stdout
    assert json.loads((run_dir / "ray_cluster.json").read_text()) == {"address": address, "nodes": 2, "cpus": 2.0,
                                                                       "gpus": 0.0}
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["trained"] == 2 for r in rows)
    assert "StoreFed merchant" not in done.stdout + done.stderr  # the console settings reached the cluster's workers
    assert _nodes(address, env) == 2, "the run leaves the cluster running"


def test_a_cluster_that_cannot_be_used_is_refused_before_anything_is_written(tmp_path):
    (nobody,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    cases = [
        (f"127.0.0.1:{nobody}", {"RAY_AUTH_TOKEN": "x" * 64}, 1, "no Ray head answers there"),
        (f"127.0.0.1:{nobody}", {}, 1, "no Ray token in this process; export the cluster's token as RAY_AUTH_TOKEN"),
        ("10.0.0.5", {}, 2, "federation.ray_address='10.0.0.5' is not allowed: must be host:port of the Ray head"),
        ("ray://10.0.0.5:10001", {}, 2, "is a Ray Client address"),
    ]
    for address, extra, code, message in cases:
        run_dir = tmp_path / "run"
        done = _storefed("simulate", *SMALL, f"federation.ray_address={address}", f"run_dir={run_dir}",
                         env=env | extra, cwd=tmp_path)
        assert done.returncode == code and message in done.stderr, (address, done.returncode, done.stderr[-2000:])
        assert not run_dir.exists(), "nothing is written for a cluster that cannot be used"
