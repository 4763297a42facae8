"""Checkpoints and resume: a coordinator SIGKILLed mid-round continues from its last complete round,
with no round missing or twice in the metrics and no ledger entry written twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storefed.server.checkpoint import Checkpoint, load_checkpoint, run_owner_alive, save_checkpoint
from storefed.simulations.report import run_report_command

ROUNDS = 4


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "storefed", "simulate", "federation.num_stores=4", "federation.stores_per_round=3",
            f"federation.rounds={ROUNDS}", "data.generator.num_items=200", "privacy.planned_rounds=6",
            "task.epochs=40",  # rounds long enough (about 1 s) to be killed in the middle of one
            f"run_dir={run_dir}", *extra]


def _rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip().endswith("}")]


def test_sigkilled_simulation_resumes_without_missing_or_duplicate_rounds_or_ledger_entries(tmp_path):
    run_dir = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_args(run_dir), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(_rounds(run_dir)) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert len(_rounds(run_dir)) >= 2, (tmp_path / "first.log").read_text()[-2000:]
        time.sleep(0.3)  # into round 3: some merchants may already have trained and recorded it
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "running" and status["pid"] == first.pid and run_owner_alive(status) is False
    done = load_checkpoint(run_dir).server_round
    assert done >= 2

    assert run_report_command([str(run_dir)]) == 0  # the dead run is reported as such
    assert "left `running` by a dead process" in (run_dir / "report.md").read_text()

    fresh = subprocess.run(_args(run_dir), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr and "resume=true" in fresh.stderr
    changed = subprocess.run(_args(run_dir, "resume=true", "privacy.epsilon=3"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2 and "privacy.epsilon=3.0 (was null) changed" in changed.stderr

    resumed = subprocess.run(_args(run_dir, "resume=true"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed after round {done} of {ROUNDS}" in resumed.stdout
    assert _rounds(run_dir) == list(range(1, ROUNDS + 1)), "every round exactly once"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS and summary["resumed_after_round"] == done
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    for ledger_file in (run_dir / "ledgers").glob("*.ledger.json"):
        rounds = [(r["run_id"], r["server_round"]) for r in json.loads(ledger_file.read_text())["rounds"]]
        assert len(rounds) == len(set(rounds)), f"{ledger_file.name} records a round twice: {rounds}"
        assert all(run_id == "run" for run_id, _ in rounds)
    again = subprocess.run(_args(run_dir, "resume=true"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already completed" in again.stderr


def test_checkpoint_commit_point_is_the_state_file(tmp_path):
    model = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_checkpoint(tmp_path, Checkpoint(3, model, {"m_t/w": torch.ones(2, 3)}, {"releases": 3, "clipping_norm": 0.5},
                                         {"7": 1.25}, 9))
    save_checkpoint(tmp_path, Checkpoint(4, {"w": model["w"] + 1}, {}, None, {"7": 2.5}, 12))
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 4 and torch.equal(loaded.model["w"], model["w"] + 1)
    assert loaded.merchant_epsilon == {"7": 2.5} and loaded.trained == 12 and loaded.strategy_state == {}
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "model-4.safetensors", "state.json", "strategy-4.safetensors"], "older rounds' files removed"
    (tmp_path / "checkpoint" / "model-4.safetensors").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="checkpoint .* is damaged"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_resumed_fedadam_keeps_its_moments(tmp_path):
    import numpy as np

    from storefed.server.checkpoint import restore_strategy_state, strategy_state

    class Opt:  # the attributes Flower's FedOpt family keeps
        m_t = {"w": np.full((2,), 0.5, dtype=np.float32)}
        v_t = {"w": np.full((2,), 0.25, dtype=np.float32)}

    state = strategy_state(Opt())
    fresh = type("Fresh", (), {"m_t": None, "v_t": None})()
    restore_strategy_state(fresh, state)
    assert np.array_equal(fresh.m_t["w"], Opt.m_t["w"]) and np.array_equal(fresh.v_t["w"], Opt.v_t["w"])
