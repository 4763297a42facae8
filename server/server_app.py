"""The coordinator's Flower ServerApp: one federated run of one task, top to bottom.

Reads as the round does: build the task's model (run_setup.py) -> strategy from config
(strategy.py) -> Flower runs the rounds (merchants train under DP in storefed.client) -> replies
screened (screening.py) -> aggregated -> per-round metrics (run_log.py) and the global model
(checkpoint.py) written to the run directory -> final status.

A run fails loudly: when every sampled merchant fails in a round, when no merchant trained in
any round, or when the ServerApp raises, ``status.json`` says ``failed`` with the reason and the
exception propagates (Flower may still report the run as completed; callers check ``status.json``).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from storefed.atomic_files import atomic_write_text
from storefed.config.schema import RunConfig, ServerRunConfig
from storefed.config.serialize import from_dict
from storefed.console import setup_console
from storefed.models.saved_model import save_global_model
from storefed.server.checkpoint import (
    Checkpoint,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from storefed.server.progress import ProgressGrid, RoundDisplay, make_display
from storefed.server.run_log import RunLog, budget_summary
from storefed.server.run_setup import RunFailed, check_someone_trained, prepare_run, round_config, write_status
from storefed.server.screening import RoundScreening
from storefed.server.secure_aggregation import run_secure_federation
from storefed.server.strategy import build_strategy
from storefed.server.warm_up import save_warm_up, warm_actors


def run_federation(grid: Grid, settings: RunConfig, run_dir: Path, display: RoundDisplay | None = None) -> dict:
    """Run all rounds; returns the summary also written to ``summary.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, "running")
    try:
        summary = _run(grid, settings, run_dir, display)
    except BaseException as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        raise
    write_status(run_dir, "completed")
    return summary


def _run(grid: Grid, settings: RunConfig, run_dir: Path, display: RoundDisplay | None) -> dict:
    setup = prepare_run(settings, run_dir)
    to_clients, catalog, task, shared = setup.to_clients, setup.catalog, setup.task, setup.shared
    privacy = to_clients.privacy
    log = RunLog(run_dir, task.name, task.privacy_unit, privacy.accountant, privacy.enabled, display=display,
                 budgets=budget_summary(privacy))
    resumed = load_checkpoint(run_dir) if settings.resume else None
    done = resumed.server_round if resumed else 0
    initial = resumed.model if resumed else shared
    trained, refusals = (resumed.trained if resumed else 0), []
    if settings.resume:
        log.resume(done, resumed.merchant_epsilon if resumed else {})

    def on_screened(server_round: int, screening: RoundScreening) -> None:
        nonlocal trained
        log.on_screened(server_round, screening)
        trained += len(screening.accepted)
        refusals.extend(screening.refused.values())
        if screening.failed and not (screening.accepted or screening.refused or screening.rejected):
            raise RunFailed(f"round {server_round}: every sampled merchant failed: {next(iter(screening.failed.values()))}")

    def on_round_end(server_round: int, train: dict | None, evaluate: dict | None) -> None:
        log.on_round_end(server_round, train, evaluate)
        latest = strategy.latest_arrays
        model = latest.to_torch_state_dict() if latest is not None and len(latest) else initial
        save_checkpoint(run_dir, Checkpoint(server_round, model, strategy_state(strategy.inner),
                                            strategy.central.state() if strategy.central else None,
                                            dict(log.merchant_epsilon), trained))

    strategy = build_strategy(
        settings.strategy, settings.federation, expected=setup.expected, on_screened=on_screened,
        on_round_end=on_round_end, privacy_cfg=settings.privacy, round_offset=done,
    )
    if resumed:
        restore_strategy_state(strategy.inner, resumed.strategy_state)
        if strategy.central and resumed.central:
            strategy.central.restore(resumed.central)
    config = ConfigRecord(to_clients.to_record())
    rounds = settings.federation.rounds
    started, stopped_early = time.time(), None
    log.start(rounds)
    if done:
        log.note(f"[{task.name}] resumed after round {done} of {rounds} (checkpoint in {run_dir / 'checkpoint'})")
    try:
        if rounds > done:
            strategy.start(
                grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds - done,
                timeout=float(settings.federation.round_timeout_s), train_config=config,
                evaluate_config=ConfigRecord(dict(config)),
            )
    except PrivacyBudgetExhausted as exc:  # client-level budget: stop cleanly, keep what was released
        stopped_early = f"client-level privacy budget exhausted after {len(log.rows)} rounds: {exc}"
        log.note(f"[{task.name}] STOPPED: {stopped_early}")
    if stopped_early is None:
        check_someone_trained(rounds, trained, [str(r) for r in refusals])
    latest = strategy.latest_arrays
    final = latest.to_torch_state_dict() if latest is not None and len(latest) else initial
    saved = save_global_model(run_dir, final, to_clients.task, catalog.num_items, task)
    summary = {
        "task": task.name,
        "rounds": rounds,
        "rounds_completed": len(log.rows),
        "resumed_after_round": done if settings.resume else None,
        "stopped_early": stopped_early,
        "seconds": round(time.time() - started, 1),
        "final_eval": log.rows[-1] if log.rows else {},
        "privacy": log.privacy_summary(strategy.central.summary() if strategy.central else None),
        **saved,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def run_configured(grid: Grid, context: Context, settings: RunConfig, run_dir: Path, warm_up_actors: int = 0) -> None:
    """The plain or the SecAgg+ federation (``privacy.secure_aggregation``; always for ``privacy.mode=distributed``).

    ``warm_up_actors`` (simulation): that many Ray actors are warmed before round 1 (server/warm_up.py)."""
    torch.set_num_threads(1)
    display = make_display()
    if warm_up_actors > 0:
        config = ConfigRecord(round_config(settings, run_dir).to_record())
        warmed = warm_actors(grid, config, min(warm_up_actors, settings.federation.num_stores),
                             float(settings.federation.round_timeout_s))
        save_warm_up(run_dir, warmed)
        display.note(warmed.line())
    grid = ProgressGrid(grid, display.exchange)
    try:
        if settings.privacy.secure_aggregation or settings.privacy.mode == "distributed":
            run_secure_federation(grid, context, settings, run_dir, display)
        else:
            run_federation(grid, settings, run_dir, display)
    finally:
        display.close()


def make_server_app(settings: RunConfig, run_dir: Path, warm_up_actors: int = 0) -> ServerApp:
    """A ServerApp bound to a composed configuration (used by the simulation runner)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_configured(grid, context, settings, run_dir, warm_up_actors)

    return server_app


setup_console()  # the deployment's flwr-serverapp process: one handler, Flower's INFO lines off unless -v

# Deployment entry point (``flwr run``): the run config names the settings file (written by
# ``storefed server``, storefed.config.serialize) and the run directory, on the coordinator's disk.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings_file = Path(str(context.run_config["settings-file"]))
    if not settings_file.is_file():
        raise RunFailed(f"run config settings-file={settings_file} does not exist: start runs with `storefed server`")
    settings = from_dict(ServerRunConfig, json.loads(settings_file.read_text(encoding="utf-8")))
    run_configured(grid, context, settings, Path(str(context.run_config["run-dir"])))
