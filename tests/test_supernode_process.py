"""client/supernode_process.py: a merchant agent's SuperNode never outlives the agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, SMALL_WORLD
from storefed.data.merchant_files import write_catalog, write_merchant_dir
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.flower_env import flower_env
from storefed.simulations.deployment_load import free_ports

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

STUBBORN_CHILD = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('child ready', flush=True); time.sleep(600)")
AGENT = ("import os, sys; from storefed.client.supernode_process import run_supernode; "
         "sys.exit(run_supernode([sys.executable, '-c', sys.argv[1]], dict(os.environ), grace_s=float(sys.argv[2])))")


def _children_of(pid: int, timeout: float = 60.0) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = psutil.Process(pid).children()
        if children:
            return children
        time.sleep(0.2)
    raise AssertionError(f"process {pid} started no child within {timeout} s")


def _gone(process: psutil.Process, timeout: float) -> bool:
    try:
        process.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        return False
    return True


def _agent(child_code: str, grace_s: float) -> subprocess.Popen:
    agent = subprocess.Popen([sys.executable, "-c", AGENT, child_code, str(grace_s)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, env=flower_env(PYTHONPATH=str(ROOT)))
    assert agent.stdout.readline().strip() == "child ready"
    return agent


def test_sigterm_to_storefed_merchant_stops_its_supernode(tmp_path):
    gen = StoreGeneratorConfig(**{**SMALL_WORLD, "mean_customers": 40})
    catalog = generate_catalog(gen)
    write_catalog(catalog, tmp_path / "shop" / "catalog.csv")
    write_merchant_dir(generate_store(gen, 0), catalog, tmp_path / "shop")
    fleet, port = free_ports(2)  # nothing listens on the fleet port: the SuperNode keeps trying to connect
    agent = subprocess.Popen(
        [sys.executable, "-m", "storefed", "merchant", f"data_dir={tmp_path / 'shop'}", f"ledger_dir={tmp_path / 'l'}",
         f"superlink=127.0.0.1:{fleet}", f"port={port}", "insecure=true"],
        cwd=ROOT, env=flower_env(PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        supernode = _children_of(agent.pid)[0]
        assert "flower-supernode" in " ".join(supernode.cmdline())
        time.sleep(2)  # the SuperNode is up and retrying
        os.kill(agent.pid, signal.SIGTERM)  # the agent only, as `kill PID` or systemd would
        assert agent.wait(timeout=60) == 128 + signal.SIGTERM
        assert _gone(supernode, timeout=5), "the SuperNode outlived its merchant agent"
    finally:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_supernode_that_ignores_sigterm_is_killed_after_the_grace_period():
    agent = _agent(STUBBORN_CHILD, grace_s=1.0)
    child = psutil.Process(agent.pid).children()[0]
    start = time.monotonic()
    agent.send_signal(signal.SIGHUP)
    assert agent.wait(timeout=30) == 128 + signal.SIGHUP
    assert _gone(child, timeout=5) and time.monotonic() - start >= 1.0  # it had its grace period first


@linux_only
def test_a_sigkilled_agent_takes_its_supernode_with_it():
    agent = _agent("import time; print('child ready', flush=True); time.sleep(600)", grace_s=1.0)
    child = psutil.Process(agent.pid).children()[0]
    agent.kill()  # no handler runs: the kernel's parent-death signal does the work
    agent.wait(timeout=30)
    assert _gone(child, timeout=10), "the SuperNode outlived a SIGKILLed agent"
