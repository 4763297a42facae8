"""End-to-end simulations with the Flower Simulation Engine (Ray), run as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL_WORLD
from storefed.privacy.accounting import epsilon_of

SMALL = [
    "federation.num_stores=6",
    "federation.stores_per_round=3",
    "federation.eval_stores_per_round=3",
    "federation.rounds=2",
] + [f"data.generator.{k}={v}" for k, v in SMALL_WORLD.items()]


def _storefed(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "storefed", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def test_small_simulation_runs_end_to_end_and_writes_its_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    done = _storefed("simulate", *SMALL, f"run_dir={run_dir}", "task.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["trained"] + r["refused"] == 3 for r in rows), done.stdout[-3000:]
    assert all(0.0 <= r["eval_hr@10"] <= 1.0 and "eval_sampled100_hr@10" in r for r in rows)
    assert (run_dir / "metrics.csv").read_text().startswith("round,")
    assert "federation:" in (run_dir / "config.yaml").read_text()
    from storefed.models.saved_model import load_global_model

    weights, config = load_global_model(run_dir)
    assert config["task"]["name"] == "recommender" and config["num_items"] == SMALL_WORLD["num_items"]
    assert weights["item_embedding.weight"].shape == (SMALL_WORLD["num_items"] + 1, 32)
    ledgers = [json.loads(p.read_text()) for p in (run_dir / "ledgers").glob("*.ledger.json")]
    assert ledgers, "merchants that trained must have a ledger on their disk"
    summary = json.loads((run_dir / "summary.json").read_text())
    reported = sorted(summary["privacy"]["epsilon_by_node"].values())
    from_ledgers = sorted(
        epsilon_of([(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in led["rounds"]], led["delta"])
        for led in ledgers
    )
    assert reported == pytest.approx(from_ledgers)
    assert "per customer, delta=1e-05, RDP accountant, Poisson sampling" in done.stdout
    warmed = json.loads((run_dir / "warm_up.json").read_text())  # one warm-up per Ray actor, before round 1
    assert warmed["sent"] >= 1 and warmed["actors"] == warmed["sent"] and warmed["errors"] == []
    assert f"warm-up: {warmed['sent']} Ray actor(s) ready in" in done.stdout


def test_failed_run_is_detected_and_exits_nonzero(tmp_path):
    """A valid config whose merchants all crash at round time (their ledger directory is a file)."""
    run_dir, not_a_dir = tmp_path / "bad", tmp_path / "ledgers-file"
    not_a_dir.write_text("not a directory")
    done = _storefed("simulate", *SMALL, f"run_dir={run_dir}", f"privacy.ledger_dir={not_a_dir}")
    assert done.returncode == 1
    assert "every sampled merchant failed" in done.stderr and "ledgers-file" in done.stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert not (run_dir / "global_model.safetensors").exists()


def test_bad_override_is_a_clear_error():
    done = _storefed("simulate", "strategy.name=fedmagic", "federation.num_stores=2", "federation.stores_per_round=1")
    assert done.returncode != 0
    assert "strategy.name='fedmagic' is unknown" in done.stderr


def test_run_where_every_merchant_refuses_fails_with_the_reason(tmp_path):
    """delta=0.5 is a valid number but not below 1/n at any store: all refuse, so there is no model."""
    run_dir = tmp_path / "refused"
    done = _storefed("simulate", *SMALL, f"run_dir={run_dir}", "task.epochs=1", "privacy.delta=0.5")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "no merchant trained in any of the 2 round(s)" in done.stderr and "delta=0.5 is not below 1/n" in done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "no merchant trained" in status["error"]
    assert not (run_dir / "global_model.safetensors").exists()


def test_distributed_dp_simulation_runs_over_secagg_with_population_level_epsilon(tmp_path):
    run_dir = tmp_path / "distributed"
    done = _storefed("simulate", *SMALL, f"run_dir={run_dir}", "federation.stores_per_round=3",
                     "privacy.mode=distributed", "privacy.sample_rate=0.2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["secure_aggregation"] == "aggregated" for r in rows)
    ledgers = [json.loads(p.read_text()) for p in (run_dir / "ledgers").glob("*.ledger.json")]
    assert ledgers and all(r["mechanism"] == "skellam" for led in ledgers for r in led["rounds"])
    assert max(r["epsilon_total"] for led in ledgers for r in led["rounds"]) <= 8.0
    assert "population-level epsilon" in done.stdout + done.stderr


def test_injected_failures_are_reproducible_counted_and_the_run_completes(tmp_path):
    """federation.failure_rate: about that share of train calls fail; the strategy aggregates the rest."""
    from conftest import base_settings
    from storefed.client.fault_injection import injected_failure
    from storefed.server.run_setup import round_config
    from storefed.simulations.evaluation.federated import run_federated

    settings = base_settings("recommender", "federation.num_stores=10", "federation.stores_per_round=10",
                             "federation.rounds=2", "federation.failure_rate=0.3", "task.epochs=1",
                             f"run_dir={tmp_path / 'run'}", enabled=False)
    config = round_config(settings, tmp_path / "run")
    draws = [injected_failure(config, r, {"partition-id": p}) for r in range(1, 101) for p in range(10)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws == [injected_failure(config, r, {"partition-id": p}) for r in range(1, 101) for p in range(10)]
    expected_failed = sum(injected_failure(config, r, {"partition-id": p}) for r in (1, 2) for p in range(10))
    result = run_federated(settings, tmp_path / "run")
    assert expected_failed > 0 and result.trained == 20 - expected_failed and result.state


def test_hanging_merchants_count_as_failed_after_the_round_timeout_and_the_run_completes(tmp_path):
    """federation.failure_mode=hang: injected failures answer only after federation.round_timeout_s.

    Deterministic: all 3 stores train every round, and the seed is the first whose injected failures
    (reproducible per run, seed, round and store) hang exactly one merchant in each round, so the
    other Ray actor serves the two others well within the timeout."""
    from storefed.client.fault_injection import injected_failure
    from storefed.config import compose
    from storefed.server.run_setup import round_config

    run_dir = tmp_path / "hang"
    stores = ["federation.num_stores=3", "federation.stores_per_round=3", "federation.eval_stores_per_round=3",
              "federation.failure_rate=0.4", "federation.failure_mode=hang", "federation.round_timeout_s=15"]

    def hung(seed: int) -> list[int]:
        config = round_config(compose("simulate", [*SMALL, *stores, f"seed={seed}"]), run_dir)
        return [sum(injected_failure(config, r, {"partition-id": p}) for p in range(3)) for r in (1, 2)]

    seed = next(s for s in range(200) if hung(s) == [1, 1])
    done = _storefed("simulate", *SMALL, *stores, f"seed={seed}", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [(r["trained"], r["failed"], r["refused"] + r["rejected"]) for r in rows] == [(2, 1, 0), (2, 1, 0)]
    assert "failed: no reply within federation.round_timeout_s=15" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr, "a merchant's failure is one line, not a traceback"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
