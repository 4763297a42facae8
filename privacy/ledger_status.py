"""What a merchant has spent: one status line per (merchant, task) ledger in a directory.

Epsilon is always recomputed from the stored rounds (the full accountant history) with
``privacy.ledger.records_epsilon`` (local steps and distributed rounds composed); the ``epsilon_spent`` field cached in the file is only
compared against, never reported as the spend. A file that cannot be read raises
``LedgerError`` (a ``ValueError``) naming it: a ledger is the record of privacy already
spent, so a broken one must be restored, not skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from storefed.privacy.accounting import check_accountant
from storefed.privacy.ledger import LEDGER_SCHEMA, LedgerError, ledger_stem, open_ledger

LEDGER_GLOB = "*.ledger.json"


def ledger_status(directory: str | Path) -> list[dict]:
    """One row per ``*.ledger.json`` in ``directory``, sorted by (merchant, task).

    Row keys: ``file``, ``merchant_id``, ``task``, ``unit``, ``delta``, ``accountant``,
    ``epsilon_budget``, ``rounds`` (count), ``epsilon_spent`` (recomputed), ``epsilon_left``
    (``max(budget - spent, 0)``), ``epsilon_cached`` (the file's own field, or None).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LedgerError(f"ledger directory {directory} does not exist or is not a directory")
    rows = [_row(path) for path in sorted(directory.glob(LEDGER_GLOB)) if path.is_file()]
    return sorted(rows, key=lambda r: (r["merchant_id"], r["task"], r["file"]))


def _row(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("schema") not in (1, LEDGER_SCHEMA):
            raise ValueError(f"schema {payload.get('schema')!r}, this StoreFed reads schemas 1 and {LEDGER_SCHEMA}")
        payload["rounds"]  # a ledger without rounds is unreadable, named as such
        merchant_id, task, unit = str(payload["merchant_id"]), str(payload["task"]), str(payload["unit"])
        delta, budget = float(payload["delta"]), float(payload["epsilon_budget"])
        accountant = check_accountant(payload["accountant"])
        cached = payload.get("epsilon_spent")
        cached = None if cached is None else float(cached)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(
            f"privacy ledger {path} is unreadable ({exc}); it is the record of privacy already spent: "
            "restore it from backup rather than deleting it"
        ) from exc
    if not path.name.startswith(f"{ledger_stem(merchant_id)}.{task}."):
        raise LedgerError(f"privacy ledger {path} holds merchant {merchant_id!r} task {task!r}: its file name does "
                          "not match (a ledger copied or renamed by hand); restore it under its own name")
    # the integrity checks (MAC, every round valid, merchant id) as a merchant's round runs them
    ledger = open_ledger(path.parent, merchant_id, task, unit, delta, accountant, budget)
    rounds, spent = ledger.rounds, ledger.epsilon_spent
    return {
        "file": str(path),
        "merchant_id": merchant_id,
        "task": task,
        "unit": unit,
        "delta": delta,
        "accountant": accountant,
        "epsilon_budget": budget,
        "rounds": len(rounds),
        "epsilon_spent": spent,
        "epsilon_left": max(budget - spent, 0.0),
        "epsilon_cached": cached,
    }


def person_status(directory: str | Path) -> list[dict]:
    """Per merchant: the per-customer epsilon composed over all its task ledgers (privacy/person_budget.py)."""
    from storefed.privacy.person_budget import person_epsilon

    rows = ledger_status(directory)
    out = []
    for merchant in sorted({r["merchant_id"] for r in rows}):
        mine = [r for r in rows if r["merchant_id"] == merchant]
        ledgers = [open_ledger(Path(r["file"]).parent, merchant, r["task"], r["unit"], r["delta"], r["accountant"],
                               r["epsilon_budget"]) for r in mine]
        delta = min(r["delta"] for r in mine)
        view = person_epsilon(ledgers, delta)
        out.append({"merchant_id": merchant, "epsilon": view.epsilon, "delta": delta, "per_task": view.per_task,
                    "method": view.method})
    return out


def format_person_status(rows: list[dict]) -> str:
    """One line per merchant: the per-customer composed epsilon next to each task's own."""
    lines = []
    for r in rows:
        tasks = ", ".join(f"{task} {eps:.3f}" for task, eps in sorted(r["per_task"].items()))
        lines.append(f"{r['merchant_id']}  per customer, all tasks: epsilon {r['epsilon']:.3f} "
                     f"(delta={r['delta']:g}; tasks: {tasks}; {r['method']})")
    return "\n".join(lines)


def format_ledger_status(rows: list[dict]) -> str:
    """Human-readable status, one line per row, e.g.

    ``store-00003  recommender  rounds 4  epsilon 5.412 of 8 spent, 2.588 left  (per customer,
    delta=1e-05, RDP accountant, Poisson sampling)``
    """
    if not rows:
        return "no privacy ledgers (nothing spent yet)"
    merchant_w = max(len(r["merchant_id"]) for r in rows)
    task_w = max(len(r["task"]) for r in rows)
    lines = []
    for r in rows:
        line = (
            f"{r['merchant_id']:<{merchant_w}}  {r['task']:<{task_w}}  rounds {r['rounds']}  "
            f"epsilon {r['epsilon_spent']:.3f} of {r['epsilon_budget']:g} spent, {r['epsilon_left']:.3f} left  "
            f"(per {r['unit']}, delta={r['delta']:g}, {r['accountant'].upper()} accountant, Poisson sampling)"
        )
        if r["epsilon_spent"] > r["epsilon_budget"]:
            line += "  OVER BUDGET"
        cached = r.get("epsilon_cached")
        if cached is not None and not math.isclose(cached, r["epsilon_spent"], rel_tol=1e-6, abs_tol=1e-9):
            line += f"  [file's cached epsilon {cached:.3f} disagrees; recomputed from its rounds]"
        lines.append(line)
    return "\n".join(lines)
