"""Integrity of a merchant's privacy ledgers: a MAC per file and a validity check per record.

Every ledger file carries ``mac``: HMAC-SHA256 (``cryptography``) over its canonical JSON, keyed by a
random 32-byte secret kept next to the ledgers (``.ledger-key``, mode 0600, created once). An edited,
truncated-and-retyped or copied-in ledger then fails the check and is refused instead of trusted.

What this protects: the record of spent privacy against accidental edits, restores of the wrong file
and tools that rewrite JSON. It cannot stop someone who can read the key (the merchant's own
operator, on the merchant's own disk): the ledger protects the merchant's customers from a budget
overrun by mistake, and the merchant remains responsible for its own disk.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from storefed.atomic_files import atomic_write_bytes

KEY_FILE = ".ledger-key"
MAC_FIELD = "mac"


def ledger_key(directory: Path) -> tuple[bytes, bool]:
    """(the directory's MAC key, whether it was created now). Created atomically, 0600, on first use;
    processes creating it at the same moment (Ray actors) all end up with the one that was written first."""
    path = Path(directory) / KEY_FILE
    if path.exists():
        text = path.read_text(encoding="ascii").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ValueError(f"{path} is not a ledger key (64 hex digits): restore it from backup")
        return key, False
    created = atomic_write_bytes(path, os.urandom(32).hex().encode("ascii") + b"\n", mode=0o600, exclusive=True)
    return ledger_key(directory)[0], created


def _canonical(payload: dict) -> bytes:
    body = {k: v for k, v in payload.items() if k != MAC_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def seal(payload: dict, key: bytes) -> dict:
    """``payload`` with its MAC field set."""
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_canonical(payload))
    return {**{k: v for k, v in payload.items() if k != MAC_FIELD}, MAC_FIELD: mac.finalize().hex()}


def verify(payload: dict, key: bytes) -> bool:
    """Whether ``payload`` carries a valid MAC under ``key`` (constant-time comparison)."""
    try:
        tag = bytes.fromhex(str(payload.get(MAC_FIELD, "")))
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(_canonical(payload))
        mac.verify(tag)
        return bool(tag)
    except (InvalidSignature, ValueError):
        return False


def record_problem(record: dict, index: int) -> str | None:
    """Why a stored round cannot be a round StoreFed recorded, or None."""
    def positive(key: str) -> bool:
        value = record.get(key)
        return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

    if record.get("mechanism", "gaussian") not in ("gaussian", "skellam"):
        return f"round {index}: unknown mechanism {record.get('mechanism')!r}"
    if not positive("noise_multiplier"):
        return f"round {index}: noise_multiplier={record.get('noise_multiplier')!r} (must be > 0)"
    if not positive("sample_rate") or record["sample_rate"] > 1:
        return f"round {index}: sample_rate={record.get('sample_rate')!r} (must lie in (0, 1])"
    if not isinstance(record.get("steps"), int) or record["steps"] < 1:
        return f"round {index}: steps={record.get('steps')!r} (must be an integer >= 1)"
    if record.get("mechanism") == "skellam":
        plan = record.get("skellam") or {}
        bad = [k for k in ("dim", "clip", "noise_multiplier", "gamma", "min_survivors")
               if not (isinstance(plan.get(k), (int, float)) and math.isfinite(plan[k]) and plan[k] > 0)]
        if bad or record["steps"] != 1:
            return f"round {index}: the distributed round's plan is invalid ({', '.join(bad) or 'steps != 1'})"
    total = record.get("epsilon_total")
    if not (isinstance(total, (int, float)) and math.isfinite(total) and total >= 0):
        return f"round {index}: epsilon_total={total!r} (must be a finite number >= 0)"
    return None


def history_problem(records: list[dict]) -> str | None:
    """The first invalid round, or a decrease of the running epsilon (spent epsilon never goes down)."""
    previous = 0.0
    for index, record in enumerate(records, 1):
        problem = record_problem(record, index)
        if problem:
            return problem
        if record["epsilon_total"] < previous - 1e-9:
            return f"round {index}: epsilon_total {record['epsilon_total']:g} is below the previous {previous:g}"
        previous = record["epsilon_total"]
    return None


def remove_stray_temp_files(path: Path) -> int:
    """Delete temp files an interrupted atomic write of ``path`` left behind; returns how many."""
    removed = 0
    for stray in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        stray.unlink(missing_ok=True)
        removed += 1
    return removed


OWNER_FILE = "merchant.json"


def bind_directory(directory: Path, merchant_id: str) -> None:
    """Bind a merchant's ledger directory to its merchant id on first use; refuse another id later.

    The ledgers are found by merchant id, and a deployed merchant's id is its data directory's name:
    without this, renaming that directory would open fresh, empty ledgers (a reset budget)."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"ledger_dir={directory} is a file, not a directory: point ledger_dir at the directory "
                         "that holds (or will hold) this merchant's privacy ledgers")
    path = Path(directory) / OWNER_FILE
    if not path.exists():
        payload = {"merchant_id": merchant_id}
        if atomic_write_bytes(path, (json.dumps(payload) + "\n").encode("utf-8"), mode=0o600, exclusive=True):
            return  # else another process bound it a moment ago: check its owner below
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))["merchant_id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): restore it from backup") from None
    if owner != merchant_id:
        raise ValueError(
            f"ledger directory {directory} belongs to merchant {owner!r}, but this agent's data directory makes it "
            f"{merchant_id!r}: the privacy budget stays with the merchant, not with a folder name. Give the data "
            f"directory its name {owner!r} back, or, for a different merchant, use its own ledger_dir"
        )
