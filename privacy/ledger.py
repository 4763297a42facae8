"""The per-merchant privacy ledger: the single source of truth for what a merchant has spent.

One JSON file per (merchant, task) on the merchant's own disk. It stores the full accountant
history of every round the merchant ever trained for that task, across runs and restarts, so
epsilon is always recomputed from the whole composition, never summed by hand. Writes are
atomic (temp file + fsync + rename): a crash leaves the previous ledger intact.

A ledger is bound to its (merchant id, unit, delta, accountant): reopening it with different values
is refused, because the stored history would then back a different guarantee. Every file carries a
MAC keyed by a secret next to it, and every stored round is validated on load
(privacy/ledger_integrity.py): an edited ledger is refused, never silently trusted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from storefed.atomic_files import atomic_write_text
from storefed.privacy.accounting import RDP_ORDERS, HistoryEntry, check_accountant, epsilon_of, rdp_one_step
from storefed.privacy.ledger_integrity import history_problem, ledger_key, remove_stray_temp_files, seal, verify
from storefed.privacy.skellam import ORDERS, SkellamPlan, epsilon_of_rdp, rdp_total, share_only

LEDGER_SCHEMA = 2  # 2: sealed with a MAC (schema-1 files are sealed when their directory gets its key)


class LedgerError(ValueError):
    """A ledger file is unreadable or does not match the requested guarantee."""


@dataclass
class RoundRecord:
    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_round: float
    epsilon_total: float
    time: float
    # "gaussian": local DP-SGD steps (Opacus). "skellam": one distributed round, accounted at the
    # population level (privacy/skellam.py); ``skellam`` holds its public SkellamPlan.
    mechanism: str = "gaussian"
    skellam: dict | None = None
    # distributed rounds: epsilon of this merchant's own noise shares alone, composed over its rounds,
    # the guarantee left against a coordinator that broke secure aggregation (labelled, never mixed)
    epsilon_own_share_total: float | None = None


def _entries(records: list[RoundRecord], share_only_view: bool = False):
    """(local Gaussian steps, distributed Skellam rounds) of ``records``, as the accountants take them."""
    gaussian = [(r.noise_multiplier, r.sample_rate, r.steps) for r in records if r.mechanism == "gaussian"]
    plan = share_only if share_only_view else (lambda p: p)
    skellam = [(plan(SkellamPlan(**r.skellam)), r.sample_rate, r.steps) for r in records if r.mechanism == "skellam"]
    return gaussian, skellam


def records_rdp(records: list[RoundRecord], share_only_view: bool = False) -> tuple[np.ndarray, tuple]:
    """The composed RDP curve of ``records`` and its orders: Opacus' own orders when every record is a
    local Gaussian step (the ledger then reads exactly as Opacus), integer orders once a Skellam round is in."""
    gaussian, skellam = _entries(records, share_only_view)
    if skellam:
        return rdp_total(skellam, gaussian), ORDERS
    curve = sum((n * rdp_one_step(float(q), float(s)) for s, q, n in gaussian), np.zeros(len(RDP_ORDERS)))
    return curve, RDP_ORDERS


def records_epsilon(records: list[RoundRecord], delta: float, accountant: str) -> float:
    """Epsilon of every stored round composed (local steps and distributed rounds together)."""
    if not records:
        return 0.0
    gaussian, skellam = _entries(records)
    if not skellam:
        return epsilon_of(gaussian, delta, accountant)
    curve, orders = records_rdp(records)
    return epsilon_of_rdp(curve, delta, orders)


def own_share_epsilon(records: list[RoundRecord], delta: float) -> float:
    """Epsilon of the merchant's own distributed shares alone (plus its local steps), composed."""
    curve, orders = records_rdp(records, share_only_view=True)
    return epsilon_of_rdp(curve, delta, orders) if records else 0.0


@dataclass
class PrivacyLedger:
    path: Path
    merchant_id: str
    task: str
    unit: str
    delta: float
    accountant: str
    epsilon_budget: float
    rounds: list[RoundRecord] = field(default_factory=list)
    group_size: int | None = None  # review unit: most training reviews of one customer used (person budget)

    # -- queries ---------------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.rounds]

    @property
    def epsilon_spent(self) -> float:
        return records_epsilon(self.rounds, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Total epsilon if one more local round with these parameters were taken."""
        return records_epsilon(self.rounds + [local_record(noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def epsilon_after_distributed(self, plan: SkellamPlan, sample_rate: float) -> float:
        """Total epsilon if one more distributed round (population-level) were taken."""
        return records_epsilon(self.rounds + [distributed_record(plan, sample_rate)], self.delta, self.accountant)

    def guarantee(self) -> str:
        return (
            f"({self.epsilon_spent:.3f}, {self.delta:g})-DP per {self.unit}, {self.accountant.upper()} accountant, "
            f"Poisson sampling, {len(self.rounds)} round(s)"
        )

    # -- updates ---------------------------------------------------------------------------
    def record_round(
        self, run_id: str, server_round: int, noise_multiplier: float, sample_rate: float, steps: int
    ) -> RoundRecord:
        """Append a trained round and persist atomically before anything is released."""
        before = self.epsilon_spent
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        record = RoundRecord(run_id, server_round, noise_multiplier, sample_rate, steps, after - before, after, time.time())
        return self._append(record)

    def record_distributed_round(self, run_id: str, server_round: int, plan: SkellamPlan, sample_rate: float) -> RoundRecord:
        """Append one distributed round (population-level epsilon) and persist before the share is released."""
        before = self.epsilon_spent
        record = distributed_record(plan, sample_rate, run_id, server_round)
        record.epsilon_total = records_epsilon(self.rounds + [record], self.delta, self.accountant)
        record.epsilon_round = record.epsilon_total - before
        record.epsilon_own_share_total = own_share_epsilon(self.rounds + [record], self.delta)
        return self._append(record)

    def _append(self, record: RoundRecord) -> RoundRecord:
        """Add ``record`` and write the ledger atomically; on a failed write the ledger is left as it was."""
        self.rounds.append(record)
        try:
            self.save()
        except BaseException:
            self.rounds.pop()
            raise
        return record

    def save(self) -> None:
        payload = {
            "schema": LEDGER_SCHEMA,
            "merchant_id": self.merchant_id,
            "task": self.task,
            "unit": self.unit,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_budget": self.epsilon_budget,
            "epsilon_spent": self.epsilon_spent,
            "rounds": [asdict(r) for r in self.rounds],
            "group_size": self.group_size,
        }
        key, _ = ledger_key(self.path.parent)
        atomic_write_text(self.path, json.dumps(seal(payload, key), indent=2))


def open_ledger(
    directory: str | Path,
    merchant_id: str,
    task: str,
    unit: str,
    delta: float,
    accountant: str,
    epsilon_budget: float,
) -> PrivacyLedger:
    """Load the ledger for (merchant, task), or start an empty one (written on first round).

    The budget may change between runs (a merchant may raise or lower it); unit, delta and
    accountant may not.
    """
    path = Path(directory) / f"{ledger_stem(merchant_id)}.{task}.ledger.json"
    check_accountant(accountant)
    remove_stray_temp_files(path)
    if path.is_symlink() and not path.exists():
        raise LedgerError(f"privacy ledger {path} is a dangling link: restore the ledger it pointed to")
    if not path.exists():
        return PrivacyLedger(path, merchant_id, task, unit, delta, accountant, epsilon_budget)
    restore = "it is the record of privacy already spent: restore it from backup rather than deleting or editing it"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        key, created = ledger_key(path.parent)
        if not isinstance(payload, dict) or not isinstance(payload.get("rounds"), list):
            raise ValueError("not a ledger object with a list of rounds")
        problem = history_problem(payload["rounds"])
        rounds = [RoundRecord(**r) for r in payload["rounds"]]
        stored = (payload["unit"], float(payload["delta"]), payload["accountant"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"privacy ledger {path} is unreadable ({exc}); {restore}") from exc
    legacy = payload.get("schema") == 1 and "mac" not in payload and created  # sealed at its next write
    if not legacy and not verify(payload, key):
        raise LedgerError(f"privacy ledger {path} failed its integrity check (its MAC does not match: it was "
                          f"changed outside StoreFed, or its {path.parent / '.ledger-key'} was replaced); {restore}")
    if problem:
        raise LedgerError(f"privacy ledger {path} holds an invalid {problem}; {restore}")
    if payload.get("merchant_id") != merchant_id:
        raise LedgerError(
            f"privacy ledger {path} belongs to merchant {payload.get('merchant_id')!r}, not {merchant_id!r} "
            "(merchant names that differ only in punctuation or spaces share a ledger file name): "
            "give the merchants distinct names or separate ledger directories"
        )
    if stored != (unit, float(delta), accountant):
        raise LedgerError(
            f"privacy ledger {path} was kept with unit={stored[0]}, delta={stored[1]:g}, accountant={stored[2]}; "
            f"this run asks for unit={unit}, delta={delta:g}, accountant={accountant}. "
            "Use the ledger's settings, or a new ledger directory for a separate guarantee."
        )
    group = payload.get("group_size")
    ledger = PrivacyLedger(path, merchant_id, task, unit, delta, accountant, epsilon_budget, rounds,
                           None if group is None else int(group))
    if legacy:  # a ledger from before integrity checks, in a directory that just got its key: seal it now
        ledger.epsilon_budget = float(payload.get("epsilon_budget", epsilon_budget))
        ledger.save()
        ledger.epsilon_budget = epsilon_budget
    return ledger


def other_ledgers(ledger: PrivacyLedger) -> list[PrivacyLedger]:
    """The same merchant's ledgers of its other tasks, in the same directory (for the person budget)."""
    out = []
    for path in sorted(ledger.path.parent.glob(f"{ledger_stem(ledger.merchant_id)}.*.ledger.json")):
        task = path.name[len(ledger_stem(ledger.merchant_id)) + 1: -len(".ledger.json")]
        if task != ledger.task and path.is_file():
            payload = json.loads(path.read_text(encoding="utf-8"))
            out.append(open_ledger(path.parent, ledger.merchant_id, task, payload["unit"], float(payload["delta"]),
                                   payload["accountant"], float(payload["epsilon_budget"])))
    return out


def local_record(noise_multiplier: float, sample_rate: float, steps: int) -> RoundRecord:
    return RoundRecord("", 0, noise_multiplier, sample_rate, steps, 0.0, 0.0, 0.0)


def distributed_record(plan: SkellamPlan, sample_rate: float, run_id: str = "", server_round: int = 0) -> RoundRecord:
    return RoundRecord(run_id, server_round, plan.noise_multiplier, sample_rate, 1, 0.0, 0.0, time.time(),
                       mechanism="skellam", skellam=asdict(plan))


def ledger_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
