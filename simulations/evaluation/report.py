"""Results of `storefed evaluate`: per-seed rows, mean ± std over seeds, JSON/CSV/Markdown files.

A *row* is one (cell, method, epsilon) result: the pooled metrics plus, for DP methods, the
guarantee it carries (target epsilon, epsilon actually spent, delta, unit, accountant).
The summary groups rows over seeds by (K, partition, method, epsilon): mean and sample
standard deviation (ddof=1; 0.0 for a single seed). Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from storefed.atomic_files import atomic_write_text
from storefed.wire import PRIMARY_METRIC

GROUP_KEYS = ("num_merchants", "partition", "method", "epsilon")
INFO_KEYS = ("delta", "unit", "accountant", "private")
METHOD_LABELS = {
    "popularity": "popularity (all data, non-private)",
    "local_popularity": "local popularity (each merchant's own list)",
    "majority": "majority class (all data)",
    "local_majority": "local majority class (each merchant's own)",
    "tfidf_logreg": "TF-IDF + logistic regression (all data, non-private)",
    "centralized": "centralized, non-private",
    "centralized_dp": "centralized DP",
    "local": "local-only (each merchant alone, non-private)",
    "federated": "federated, non-private",
    "federated_dp": "federated DP, local mode (noise at each merchant)",
    "federated_dp_distributed": "federated DP, distributed mode (Skellam shares, secure sum)",
    "federated_dp_distributed_prior": "federated DP, distributed mode + DP popularity prior (same budget)",
}


def metric_keys(task: str, rows: list[dict]) -> list[str]:
    """The metric columns of ``rows`` (primary metric first)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["metrics"] if k not in keys]
    primary = PRIMARY_METRIC[task]
    return sorted(keys, key=lambda k: (k != primary, k.startswith("sampled"), k))


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std (ddof=1) of every metric over the seeds of each (K, partition, method, epsilon)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in GROUP_KEYS)].append(row)
    out = []
    for key, members in groups.items():
        summary = dict(zip(GROUP_KEYS, key))
        summary.update({k: members[0].get(k) for k in INFO_KEYS})
        summary["seeds"] = sorted(r["seed"] for r in members)
        summary["evaluated"] = sorted({r["metrics"]["num-examples"] for r in members})
        spent = [r["epsilon_spent"] for r in members if r.get("epsilon_spent") is not None]
        summary["epsilon_spent_max"] = max(spent) if spent else None
        stats = {}
        for metric in members[0]["metrics"]:
            if metric in ("num-examples", "merchants"):
                continue
            values = np.array([r["metrics"][metric] for r in members], dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            stats[metric] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
        summary["stats"] = stats
        out.append(summary)
    return out


def _eps(value) -> str:
    return "—" if value is None else f"{value:g}"


def markdown(task: str, summary: list[dict], header: str) -> str:
    """One table per (K, partition): methods as rows, metrics as ``mean ± std`` columns."""
    metrics = [m for m in metric_keys(task, [{"metrics": s["stats"]} for s in summary])]
    lines = [header, ""]
    cells = sorted({(s["num_merchants"], s["partition"]) for s in summary})
    order = list(METHOD_LABELS)
    for k, partition in cells:
        members = [s for s in summary if (s["num_merchants"], s["partition"]) == (k, partition)]
        members.sort(key=lambda s: (order.index(s["method"]) if s["method"] in order else 99, s["epsilon"] or 0))
        lines += [f"### K = {k} merchants, {partition} partition", ""]
        lines.append("| method | epsilon (target) | epsilon spent (max) | delta | unit | " + " | ".join(metrics) + " | seeds | evaluated |")
        lines.append("| --- " * (len(metrics) + 7) + "|")
        for s in members:
            cols = [
                METHOD_LABELS.get(s["method"], s["method"]),
                _eps(s["epsilon"]),
                "—" if s["epsilon_spent_max"] is None else f"{s['epsilon_spent_max']:.3f}",
                "—" if not s["private"] else f"{s['delta']:g}",
                s["unit"] if s["private"] else "—",
            ]
            cols += [f"{s['stats'][m]['mean']:.4f} ± {s['stats'][m]['std']:.4f}" if m in s["stats"] else "" for m in metrics]
            cols += [str(len(s["seeds"])), "/".join(str(n) for n in s["evaluated"])]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    return "\n".join(lines)


def _mean(summary: list[dict], k: int, partition: str, method: str, metric: str, epsilon=None) -> float | None:
    for s in summary:
        if (s["num_merchants"], s["partition"], s["method"], s["epsilon"]) == (k, partition, method, epsilon):
            return s["stats"][metric]["mean"] if metric in s["stats"] else None
    return None


def targets(task: str, summary: list[dict]) -> str:
    """The issue's targets, checked on the means, one line per (K, partition).

    Recommender: federated DP at the largest epsilon reaches >= 90% of centralized non-private
    HR@10 and beats local-only and popularity. Review: federated DP at the largest epsilon is
    within 5 points macro-F1 of centralized non-private.
    """
    metric = PRIMARY_METRIC[task]
    epsilons = sorted({s["epsilon"] for s in summary if s["method"] == "federated_dp"})
    if not epsilons:
        return ""
    eps = epsilons[-1]
    lines = [f"### Targets (means over seeds; federated DP at epsilon = {eps:g})", ""]
    for k, partition in sorted({(s["num_merchants"], s["partition"]) for s in summary}):
        fed = _mean(summary, k, partition, "federated_dp", metric, eps)
        central = _mean(summary, k, partition, "centralized", metric)
        if fed is None or central is None:
            continue
        if task == "recommender":
            local = _mean(summary, k, partition, "local", metric)
            pop = _mean(summary, k, partition, "popularity", metric)
            ratio = fed / central if central else float("nan")
            checks = [f"{ratio:.0%} of centralized non-private ({fed:.4f} vs {central:.4f}; target >= 90%: "
                      f"{'met' if ratio >= 0.9 else 'MISSED'})"]
            if local is not None:
                checks.append(f"vs local-only {local:.4f}: {'beats' if fed > local else 'does NOT beat'}")
            if pop is not None:
                checks.append(f"vs popularity {pop:.4f}: {'beats' if fed > pop else 'does NOT beat'}")
        else:
            gap = central - fed
            checks = [f"{fed:.4f} vs centralized non-private {central:.4f}: {gap * 100:+.1f} points below "
                      f"(target within 5 points: {'met' if gap <= 0.05 else 'MISSED'})"]
        lines.append(f"- K={k}, {partition}: {metric} " + "; ".join(checks))
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], metrics: list[str]) -> str:
    """One line per per-seed row."""
    buffer = io.StringIO()
    fields = ["task", "data", "num_merchants", "partition", "seed", "method", "epsilon", "epsilon_spent", "delta",
              "unit", "accountant", "private", "seconds", *metrics, "num-examples", "merchants"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: row.get(k) for k in fields if k not in row["metrics"]}
        flat.update({k: row["metrics"].get(k) for k in metrics + ["num-examples", "merchants"]})
        writer.writerow(flat)
    return buffer.getvalue()


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_results(run_dir: Path, task: str, meta: dict, rows: list[dict]) -> dict[str, Path]:
    """Write results.json (meta, rows, summary), results.csv and results.md; returns their paths."""
    summary = summarize(rows)
    metrics = metric_keys(task, rows)
    released = meta.get("model") == "item_item"
    header = (
        f"## storefed evaluate: task={task}, data={meta['data']}\n\n"
        f"Metrics pooled over merchants (weighted by evaluated {meta['unit']}s); mean ± sample std over seeds. "
        f"DP rows: target epsilon per {meta['unit']}, delta={meta['delta']:g}, {meta['accountant'].upper()} accountant, "
        f"Poisson sampling. Federated: {meta['rounds']} rounds, {meta['participation']}; centralized and local-only: "
        f"{meta['rounds']} x {meta['local_epochs']} epochs. Path: {meta['federated_path']}."
    )
    if released:
        header = (
            f"## storefed evaluate: task={task} (task.model=item_item), data={meta['data']}\n\n"
            f"Metrics pooled over merchants (weighted by evaluated {meta['unit']}s); mean ± sample std over seeds. "
            "Item-item model (EASE on released statistics): centralized, local-only and federated are exact "
            "(no DP; federated = Flower FedAvg of each merchant's per-customer means over 2 rounds). DP rows: "
            f"target epsilon per {meta['unit']}, delta={meta['delta']:g}, distributed mode: two one-shot releases "
            "through integer Skellam shares and a secure sum (popularity, then the co-occurrence of the most popular "
            "items), every customer included (no sampling, q = 1), each customer's rows of L2 norm 1, Skellam RDP "
            "accountant (population-level epsilon, assuming secure aggregation)."
        )
    elif any(r["method"].startswith("federated_dp_distributed") for r in rows):
        header += (
            " Distributed mode: one DP-SGD step per round over all merchants' units, with centralized DP's sampling "
            "rate and number of steps (so as many rounds as centralized DP takes steps), Skellam RDP accountant "
            "(population-level epsilon), integer shares summed in process (SecAgg+ carries them exactly)."
        )
    paths = {"json": run_dir / "results.json", "csv": run_dir / "results.csv", "md": run_dir / "results.md"}
    payload = {"meta": meta, "rows": rows, "summary": summary}
    atomic_write_text(paths["json"], json.dumps(_json_safe(payload), indent=2, default=str))
    atomic_write_text(paths["csv"], to_csv(rows, metrics))
    atomic_write_text(paths["md"], markdown(task, summary, header) + "\n" + targets(task, summary))
    return paths


def rewrite(run_dir: Path) -> dict[str, Path]:
    """Re-render results.csv/md (and the summary in results.json) from ``results.json``'s rows."""
    payload = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    return write_results(Path(run_dir), payload["meta"]["task"], payload["meta"], payload["rows"])
