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
from storefed.simulations.evaluation.report import METHOD_LABELS, PRIMARY

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

    metric = PRIMARY[task]
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
