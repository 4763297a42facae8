"""The per-merchant ledger: persistent, cumulative, bound to its guarantee, atomically written."""

from __future__ import annotations

import json
import os

import pytest

from storefed.privacy.accounting import epsilon_of
from storefed.privacy.ledger import LedgerError, open_ledger


def _open(tmp_path, **kw):
    args = dict(merchant_id="store-1", task="recommender", unit="customer", delta=1e-5, accountant="rdp", epsilon_budget=8.0)
    args.update(kw)
    return open_ledger(tmp_path, **args)


def test_rounds_accumulate_and_survive_reopen(tmp_path):
    ledger = _open(tmp_path)
    first = ledger.record_round("run-a", 1, 1.1, 0.5, 4)
    second = ledger.record_round("run-a", 2, 1.1, 0.5, 4)
    assert first.epsilon_total == pytest.approx(epsilon_of([(1.1, 0.5, 4)], 1e-5))
    assert second.epsilon_total == pytest.approx(epsilon_of([(1.1, 0.5, 8)], 1e-5))
    assert second.epsilon_total > first.epsilon_total
    reopened = _open(tmp_path)  # e.g. after the merchant restarts
    assert len(reopened.rounds) == 2
    assert reopened.epsilon_spent == pytest.approx(second.epsilon_total)
    third = reopened.record_round("run-b", 1, 1.1, 0.5, 4)
    assert third.epsilon_total == pytest.approx(epsilon_of([(1.1, 0.5, 12)], 1e-5))
    assert "per customer" in reopened.guarantee() and "RDP" in reopened.guarantee()


def test_reopening_with_another_delta_or_unit_is_refused(tmp_path):
    _open(tmp_path).record_round("run", 1, 1.0, 0.5, 2)
    with pytest.raises(LedgerError, match="delta=1e-05.*this run asks for unit=customer, delta=0.001"):
        _open(tmp_path, delta=1e-3)
    with pytest.raises(LedgerError, match="unit=review"):
        _open(tmp_path, unit="review")


def test_corrupt_ledger_is_reported_not_silently_reset(tmp_path):
    ledger = _open(tmp_path)
    ledger.record_round("run", 1, 1.0, 0.5, 2)
    ledger.path.write_text("{not json", encoding="utf-8")
    with pytest.raises(LedgerError, match="unreadable.*restore it from backup"):
        _open(tmp_path)


def test_failed_write_keeps_previous_ledger_intact(tmp_path, monkeypatch):
    ledger = _open(tmp_path)
    ledger.record_round("run", 1, 1.0, 0.5, 2)
    before = ledger.path.read_text(encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ledger.record_round("run", 2, 1.0, 0.5, 2)
    assert ledger.path.read_text(encoding="utf-8") == before
    assert len(ledger.rounds) == 1
    assert [p.name for p in tmp_path.iterdir()] == [ledger.path.name]  # no temp file left behind
    assert len(json.loads(before)["rounds"]) == 1


def test_merchant_status_command_prints_the_ledger(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    ledger = _open(tmp_path)
    ledger.record_round("run", 1, 1.1, 0.5, 4)
    done = subprocess.run([sys.executable, "-m", "storefed", "merchant", "status", f"ledger_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    spent = epsilon_of([(1.1, 0.5, 4)], 1e-5)
    assert f"store-1  recommender  rounds 1  epsilon {spent:.3f} of 8 spent, {8 - spent:.3f} left" in done.stdout
    assert "per customer, delta=1e-05, RDP accountant, Poisson sampling" in done.stdout
