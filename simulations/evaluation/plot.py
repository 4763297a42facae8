"""The privacy-utility plot: primary metric vs epsilon, one panel per (K, partition).

Lines with error bars (mean ± std over seeds): federated DP and centralized DP at each target
epsilon. Horizontal lines: centralized non-private, federated non-private, local-only and the
popularity / majority baseline (each dashed at its mean). Matplotlib's Agg backend, written
atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

from storefed.atomic_files import atomic_write_bytes
from storefed.simulations.evaluation.report import METHOD_LABELS
from storefed.wire import PRIMARY_METRIC

CURVES = {"federated_dp": ("tab:blue", "o"), "centralized_dp": ("tab:orange", "s"),
          "federated_dp_distributed": ("tab:green", "^")}
LEVELS = {
    "centralized": ("tab:red", "-"),
    "federated": ("tab:purple", "-."),
    "local": ("tab:green", "--"),
    "popularity": ("tab:gray", ":"),
    "local_popularity": ("black", ":"),
    "majority": ("tab:gray", ":"),
    "tfidf_logreg": ("tab:brown", "--"),
}


def privacy_utility_plot(path: Path, task: str, summary: list[dict], unit: str, delta: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = PRIMARY_METRIC[task]
    ks = sorted({s["num_merchants"] for s in summary})
    partitions = sorted({s["partition"] for s in summary})
    fig, axes = plt.subplots(len(ks), len(partitions), figsize=(max(7.0, 5.2 * len(partitions)), 3.6 * len(ks) + 1.6), squeeze=False)
    epsilons = sorted({s["epsilon"] for s in summary if s["epsilon"] is not None})
    for row, k in enumerate(ks):
        for col, partition in enumerate(partitions):
            ax = axes[row][col]
            members = [s for s in summary if s["num_merchants"] == k and s["partition"] == partition and metric in s["stats"]]
            for method, (color, marker) in CURVES.items():
                points = sorted((s["epsilon"], s["stats"][metric]) for s in members if s["method"] == method)
                if points:
                    ax.errorbar(
                        [e for e, _ in points], [p["mean"] for _, p in points], yerr=[p["std"] for _, p in points],
                        color=color, marker=marker, capsize=3, label=METHOD_LABELS[method],
                    )
            for method, (color, style) in LEVELS.items():
                for s in members:
                    if s["method"] == method:
                        ax.axhline(s["stats"][metric]["mean"], color=color, linestyle=style, label=METHOD_LABELS[method])
            ax.set_xscale("log")
            if epsilons:
                ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
                ax.minorticks_off()
            ax.set_xlabel(f"epsilon (per {unit}, delta={delta:g})")
            ax.set_ylabel(metric)
            ax.set_title(f"K={k}, {partition}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(f"StoreFed privacy-utility: {task}\n{metric} vs epsilon, mean ± std over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 1.4 / (3.6 * len(ks) + 1.6), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def dp_ratio_by_customers(path: Path, task: str, rows: list[dict], delta: float,
                          private: str = "federated_dp_distributed", reference: str = "federated") -> Path | None:
    """Private / non-private primary metric (mean over seeds per K) against the platform's customer
    count, one line per target epsilon; None when the rows lack either method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = PRIMARY_METRIC[task]
    ratios = dp_ratios(rows, metric, private, reference)
    if not ratios:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for epsilon in sorted({e for e, _ in ratios}):
        points = sorted((c, r) for (e, c), r in ratios.items() if e == epsilon)
        ax.plot([c for c, _ in points], [r for _, r in points], marker="o", label=f"epsilon {epsilon:g}")
    ax.axhline(0.9, color="tab:gray", linestyle=":", label="90% of non-private")
    ax.set_xscale("log")
    ax.set_xlabel("customers on the platform")
    ax.set_ylabel(f"{metric}: {METHOD_LABELS[private].split(',')[0]} / non-private")
    ax.set_title(f"{METHOD_LABELS[private]}\nper customer, delta={delta:g}", fontsize=9)
    ax.set_ylim(0, max(1.05, max(ratios.values()) * 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def dp_ratios(rows: list[dict], metric: str, private: str, reference: str) -> dict[tuple[float, float], float]:
    """{(epsilon, mean customers of the K): mean private metric / mean reference metric} per K."""
    out = {}
    for k in sorted({r["num_merchants"] for r in rows}):
        members = [r for r in rows if r["num_merchants"] == k and metric in r["metrics"]]
        base = [r["metrics"][metric] for r in members if r["method"] == reference]
        customers = [r["customers"] for r in members if "customers" in r]
        if not base or not customers or sum(base) == 0:
            continue
        for epsilon in sorted({r["epsilon"] for r in members if r["method"] == private}):
            values = [r["metrics"][metric] for r in members if r["method"] == private and r["epsilon"] == epsilon]
            out[(float(epsilon), sum(customers) / len(customers))] = (sum(values) / len(values)) / (sum(base) / len(base))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m storefed.simulations.evaluation.plot OUT.png RUN_DIR...``: the DP / non-private ratio
    plot over several `storefed evaluate` runs (e.g. one per platform size, each with its own
    validation-chosen settings); prints the ratios it plots."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m storefed.simulations.evaluation.plot OUT.png RUN_DIR...", file=sys.stderr)
        return 2
    rows, metas = [], []
    for run_dir in args[1:]:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            print(f"plot: {path} does not exist: give run dirs of finished `storefed evaluate` runs", file=sys.stderr)
            return 2
        payload = json.loads(path.read_text(encoding="utf-8"))
        rows += payload["rows"]
        metas.append(payload["meta"])
    task = metas[0]["task"]
    out = dp_ratio_by_customers(Path(args[0]), task, rows, float(metas[0]["delta"]))
    if out is None:
        print("plot: the runs lack federated and federated_dp_distributed rows", file=sys.stderr)
        return 2
    for (epsilon, customers), ratio in sorted(dp_ratios(rows, PRIMARY_METRIC[task], "federated_dp_distributed",
                                                        "federated").items()):
        print(f"epsilon {epsilon:g}, {customers:,.0f} customers: {PRIMARY_METRIC[task]} ratio {ratio:.3f}")
    print(f"plot: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
