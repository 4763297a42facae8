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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ledger-key", ledger.path.name]  # no temp file left
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


# --- integrity: every way an edited ledger could reset or shrink the spent budget is refused -----------
def _reseal(path, change):
    """Rewrite ``path`` with ``change(payload)`` applied and a *valid* MAC (as if the key were used)."""
    from storefed.privacy.ledger_integrity import ledger_key, seal

    payload = json.loads(path.read_text(encoding="utf-8"))
    change(payload)
    path.write_text(json.dumps(seal(payload, ledger_key(path.parent)[0])), encoding="utf-8")


@pytest.mark.parametrize("edit", [
    lambda p: p["rounds"][0].update(steps=-50),
    lambda p: p["rounds"].clear(),
    lambda p: p["rounds"][0].update(noise_multiplier=50.0),
    lambda p: p["rounds"][0].update(steps=0),
    lambda p: p["rounds"][0].update(sample_rate=0.0),
    lambda p: p.update(epsilon_spent=0.0),
])
def test_an_edited_ledger_fails_its_integrity_check(tmp_path, edit):
    ledger = _open(tmp_path)
    ledger.record_round("run", 1, 1.0, 0.5, 2)
    payload = json.loads(ledger.path.read_text(encoding="utf-8"))
    edit(payload)
    ledger.path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(LedgerError, match="failed its integrity check.*restore it from backup"):
        _open(tmp_path)


@pytest.mark.parametrize("edit, problem", [
    (lambda p: p["rounds"][0].update(steps=-50), "round 1: steps=-50 (must be an integer >= 1)"),
    (lambda p: p["rounds"][0].update(sample_rate=0.0), "round 1: sample_rate=0.0 (must lie in (0, 1])"),
    (lambda p: p["rounds"][0].update(noise_multiplier=0), "round 1: noise_multiplier=0 (must be > 0)"),
    (lambda p: p["rounds"][1].update(epsilon_total=0.1), "round 2: epsilon_total 0.1 is below the previous"),
    (lambda p: p["rounds"][0].update(mechanism="laplace"), "round 1: unknown mechanism 'laplace'"),
])
def test_even_a_validly_sealed_ledger_must_hold_valid_rounds(tmp_path, edit, problem):
    ledger = _open(tmp_path)
    ledger.record_round("run", 1, 1.0, 0.5, 2)
    ledger.record_round("run", 2, 1.0, 0.5, 2)
    _reseal(ledger.path, edit)
    with pytest.raises(LedgerError, match="holds an invalid " + problem.replace("(", r"\(").replace(")", r"\)")):
        _open(tmp_path)


def test_a_replaced_key_a_dangling_link_and_a_foreign_merchant_are_refused(tmp_path):
    ledger = _open(tmp_path, merchant_id="shop_b")
    ledger.record_round("run", 1, 1.0, 0.5, 2)
    with pytest.raises(LedgerError, match="belongs to merchant 'shop_b', not 'shop b'.*distinct names"):
        _open(tmp_path, merchant_id="shop b")  # same file name after sanitizing: refused, not shared
    key = tmp_path / ".ledger-key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    key.write_text(os.urandom(32).hex(), encoding="ascii")
    with pytest.raises(LedgerError, match="failed its integrity check"):
        _open(tmp_path, merchant_id="shop_b")
    other = tmp_path / "links"
    other.mkdir()
    (other / "store-1.recommender.ledger.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(LedgerError, match="dangling link"):
        _open(other)


def test_stray_temp_files_of_an_interrupted_write_are_removed_on_open(tmp_path):
    ledger = _open(tmp_path)
    ledger.record_round("run", 1, 1.0, 0.5, 2)
    stray = tmp_path / f".{ledger.path.name}.abc123.tmp"
    stray.write_text("{half", encoding="utf-8")
    unrelated = tmp_path / ".store-2.recommender.ledger.json.zz.tmp"
    unrelated.write_text("{", encoding="utf-8")
    assert len(_open(tmp_path).rounds) == 1
    assert not stray.exists() and unrelated.exists(), "only this ledger's own leftovers are removed"


def test_processes_creating_the_ledger_key_at_once_all_get_the_one_written(tmp_path, monkeypatch):
    """Two Ray actors' first rounds used to race here: each wrote its own key and one ledger's MAC then
    failed. Four writers start together, each write slowed down (fsync) so that all see no key yet."""
    import threading
    import time as _time

    from storefed import atomic_files
    from storefed.privacy.ledger_integrity import KEY_FILE, ledger_key

    fsync = os.fsync
    monkeypatch.setattr(atomic_files.os, "fsync", lambda fd: (_time.sleep(0.2), fsync(fd)))
    barrier, results = threading.Barrier(4), []

    def create() -> None:
        barrier.wait()
        key, created = ledger_key(tmp_path)
        results.append((key.hex(), created))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    on_disk = (tmp_path / KEY_FILE).read_text(encoding="ascii").strip()
    assert len(results) == 4 and {key for key, _ in results} == {on_disk}, results
    assert sum(created for _, created in results) == 1
    assert not list(tmp_path.glob("*.tmp")), "no temp file left behind"
