"""Dropouts: does a federation in which 30% of the sampled merchants fail each round end as good as one
without failures? For each privacy mode (no DP, local DP, client-level central DP, distributed DP under
SecAgg+), ``storefed simulate`` runs with ``federation.failure_rate`` 0 and the given rate for each
seed, side by side in one invocation; the final task metric is read from each run's summary, where
every store evaluates the final model (``eval_stores_per_round = num_stores``), so the comparison is
not blurred by which stores happened to evaluate.

    python -m storefed.simulations.dropout_study --seeds 0 1 2 --out runs/dropouts

Prints one JSON line per run and a table: mean over seeds, the ratio failing / no failure, and the
share of train calls that failed. The DP noise is drawn from OS entropy (never seeded), so two runs
of the same seed differ by their noise as well: the seeds average that out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE = ["task=recommender", "federation.num_stores=40", "federation.stores_per_round=10",
        "federation.eval_stores_per_round=40", "federation.rounds=5", "data.generator.num_items=500"]
MODES: dict[str, list[str]] = {
    "no DP": ["privacy=none"],
    "local DP": [],
    # adaptive clipping tracks the median update norm; noise 0.1 x that bound on the sum of 10 updates
    "client-level central DP": ["privacy.central=adaptive", "privacy.central_noise_multiplier=0.1",
                                "privacy.central_clipping_norm=1.0", "privacy.central_epsilon=10000"],
    # noise shares sized so that 5 of the 10 sampled merchants' shares already carry the full noise;
    # every merchant shares its SecAgg+ secrets with all others, any 4 shares reconstruct a dropout's mask
    "distributed DP (SecAgg+)": ["privacy.mode=distributed", "privacy.sample_rate=0.2", "privacy.min_survivors=5",
                                 "privacy.secagg_num_shares=10", "privacy.secagg_reconstruction_threshold=4"],
}
SLUGS = dict(zip(MODES, ("none", "local", "central", "distributed")))
METRIC = "eval_hr@10"


def run_once(out: Path, mode: str, overrides: list[str], rate: float, seed: int, overselect: float = 1.0) -> dict:
    run_dir = out / f"{SLUGS[mode]}-fail{rate:g}-over{overselect:g}-seed{seed}"
    command = [sys.executable, "-m", "storefed", "simulate", *BASE, *overrides, f"seed={seed}",
               f"federation.failure_rate={rate}", f"federation.overselect={overselect}", f"run_dir={run_dir}"]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    row = {"mode": mode, "failure_rate": rate, "overselect": overselect, "seed": seed, "exit": done.returncode,
           "seconds": round(time.time() - started, 1), "run_dir": str(run_dir)}
    if done.returncode != 0:
        return row | {"error": (done.stderr or done.stdout)[-500:]}
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    sampled = sum(r.get("trained", 0) + r.get("refused", 0) + r.get("failed", 0) + r.get("rejected", 0) for r in rows)
    return row | {"metric": summary["final_eval"].get(METRIC), "rounds_completed": summary["rounds_completed"],
                  "failed_calls": sum(r.get("failed", 0) for r in rows), "sampled_calls": sampled}


def table(rows: list[dict], rate: float) -> str:
    lines = [f"| mode | HR@10, no failures (mean over seeds) | HR@10, {rate:.0%} failing | ratio | failed calls | "
             "runs completed |", "| --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        base = [r["metric"] for r in rows if r["mode"] == mode and r["failure_rate"] == 0 and r.get("metric")]
        fail = [r for r in rows if r["mode"] == mode and r["failure_rate"] == rate]
        values = [r["metric"] for r in fail if r.get("metric") is not None]
        if not base or not values:
            lines.append(f"| {mode} | {base} | {values} | - | - | {sum(r['exit'] == 0 for r in fail)}/{len(fail)} |")
            continue
        b, f = statistics.mean(base), statistics.mean(values)
        calls = f"{sum(r['failed_calls'] for r in fail)}/{sum(r['sampled_calls'] for r in fail)}"
        lines.append(f"| {mode} | {b:.4f} | {f:.4f} | {f / b:.3f} | {calls} | "
                     f"{sum(r['exit'] == 0 for r in fail)}/{len(fail)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storefed.simulations.dropout_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--overselect", type=float, default=1.0,
                        help="federation.overselect of the failing runs (e.g. 1.43 = 1 / (1 - 0.3))")
    parser.add_argument("--out", type=Path, default=Path("runs/dropouts"))
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"dropout_study: --out {args.out} is not empty: choose a new folder", file=sys.stderr)
        return 2
    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            for rate in (0.0, args.rate):
                row = run_once(args.out, mode, MODES[mode], rate, seed, args.overselect if rate else 1.0)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"failing runs with federation.overselect={args.overselect:g}")
    print(table(rows, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
