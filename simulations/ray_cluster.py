"""Where a simulation's virtual merchants run: a private local Ray (``start_local``) or an existing Ray
cluster (``federation.ray_address``, ``connect``).

Both start Ray here, before Flower would, to give its workers one runtime environment: this
interpreter's import path and the console settings. Flower's backend then uses this Ray session.
(A worker start-up hook importing the merchant stack early was tried and measured: it made every round
slower, 3.1-3.8 s -> 9-16 s per round of 10 merchants on 2 cores, so it is not used.)

Scale-out: one machine's cores bound how many virtual merchants train at once; a Ray cluster adds
machines. ``ray start --head`` on one machine and ``ray start --address=HEAD:PORT`` on the others, with
the same Python environment (StoreFed installed at the same path) on every node, then
``storefed simulate federation.ray_address=HEAD:PORT``. Flower's Ray backend places one ClientApp actor
per ``federation.client_cpus`` CPUs (and ``client_gpus``) anywhere in the cluster.

Exposure: Ray's ports accept whoever can reach them unless token authentication is on. StoreFed's
private local Ray always runs with a random per-process token (storefed/flower_env.py); a cluster must
be started with ``RAY_AUTH_MODE=token`` and a token, and this process needs the same token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Both are checked before
connecting, with one clear error each.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from storefed.config.validate import ray_address_problem
from storefed.console import SIMULATED_ENV, VERBOSE_ENV, verbose_requested

TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class ClusterError(RuntimeError):
    """The Ray cluster cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the run is placed on (printed and written to ``<run_dir>/ray_cluster.json``)."""

    address: str
    nodes: int
    cpus: float
    gpus: float

    def line(self) -> str:
        return (f"Ray cluster at {self.address}: {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs "
                "(token authentication on)")

    def as_dict(self) -> dict:
        return asdict(self)


def split_address(address: str) -> tuple[str, int]:
    """``host`` and ``port`` of a Ray head's GCS address (checked by ``ray_address_problem`` first)."""
    problem = ray_address_problem(address)
    if problem:
        raise ClusterError(f"federation.ray_address={address} {problem}")
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _token_available() -> bool:
    return any(os.environ.get(name) for name in TOKEN_SOURCES) or (Path.home() / ".ray" / "auth_token").is_file()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """The head answers on its port, and this process has a Ray token (before Ray starts anything)."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise ClusterError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: StoreFed joins only clusters with Ray token "
                           "authentication (RAY_AUTH_MODE=token), whose ports refuse peers without the token")
    if not _token_available():
        raise ClusterError(f"federation.ray_address={address}: no Ray token in this process; export the cluster's "
                           "token as RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH), the one its `ray start` was given")
    if address == "auto":
        return
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(f"federation.ray_address={address}: no Ray head answers there ({exc.strerror or exc}); "
                           "start one with `ray start --head --port PORT` or fix the address") from None


def _runtime_env() -> dict:
    """The job's runtime environment: import path and console settings."""
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), SIMULATED_ENV: "1",
                VERBOSE_ENV: "1" if verbose_requested() else "0"}
    return {"env_vars": env_vars}


def start_local() -> None:
    """A private Ray on this machine for one run (no dashboard; token authentication from
    storefed/flower_env.py); Flower shuts it down when the run ends."""
    import ray

    ray.init(logging_level="error", log_to_driver=True, include_dashboard=False, runtime_env=_runtime_env())


def connect(address: str) -> ClusterInfo:
    """Join the cluster at ``address`` (Flower's Ray backend then uses this connection). The cluster's
    workers were started by ``ray start``, not by this process: the console settings and this
    interpreter's import path reach them through the job's runtime environment."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "token"
    check_reachable(address)
    try:
        ray.init(address=address, logging_level="error", log_to_driver=True, runtime_env=_runtime_env())
    except Exception as exc:  # Ray raises several types (ConnectionError, AuthenticationError, RuntimeError)
        raise ClusterError(f"federation.ray_address={address}: could not join the Ray cluster: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterInfo(address, nodes, float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0)))


def stop_ray() -> None:
    """Leave this process's Ray session (a private Ray stops; a cluster keeps running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
