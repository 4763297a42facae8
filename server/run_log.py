"""Per-round metrics of a run: printed, appended to ``metrics.jsonl``, mirrored in ``metrics.csv``.

Every epsilon printed states its unit, delta and accountant, and is a *per-merchant*
(record/customer-level) guarantee from the merchants' ledgers; it is never mixed with any
client-level number.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

from storefed.atomic_files import atomic_write_text
from storefed.server.progress import PlainDisplay, RoundDisplay
from storefed.server.screening import RoundScreening


def epsilon_columns(epsilons: list[float]) -> dict[str, float]:
    """Max and median epsilon spent so far over the merchants that trained this round."""
    ordered = sorted(epsilons)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"epsilon_total_max": ordered[-1], "epsilon_total_median": median}


class RunLog:
    def __init__(self, run_dir: Path, task: str, unit: str, accountant: str, dp: bool, distributed: bool = False,
                 sampling: str = "Poisson", display: RoundDisplay | None = None, budgets: dict | None = None) -> None:
        """``distributed``: privacy.mode=distributed (population-level epsilon, Skellam RDP accountant);
        ``sampling``: how units enter a step ("Poisson", or "none (every unit, q = 1)" for one-shot releases);
        ``display``: where rounds and notes are shown (server/progress.py; plain lines by default);
        ``budgets``: the proposed per-task and per-customer budgets (``budget_summary``), for the summary."""
        self.run_dir = Path(run_dir)
        self.display: RoundDisplay = display or PlainDisplay()
        self.task, self.unit, self.dp, self.distributed, self.sampling = task, unit, dp, distributed, sampling
        self.accountant = "skellam-rdp" if distributed else accountant
        self.rows: list[dict] = []
        self.merchant_epsilon: dict[str, float] = {}
        self.budgets = dict(budgets or {})
        self.pending: dict[int, dict] = {}
        self._mark = time.monotonic()  # end of the previous round (or the run's start)

    def on_screened(self, server_round: int, screening: RoundScreening) -> None:
        """Record who trained, refused, failed or was rejected in this round."""
        row = {
            "round": server_round,
            "trained": len(screening.accepted),
            "refused": len(screening.refused),
            "failed": len(screening.failed),
            "rejected": len(screening.rejected),
        }
        epsilons = [m.content["metrics"]["epsilon_total"] for m in screening.accepted]
        if epsilons and self.dp:
            row.update(epsilon_columns(epsilons))
            row["delta"] = max(m.content["metrics"]["delta"] for m in screening.accepted)
        for msg in screening.accepted:
            self.merchant_epsilon[str(msg.metadata.src_node_id)] = float(msg.content["metrics"]["epsilon_total"])
        for kind in ("refused", "failed", "rejected"):
            for node, reason in getattr(screening, kind).items():
                self.note(f"  round {server_round}: merchant node {node} {kind}: {reason}")
        row["train_seconds"] = round(time.monotonic() - self._mark, 3)  # this round's train phase, wall clock
        self.pending[server_round] = row

    def resume(self, done: int, merchant_epsilon: dict[str, float]) -> None:
        """Continue after round ``done``: keep its rows (rewriting ``metrics.jsonl`` without any later,
        half-finished round, so no round appears twice) and the merchants' epsilons so far."""
        path = self.run_dir / "metrics.jsonl"
        kept: dict[int, dict] = {}
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by the crash
                continue
            if int(row["round"]) <= done:
                kept[int(row["round"])] = row
        self.rows = [kept[r] for r in sorted(kept)]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self._write_csv()
        self.merchant_epsilon = dict(merchant_epsilon)

    def start(self, rounds: int) -> None:
        self._mark = time.monotonic()
        self.display.start(f"[{self.task}]", rounds, self.task, self.unit if self.dp else "none")

    def note(self, text: str) -> None:
        """A line worth showing outside the round table (refusals, failures, skipped rounds)."""
        self.display.note(text)

    def on_round_end(self, server_round: int, train: dict | None, evaluate: dict | None) -> None:
        row = self.pending.pop(server_round, {"round": server_round})
        row.update({f"train_{k}": v for k, v in (train or {}).items() if k not in ("refused",)})
        row.update({f"eval_{k}": v for k, v in (evaluate or {}).items()})
        now = time.monotonic()
        row["seconds"] = round(now - self._mark, 3)  # this round's wall clock: train, aggregate and evaluate
        self._mark = now
        self.rows.append(row)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self._write_csv()
        self.display.round_finished(row, self.describe(row))

    def describe(self, row: dict) -> str:
        parts = [f"[{self.task}] round {row['round']}: {row.get('trained', 0)} trained"]
        parts.append(f"{row.get('refused', 0)} refused, {row.get('failed', 0)} failed, {row.get('rejected', 0)} rejected")
        if "train_train_loss" in row:
            parts.append(f"loss {row['train_train_loss']:.4f}")
        for key in ("hr@10", "ndcg@10", "local_pop_hr@10", "accuracy", "macro_f1", "local_majority_accuracy"):
            if f"eval_{key}" in row:
                parts.append(f"{key} {row[f'eval_{key}']:.4f}")
        if "train_client_epsilon" in row:
            parts.append(
                f"client-level epsilon {row['train_client_epsilon']:.3f} (per merchant, whole update; "
                f"delta={row['train_client_delta']:g}, RDP, no sampling amplification; "
                f"clip {row['train_central_clipping_norm']:.3g})"
            )
        if not self.dp:
            parts.append("NO RECORD-LEVEL DP AT MERCHANTS (privacy.enabled=false)")
        elif "epsilon_total_max" in row:
            median = f", median {row['epsilon_total_median']:.3f}" if "epsilon_total_median" in row else ""
            parts.append(
                f"epsilon spent by this round's merchants: max {row['epsilon_total_max']:.3f}{median} "
                f"(per {self.unit}, delta={row['delta']:g}, {self.accountant.upper()} accountant, "
                f"{self.sampling} sampling, {'distributed' if self.distributed else 'local'} mode)"
            )
        return " | ".join(parts)

    def _write_csv(self) -> None:
        keys = sorted({k for row in self.rows for k in row}, key=lambda k: (k != "round", k))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())

    def privacy_summary(self, client_level: dict | None = None) -> dict:
        """Two separate guarantees: record/customer-level per merchant, and client-level per run."""
        finite = [e for e in self.merchant_epsilon.values() if math.isfinite(e)]
        record = "NO record-level DP"
        if self.dp:
            record = ("record-level DP at the population level (distributed mode: merchants' Skellam noise shares "
                      "summed by secure aggregation; holds only while secure aggregation holds)" if self.distributed
                      else "record-level DP per merchant (local DP-SGD)")
        central = "client-level central DP per run (see client_level)" if client_level else "no client-level (central) DP"
        return {
            "guarantee": f"{record}; {central}",
            "client_level": client_level,
            "unit": self.unit if self.dp else "none",
            "accountant": self.accountant if self.dp else "none",
            "sampling": self.sampling if self.dp else "none",
            "mode": ("distributed" if self.distributed else "local") if self.dp else "none",
            "merchants_trained": len(self.merchant_epsilon),
            "epsilon_max": max(finite) if finite else None,
            "epsilon_by_node": self.merchant_epsilon,
            **(self.budgets if self.dp else {}),
        }


def budget_sentence(privacy: dict) -> str | None:
    """The per-customer budget next to this task's (summary.json's ``privacy``), as the run summary and the
    report state it; ``None`` for a run without a budget (privacy off)."""
    if privacy.get("person_epsilon") is not None:
        return (f"per customer across tasks: budget {privacy['person_epsilon']:g} (privacy.person_epsilon, "
                f"enforced by every merchant over its ledgers; this task's budget {privacy['task_epsilon']:.3f} is "
                f"its share between {privacy['person_tasks']} task(s))")
    if privacy.get("task_epsilon") is not None:
        return (f"per customer across tasks: not enforced (privacy.person_epsilon=null); this task's budget "
                f"{privacy['task_epsilon']:g}")
    return None


def summary_lines(summary: dict, run_dir: Path) -> list[str]:
    """The few lines a command prints when a run ends: outcome, task metric, the privacy guarantee, files."""
    final, privacy = summary.get("final_eval") or {}, summary.get("privacy") or {}
    task = summary.get("task", "?")
    metrics = [f"{key} {final[f'eval_{key}']:.4f}" for key in ("hr@10", "ndcg@10", "local_pop_hr@10", "accuracy",
                                                                "macro_f1", "local_majority_accuracy")
               if f"eval_{key}" in final]
    head = f"[{task}] {summary.get('rounds_completed', 0)}/{summary.get('rounds', '?')} rounds in {summary.get('seconds', '?')} s"
    if summary.get("stopped_early"):
        head += f" (stopped early: {summary['stopped_early']})"
    lines = [head + (": " + ", ".join(metrics) if metrics else "")]
    if privacy.get("epsilon_max") is not None:
        lines.append(
            f"  privacy: epsilon max {privacy['epsilon_max']:.3f} over {privacy.get('merchants_trained', 0)} merchants "
            f"(per {privacy['unit']}, delta={final.get('delta', 'see ledgers')}, {str(privacy['accountant']).upper()} "
            f"accountant, {privacy['sampling']} sampling, {privacy['mode']} mode"
            + ("; a population-level epsilon that holds only while secure aggregation holds)"
               if privacy["mode"] == "distributed" else ")"))
    budget = budget_sentence(privacy)
    if budget:
        lines.append(f"  {budget}")
    lines.append(f"  guarantee: {privacy.get('guarantee', 'unknown')}")
    if privacy.get("client_level"):
        lines.append(f"  client-level: {json.dumps(privacy['client_level'], default=str)}")
    lines.append(f"  run dir: {run_dir}")
    return lines


def budget_summary(privacy) -> dict:
    """The proposed budgets of a run (a ``MerchantPrivacy``): each merchant may lower its own."""
    return {"task_epsilon": float(privacy.epsilon), "person_epsilon": privacy.person_epsilon,
            "person_tasks": int(privacy.person_tasks)}
