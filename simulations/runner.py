"""`storefed simulate`: many virtual merchants on one machine with the Flower Simulation Engine (Ray).

The same ServerApp and ClientApp as a deployment run; only the transport differs. Resources:
``federation.client_cpus`` CPUs (default 1) and ``federation.client_gpus`` GPU fraction per
virtual client, on a private local Ray or on an existing cluster (``federation.ray_address``,
simulations/ray_cluster.py). Memory grows with concurrent clients, not with the number of stores: stores
are generated when their client needs them.

Success is read from the run's own ``status.json``, never from Flower's exit status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from storefed.atomic_files import atomic_write_text
from storefed.config.schema import RunConfig
from storefed.config.serialize import to_dict
from storefed.console import setup_console
from storefed.flower_env import prepare_simulation_environment
from storefed.server.run_setup import RunFailed, check_run_dir
from storefed.server.server_app import make_server_app
from storefed.simulations import flower_engine
from storefed.simulations.checks import check_run
from storefed.simulations.ray_cluster import ClusterError, connect, start_local, stop_ray


def resolve_run_dir(run_dir: str | None, name: str) -> Path:
    """``run_dir`` when given, else ``./runs/<time>-<name>`` under the current directory."""
    if run_dir:
        return Path(run_dir).resolve()
    return (Path.cwd() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}").resolve()


def simulate(settings: RunConfig) -> dict:
    """Run one simulated federation; returns the run summary. Raises RunFailed on a failed run."""
    check_run(settings)
    from flwr.simulation import run_simulation

    from storefed.client.client_app import app as client_app

    run_dir = resolve_run_dir(settings.run_dir, settings.task.name)
    check_run_dir(settings, run_dir)  # a used run dir needs resume=true; a resume needs a resumable one
    federation = settings.federation
    prepare_simulation_environment(run_dir.parent / ".flwr", cluster=federation.ray_address is not None)
    cluster = None
    if federation.ray_address is not None:  # before anything is written: an unreachable cluster loses nothing
        try:
            cluster = connect(federation.ray_address)
        except ClusterError as exc:
            raise RunFailed(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(settings), sort_keys=False))
    if cluster is not None:
        atomic_write_text(run_dir / "ray_cluster.json", json.dumps(cluster.as_dict(), indent=2))
    setup_console(simulated_merchants=True)  # the run's table speaks for the merchants; -v shows their lines
    flower_engine.install()  # a round's cost independent of the fleet size (simulations/flower_engine.py)
    if cluster is None:
        start_local()  # token authentication on (storefed/flower_env.py: Ray cannot be bound to loopback)
    backend_config = {"client_resources": {"num_cpus": federation.client_cpus, "num_gpus": federation.client_gpus}}
    print(f"StoreFed simulation: {federation.num_stores} stores, {federation.stores_per_round} per round, "
          f"{federation.rounds} rounds, task={settings.task.name}, run dir {run_dir}", flush=True)
    if cluster is not None:
        print(f"  on the {cluster.line()}", flush=True)
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    actors = pool_size_from_resources(backend_config["client_resources"])  # Flower's own count of its actor pool
    try:
        run_simulation(
            server_app=make_server_app(settings, run_dir, warm_up_actors=actors if federation.warm_up else 0),
            client_app=client_app,
            num_supernodes=federation.num_stores,
            backend_config=backend_config,
        )
    except Exception as exc:  # Flower wraps ServerApp errors; status.json holds the real reason
        if not (run_dir / "status.json").exists():
            raise RunFailed(f"simulation failed before the ServerApp started: {exc}") from exc
    finally:
        stop_ray()  # Flower shuts Ray down after a run; not after every failure
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text(encoding="utf-8")) if status_file.exists() else {}
    if status.get("status") != "completed":
        raise RunFailed(f"run in {run_dir} did not complete: {status.get('error') or 'no status written'}")
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
