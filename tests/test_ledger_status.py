"""Ledger status: per (merchant, task) rounds, epsilon recomputed from the rounds, epsilon left."""

from __future__ import annotations

import json

import pytest

from storefed.privacy.accounting import epsilon_of
from storefed.privacy.ledger import LedgerError, open_ledger
from storefed.privacy.ledger_status import format_ledger_status, ledger_status


def _ledger(directory, merchant, task="recommender", unit="customer", accountant="rdp", budget=8.0, delta=1e-5):
    return open_ledger(directory, merchant, task, unit=unit, delta=delta, accountant=accountant, epsilon_budget=budget)


def test_status_reports_rounds_spent_and_left_per_merchant_and_task(tmp_path):
    a = _ledger(tmp_path, "store-00003")
    for server_round in range(1, 5):
        a.record_round("run-1", server_round, 1.5, 0.25, 8)
    b = _ledger(tmp_path, "store-00012", task="review", unit="review", budget=4.0)
    b.record_round("run-1", 1, 1.5, 0.1, 20)
    b.record_round("run-2", 1, 2.0, 0.2, 10)
    (tmp_path / "notes.txt").write_text("not a ledger", encoding="utf-8")

    rows = ledger_status(tmp_path)

    assert [(r["merchant_id"], r["task"]) for r in rows] == [("store-00003", "recommender"), ("store-00012", "review")]
    spent_a = epsilon_of([(1.5, 0.25, 8)] * 4, 1e-5, "rdp")
    spent_b = epsilon_of([(1.5, 0.1, 20), (2.0, 0.2, 10)], 1e-5, "rdp")
    assert rows[0]["rounds"] == 4 and rows[1]["rounds"] == 2
    assert rows[0]["epsilon_spent"] == pytest.approx(spent_a, rel=1e-12)
    assert rows[1]["epsilon_spent"] == pytest.approx(spent_b, rel=1e-12)
    assert rows[0]["epsilon_left"] == pytest.approx(8.0 - spent_a, rel=1e-12)
    assert rows[1]["epsilon_left"] == pytest.approx(4.0 - spent_b, rel=1e-12)
    assert 0 < spent_a < 8.0 and 0 < spent_b < 4.0
    assert (rows[0]["unit"], rows[0]["delta"], rows[0]["accountant"]) == ("customer", 1e-5, "rdp")
    assert rows[1]["unit"] == "review"

    text = format_ledger_status(rows)
    assert text.splitlines() == [
        f"store-00003  recommender  rounds 4  epsilon {spent_a:.3f} of 8 spent, {8 - spent_a:.3f} left  "
        "(per customer, delta=1e-05, RDP accountant, Poisson sampling)",
        f"store-00012  review       rounds 2  epsilon {spent_b:.3f} of 4 spent, {4 - spent_b:.3f} left  "
        "(per review, delta=1e-05, RDP accountant, Poisson sampling)",
    ]


def test_epsilon_is_recomputed_from_rounds_and_an_edited_cache_is_refused(tmp_path):
    ledger = _ledger(tmp_path, "store-1")
    ledger.record_round("run", 1, 1.0, 0.5, 4)
    ledger.record_round("run", 2, 1.0, 0.5, 4)
    (row,) = ledger_status(tmp_path)
    expected = epsilon_of([(1.0, 0.5, 8)], 1e-5, "rdp")
    assert row["epsilon_spent"] == pytest.approx(expected, rel=1e-12)
    payload = json.loads(ledger.path.read_text(encoding="utf-8"))
    payload["epsilon_spent"] = 0.5  # stale or tampered cache
    ledger.path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(LedgerError, match="failed its integrity check"):
        ledger_status(tmp_path)


def test_a_pre_integrity_ledger_is_read_once_with_its_cache_checked_then_sealed(tmp_path):
    legacy = tmp_path / "old"
    _ledger(legacy, "store-1").record_round("run", 1, 1.0, 0.5, 8)
    payload = json.loads((legacy / "store-1.recommender.ledger.json").read_text(encoding="utf-8"))
    payload.pop("mac")
    payload["schema"], payload["epsilon_spent"] = 1, 0.5
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "store-1.recommender.ledger.json").write_text(json.dumps(payload), encoding="utf-8")
    (row,) = ledger_status(fresh)  # no key yet in this directory: a ledger from before integrity checks
    assert row["epsilon_spent"] == pytest.approx(epsilon_of([(1.0, 0.5, 8)], 1e-5, "rdp"), rel=1e-12)
    assert "file's cached epsilon 0.500 disagrees; recomputed from its rounds" in format_ledger_status([row])
    sealed = json.loads((fresh / "store-1.recommender.ledger.json").read_text(encoding="utf-8"))
    assert sealed["schema"] == 2 and len(sealed["mac"]) == 64 and sealed["rounds"] == payload["rounds"]
    assert ledger_status(fresh)[0]["epsilon_cached"] == pytest.approx(row["epsilon_spent"])
    (fresh / "store-2.recommender.ledger.json").write_text(json.dumps(payload | {"merchant_id": "store-2"}),
                                                         encoding="utf-8")
    with pytest.raises(LedgerError, match="store-2.recommender.ledger.json failed its integrity check"):
        ledger_status(fresh)  # the directory has its key now: an unsealed ledger is no longer trusted


def test_epsilon_left_floors_at_zero_when_the_budget_was_lowered_below_the_spend(tmp_path):
    _ledger(tmp_path, "store-1").record_round("run-1", 1, 0.8, 0.5, 20)
    lowered = _ledger(tmp_path, "store-1", budget=1.0)  # the merchant lowers the budget later
    lowered.record_round("run-2", 1, 5.0, 0.01, 1)

    (row,) = ledger_status(tmp_path)

    assert row["epsilon_budget"] == 1.0 and row["epsilon_spent"] > 1.0
    assert row["epsilon_left"] == 0.0
    line = format_ledger_status([row])
    assert f"epsilon {row['epsilon_spent']:.3f} of 1 spent, 0.000 left" in line and line.endswith("OVER BUDGET")


def test_prv_ledger_is_labelled_and_recomputed_with_prv(tmp_path):
    _ledger(tmp_path, "store-7", accountant="prv", delta=1e-6).record_round("run", 1, 1.2, 0.25, 8)
    (row,) = ledger_status(tmp_path)
    assert row["epsilon_spent"] == pytest.approx(epsilon_of([(1.2, 0.25, 8)], 1e-6, "prv"), rel=1e-9)
    assert "(per customer, delta=1e-06, PRV accountant, Poisson sampling)" in format_ledger_status([row])


def test_unreadable_ledger_is_an_error_naming_the_file(tmp_path):
    _ledger(tmp_path, "store-1").record_round("run", 1, 1.0, 0.5, 2)
    broken = tmp_path / "store-2.recommender.ledger.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(LedgerError, match=r"store-2\.recommender\.ledger\.json is unreadable"):
        ledger_status(tmp_path)

    broken.write_text(json.dumps({"schema": 1, "merchant_id": "store-2", "task": "recommender"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"store-2\.recommender\.ledger\.json is unreadable .*'rounds'"):
        ledger_status(tmp_path)


def test_empty_and_missing_directories(tmp_path):
    assert ledger_status(tmp_path) == []
    assert format_ledger_status([]) == "no privacy ledgers (nothing spent yet)"
    with pytest.raises(LedgerError, match="does not exist"):
        ledger_status(tmp_path / "nowhere")
