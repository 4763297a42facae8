"""The report's PNG plots (matplotlib, Agg backend: no display needed). Each function writes one file.

Every epsilon axis names its unit, delta, accountant and mode; a plot with nothing to draw is not
written (the function returns None) rather than drawn empty.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from storefed.atomic_files import atomic_write_bytes  # noqa: E402
from storefed.simulations.report.run_data import MerchantLedger  # noqa: E402
from storefed.wire import PRIMARY_METRIC  # noqa: E402

BASELINE_METRIC = {"recommender": "local_pop_hr@10", "review": "local_majority_macro_f1"}  # at the merchants
TASK_METRICS = {task: (metric, BASELINE_METRIC[task]) for task, metric in PRIMARY_METRIC.items()}
BASELINE_LABELS = {"local_pop_hr@10": "each merchant's own popularity list",
                   "local_majority_macro_f1": "each merchant's own majority class"}


def _save(fig, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def metric_vs_round(rows: list[dict], task: str, path: Path) -> Path | None:
    metric, baseline = TASK_METRICS.get(task, ("", ""))
    points = [(r["round"], r[f"eval_{metric}"]) for r in rows if f"eval_{metric}" in r]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(*zip(*points), marker="o", label=f"global model ({metric})")
    base = [(r["round"], r[f"eval_{baseline}"]) for r in rows if f"eval_{baseline}" in r]
    if base:
        ax.plot(*zip(*base), marker="s", linestyle="--", color="grey", label=BASELINE_LABELS.get(baseline, baseline))
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} (held-out)")
    ax.set_xticks([r for r, _ in points] if len(points) <= 20 else [r for r, _ in points][:: len(points) // 10])
    ax.set_title(f"{task}: {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def loss_vs_round(rows: list[dict], task: str, path: Path) -> Path | None:
    points = [(r["round"], r["train_train_loss"]) for r in rows if "train_train_loss" in r]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(*zip(*points), marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss (merchants' mean)")
    ax.set_xticks([r for r, _ in points] if len(points) <= 20 else [r for r, _ in points][:: len(points) // 10])
    ax.set_title(f"{task}: training loss per round")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def spent_by_round(ledger: MerchantLedger, rounds: list[int]) -> list[float]:
    """Epsilon the merchant had spent as of each round (carried forward between its rounds; 0 before its first)."""
    out, spent, points = [], 0.0, sorted(ledger.rounds)
    for server_round in rounds:
        while points and points[0][0] <= server_round:
            spent = points.pop(0)[1]
        out.append(spent)
    return out


def epsilon_vs_round(ledgers: list[MerchantLedger], mode: str, path: Path, max_lines: int = 40) -> Path | None:
    """Each merchant's epsilon spent as of each round (from its ledger), with max and median over merchants."""
    ledgers = [ledger for ledger in ledgers if ledger.rounds]
    if not ledgers:
        return None
    first = ledgers[0]
    rounds = list(range(1, max(r for ledger in ledgers for r, _ in ledger.rounds) + 1))
    curves = [spent_by_round(ledger, rounds) for ledger in ledgers]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for curve in curves[:max_lines]:
        ax.step(rounds, curve, where="post", color="tab:blue", alpha=0.3, linewidth=0.9)
    started = [[c[i] for c in curves if c[i] > 0] for i in range(len(rounds))]
    ax.plot(rounds, [max(c[i] for c in curves) for i in range(len(rounds))], color="tab:red", marker="o",
            drawstyle="steps-post", label="max over merchants")
    ax.plot(rounds, [statistics.median(v) if v else 0.0 for v in started], color="black", marker=".",
            drawstyle="steps-post", label="median over merchants that have trained")
    for budget in sorted({ledger.budget for ledger in ledgers})[:3]:
        ax.axhline(budget, color="tab:red", linestyle=":", linewidth=1)
    shown = f"{min(len(ledgers), max_lines)} of {len(ledgers)} merchants drawn" if len(ledgers) > max_lines else \
        f"{len(ledgers)} merchants"
    ax.set_xlabel("server round")
    ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: max(len(rounds) // 10, 1)])
    ax.set_ylabel(f"epsilon spent (per {first.unit})")
    ax.set_title(f"epsilon spent per merchant ({shown}); budget dotted\n"
                 f"delta={first.delta:g}, {first.accountant.upper()} accountant, {mode} mode", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def participation(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bottom = [0] * len(rows)
    for key, color in (("trained", "tab:green"), ("refused", "tab:orange"), ("failed", "tab:red"),
                       ("rejected", "tab:purple")):
        values = [int(r.get(key, 0)) for r in rows]
        if any(values) or key == "trained":
            ax.bar(rounds, values, bottom=bottom, color=color, label=key)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("round")
    ax.set_ylabel("merchants")
    ax.set_title("participation per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def privacy_utility_across_runs(points: list[dict], task: str, path: Path) -> Path | None:
    """Final task metric against each run's epsilon budget (``points``: epsilon, metric, label, unit, delta)."""
    points = [p for p in points if p.get("metric") is not None and p.get("epsilon") is not None]
    if not points:
        return None
    metric = TASK_METRICS.get(task, ("metric",))[0]
    finite = sorted((p for p in points if p["epsilon"] != float("inf")), key=lambda p: p["epsilon"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if finite:
        ax.plot([p["epsilon"] for p in finite], [p["metric"] for p in finite], marker="o", label="DP runs")
        ax.set_xscale("log")
    for p in points:
        if p["epsilon"] == float("inf"):
            ax.axhline(p["metric"], color="grey", linestyle="--", label=f"no DP ({p['label']})")
    unit = next((p["unit"] for p in finite), "unit")
    delta = next((p["delta"] for p in finite), None)
    ax.set_xlabel(f"epsilon budget (per {unit}" + (f", delta={delta:g})" if delta is not None else ")"))
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{task}: privacy-utility across {len(points)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
