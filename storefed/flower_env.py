"""The process environment Flower needs here, shared by the coordinator, the merchant agent and simulations.

Flower's SuperLink and SuperNode start helper executables (``flower-superexec``,
``flwr-clientapp``) by name, so this interpreter's bin directory goes first on PATH; runs stay
offline (no runtime dependency installs) and keep Flower's state in a local ``FLWR_HOME``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

_PROCESS_RAY_TOKEN = secrets.token_hex(32)  # this process's Ray token (never written to disk)


def flwr_bin(name: str) -> str:
    """A Flower executable of this interpreter's environment (or from PATH)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env(**extra: str) -> dict[str, str]:
    """The environment for Flower processes: this interpreter's bin directory first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), **extra)


def prepare_simulation_environment(home: Path, cluster: bool = False) -> None:
    """Offline-safe settings for an in-process Flower simulation; ``home`` becomes FLWR_HOME unless set.

    Ray exposure: Ray 2.55 listens on all interfaces and rewrites a 127.0.0.1 node address to the
    machine's own (``ray._private.services.resolve_ip_for_localhost``), so a local simulation cannot
    be bound to loopback. Instead Ray's token authentication is on, with a random token made for
    this process (never written to disk): peers without it are refused by every Ray gRPC server.
    ``cluster``: joining an existing Ray cluster, whose own token this process must already hold
    (simulations/ray_cluster.py); no token is made up then.
    """
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_HOME", str(home))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not cluster:
        os.environ.setdefault("RAY_AUTH_TOKEN", _PROCESS_RAY_TOKEN)  # one per process: Ray's loader caches the first
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
