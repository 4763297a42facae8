"""What a report reads from a run directory: kind, config, per-round metrics, ledgers (read-only).

Three kinds of directory:
- ``federation``: written by ``storefed simulate`` or ``storefed server`` (``metrics.jsonl``,
  ``summary.json``, ``status.json``, ``config.yaml``, ``ledgers/``);
- ``evaluate``: written by ``storefed evaluate`` (``results.json`` and its PNGs);
- ``sweep``: a folder whose sub-folders are federation runs (e.g. one per epsilon): the report
  draws the privacy-utility curve across them.

Ledgers are opened through ``privacy.ledger_status`` (the same integrity checks a merchant's round
runs), so a report never shows numbers from an edited ledger.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from storefed.privacy.ledger import open_ledger
from storefed.privacy.ledger_status import ledger_status, person_status


class ReportError(ValueError):
    """The directory is not something a report can be written for (the message says what to pass)."""


@dataclasses.dataclass
class MerchantLedger:
    merchant_id: str
    task: str
    unit: str
    delta: float
    accountant: str
    budget: float
    rounds: list[tuple[int, float]]  # (server round, epsilon spent after it)


@dataclasses.dataclass
class FederationRun:
    run_dir: Path
    config: dict
    status: dict
    summary: dict
    rows: list[dict]  # metrics.jsonl, one per finished round
    ledgers: list[MerchantLedger]
    person: list[dict]  # privacy.ledger_status.person_status rows (per-customer epsilon over all tasks)

    @property
    def task(self) -> str:
        return str(self.summary.get("task") or self.config.get("task", {}).get("name", "?"))


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is unreadable ({exc}): the run directory is damaged") from exc


def _rows(path: Path) -> list[dict]:
    rows: list[dict] = []
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ReportError(f"{path} line {number} is not JSON ({exc})") from exc
    return rows


def kind_of(run_dir: Path) -> str:
    """``federation``, ``evaluate`` or ``sweep``; ReportError for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory: pass a run directory written by storefed simulate, "
                          "server or evaluate")
    if (run_dir / "results.json").is_file():
        return "evaluate"
    if (run_dir / "status.json").is_file() or (run_dir / "metrics.jsonl").is_file():
        return "federation"
    if sweep_members(run_dir):
        return "sweep"
    raise ReportError(f"{run_dir} holds no run (no status.json, metrics.jsonl or results.json, and no sub-folder "
                      "with them): pass the run_dir of storefed simulate, server or evaluate")


def sweep_members(folder: Path) -> list[Path]:
    """Sub-folders that are finished federation runs, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and (p / "summary.json").is_file())


def _ledgers(directory: Path) -> tuple[list[MerchantLedger], list[dict]]:
    if not directory.is_dir():
        return [], []
    out = []
    for row in ledger_status(directory):
        ledger = open_ledger(directory, row["merchant_id"], row["task"], row["unit"], row["delta"], row["accountant"],
                             row["epsilon_budget"])
        points = [(int(r.server_round), float(r.epsilon_total)) for r in ledger.rounds]
        out.append(MerchantLedger(row["merchant_id"], row["task"], row["unit"], row["delta"], row["accountant"],
                                  row["epsilon_budget"], points))
    return out, person_status(directory) if out else []


def load_federation(run_dir: Path) -> FederationRun:
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    status = _json(run_dir / "status.json") if (run_dir / "status.json").is_file() else {"status": "unknown"}
    summary = _json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    ledger_dir = (config.get("privacy") or {}).get("ledger_dir") or run_dir / "ledgers"
    ledger_dir = Path(ledger_dir) if Path(ledger_dir).is_dir() else run_dir / "ledgers"
    ledgers, person = _ledgers(ledger_dir)
    return FederationRun(run_dir, config or {}, status, summary, _rows(run_dir / "metrics.jsonl"), ledgers, person)


def load_evaluation(run_dir: Path) -> dict:
    """``results.json`` of ``storefed evaluate`` (meta, rows, summary)."""
    return _json(Path(run_dir) / "results.json")
