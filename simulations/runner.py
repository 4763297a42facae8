"""`storefed simulate`: many virtual merchants on one machine with the Flower Simulation Engine (Ray).

The same ServerApp and ClientApp as a deployment run; only the transport differs. Resources:
``federation.client_cpus`` CPUs (default 1) and ``federation.client_gpus`` GPU fraction per
virtual client. Memory grows with concurrent clients, not with the number of stores: stores
are generated when their client needs them.

Success is read from the run's own ``status.json``, never from Flower's exit status.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from privacy.delta_check import check_simulation_delta
from privacy.central_dp import check_privacy_options
from server.server_app import RunFailed, make_server_app


def prepare_environment(project_root: Path) -> None:
    """Offline-safe Flower settings: no runtime dependency installs, a project-local Flower home."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_HOME", str(project_root / ".flwr"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def resolve_run_dir(settings: dict, project_root: Path) -> Path:
    if settings.get("run_dir"):
        return Path(settings["run_dir"]).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (project_root / "runs" / f"{stamp}-{settings['task']['name']}").resolve()


def check_settings(settings: dict) -> None:
    data, federation = settings["data"], settings["federation"]
    if data["source"] != "virtual" and int(federation["num_stores"]) != int(data["num_merchants"]):
        raise ValueError(
            f"federation.num_stores={federation['num_stores']} but data.num_merchants={data['num_merchants']}: "
            "with imported data every merchant is one virtual store; set both to the same number"
        )
    if settings["task"]["name"] == "review" and data["source"] == "movielens":
        raise ValueError("MovieLens u.data has no review text: use task=recommender with data=movielens")
    check_privacy_options(settings["privacy"], settings["strategy"].get("name", "fedavg"), int(federation["num_stores"]))
    check_simulation_delta(settings)  # delta below 1/n at the smallest imported merchant
    if settings["privacy"].get("secure_aggregation", False):
        from server.secure_aggregation import secagg_options

        secagg_options(settings["privacy"], federation)  # unusable SecAgg+ combinations: refused before Ray starts


def simulate(settings: dict, project_root: Path) -> dict:
    """Run one simulated federation; returns the run summary. Raises RunFailed on a failed run."""
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app

    check_settings(settings)
    prepare_environment(project_root)
    run_dir = resolve_run_dir(settings, project_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    federation = settings["federation"]
    backend_config = {
        "client_resources": {"num_cpus": int(federation["client_cpus"]), "num_gpus": float(federation["client_gpus"])},
        "init_args": {"logging_level": "error", "log_to_driver": True, "include_dashboard": False},
    }
    print(f"StoreFed simulation: {federation['num_stores']} stores, {federation['stores_per_round']} per round, "
          f"{federation['rounds']} rounds, task={settings['task']['name']}, run dir {run_dir}", flush=True)
    try:
        run_simulation(
            server_app=make_server_app(settings, run_dir),
            client_app=client_app,
            num_supernodes=int(federation["num_stores"]),
            backend_config=backend_config,
        )
    except Exception as exc:  # Flower wraps ServerApp errors; status.json holds the real reason
        if not (run_dir / "status.json").exists():
            raise RunFailed(f"simulation failed before the ServerApp started: {exc}") from exc
    status = json.loads((run_dir / "status.json").read_text(encoding="utf-8")) if (run_dir / "status.json").exists() else {}
    if status.get("status") != "completed":
        raise RunFailed(f"run in {run_dir} did not complete: {status.get('error') or 'no status written'}")
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
