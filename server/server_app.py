"""The coordinator's Flower ServerApp: one federated run of one task, top to bottom.

Reads as the round does: build the task's model -> strategy from config -> Flower runs the
rounds (clients train under DP in client/) -> replies screened -> aggregated -> per-round
metrics and a global-model checkpoint written to the run directory -> final status.

A run fails loudly: when every sampled merchant fails in a round, or the ServerApp raises,
``status.json`` says ``failed`` with the reason and the exception propagates (Flower may
still report the run as completed; callers check ``status.json``).
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from client.data_source import coordinator_catalog
from client.dataset import Catalog
from models.task import Task, build_task
from privacy.atomic_files import atomic_write_text
from server.checkpoint import save_global_model
from server.run_log import RunLog
from server.screening import RoundScreening
from server.strategy import build_strategy


class RunFailed(RuntimeError):
    """The federated run could not produce a trustworthy model."""


def client_settings(settings: dict, run_dir: Path) -> dict:
    """What every merchant receives each round: task, local training, privacy and data config."""
    privacy = dict(settings["privacy"])
    privacy["ledger_dir"] = privacy.get("ledger_dir") or str(run_dir / "ledgers")
    privacy["planned_rounds"] = privacy.get("planned_rounds") or default_planned_rounds(settings["federation"])
    task = dict(settings["task"], seed=settings["seed"], privacy_unit=privacy.get("unit"))
    local = {k: task.pop(k) for k in ("epochs", "batch_size", "lr", "optimizer") if k in task}
    return {
        "task": task,
        "local": local,
        "privacy": privacy,
        "data": dict(settings["data"], seed=settings["seed"]),
        "device": settings.get("device", "auto"),
        "run_id": run_dir.name,
    }


def default_planned_rounds(federation: dict) -> int:
    """Rounds a merchant plans its noise for: twice its expected participations, at least 2.

    A merchant sampled more often than planned still never exceeds its budget: later rounds
    get the remaining budget or are refused (see client/client_app.py).
    """
    rounds, per_round, stores = (int(federation[k]) for k in ("rounds", "stores_per_round", "num_stores"))
    return min(rounds, max(2, math.ceil(2 * rounds * per_round / stores)))


def run_federation(grid: Grid, settings: dict, run_dir: Path) -> dict:
    """Run all rounds; returns the summary also written to ``summary.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, "running")
    try:
        summary = _run(grid, settings, run_dir)
    except BaseException as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        raise
    write_status(run_dir, "completed")
    return summary


@dataclass(frozen=True)
class RunSetup:
    """What every run path starts from: the merchants' settings, the task and its initial shared tensors."""

    to_clients: dict
    catalog: Catalog
    task: Task
    shared: dict[str, torch.Tensor]  # the freshly initialised model's shared tensors, in task order

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes every merchant update must carry."""
        return {k: tuple(v.shape) for k, v in self.shared.items()}


def prepare_run(settings: dict, run_dir: Path) -> RunSetup:
    """Client settings, catalog, task and initial model for a run (plain, secure or in-process)."""
    to_clients = client_settings(settings, run_dir)
    catalog = coordinator_catalog(to_clients["data"])
    task = build_task(to_clients["task"], catalog)
    model = task.build_model()
    state = model.state_dict()
    return RunSetup(to_clients, catalog, task, {k: state[k] for k in task.shared_keys(model)})


def _run(grid: Grid, settings: dict, run_dir: Path) -> dict:
    setup = prepare_run(settings, run_dir)
    to_clients, catalog, task, shared, expected = (
        setup.to_clients, setup.catalog, setup.task, setup.shared, setup.expected
    )
    privacy = to_clients["privacy"]
    log = RunLog(run_dir, task.name, task.privacy_unit, privacy["accountant"], bool(privacy["enabled"]))

    def on_screened(server_round: int, screening: RoundScreening) -> None:
        log.on_screened(server_round, screening)
        if screening.failed and not (screening.accepted or screening.refused or screening.rejected):
            raise RunFailed(f"round {server_round}: every sampled merchant failed: {next(iter(screening.failed.values()))}")

    strategy = build_strategy(
        settings["strategy"], settings["federation"], expected, on_screened, log.on_round_end, privacy
    )
    config = ConfigRecord({"storefed": json.dumps(to_clients)})
    rounds = int(settings["federation"]["rounds"])
    started, stopped_early = time.time(), None
    try:
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(shared), num_rounds=rounds, train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
        )
    except PrivacyBudgetExhausted as exc:  # client-level budget: stop cleanly, keep what was released
        stopped_early = f"client-level privacy budget exhausted after {len(log.rows)} rounds: {exc}"
        print(f"[{task.name}] STOPPED: {stopped_early}", flush=True)
    latest = strategy.latest_arrays
    final = latest.to_torch_state_dict() if latest is not None and len(latest) else shared
    save_global_model(run_dir, final, to_clients["task"], catalog.num_items)
    summary = {
        "task": task.name,
        "rounds": rounds,
        "rounds_completed": len(log.rows),
        "stopped_early": stopped_early,
        "seconds": round(time.time() - started, 1),
        "final_eval": log.rows[-1] if log.rows else {},
        "privacy": log.privacy_summary(strategy.central.summary() if strategy.central else None),
        "model": str(run_dir / "global_model.safetensors"),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def write_status(run_dir: Path, status: str, error: str | None = None, detail: str | None = None) -> None:
    payload = {"status": status, "time": time.time(), "error": error, "traceback": detail}
    atomic_write_text(run_dir / "status.json", json.dumps(payload, indent=2))


def make_server_app(settings: dict, run_dir: Path) -> ServerApp:
    """A ServerApp bound to resolved settings (used by the simulation runner)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        if settings["privacy"].get("secure_aggregation", False):
            from server.secure_aggregation import run_secure_federation  # imports this module

            run_secure_federation(grid, context, settings, run_dir)
        else:
            run_federation(grid, settings, run_dir)

    return server_app


# Deployment entry point (``flwr run``): the run config names the resolved settings file
# (written by ``storefed server``) and the run directory, both on the coordinator's disk.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings_file = Path(str(context.run_config["settings-file"]))
    if not settings_file.is_file():
        raise RunFailed(f"run config settings-file={settings_file} does not exist: start runs with `storefed server`")
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    run_dir = Path(str(context.run_config["run-dir"]))
    if settings["privacy"].get("secure_aggregation", False):
        from server.secure_aggregation import run_secure_federation  # imports this module

        run_secure_federation(grid, context, settings, run_dir)
    else:
        run_federation(grid, settings, run_dir)
