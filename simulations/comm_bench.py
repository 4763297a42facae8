"""Bytes per merchant per round, down and up, for every task and update encoding, measured side by side.

    python -m storefed.simulations.comm_bench [--items 1000 50000] [--quality --seeds 0 1 2]

Sizes: each task's global model (what a merchant downloads) and its update as sent under each
``federation.update_encoding`` (a real encoded update of a DP-noised model: the payload bytes of
the ArrayRecord). ``--quality`` also runs ``storefed simulate`` per encoding and seed, side by side,
and reports the final HR@10 relative to float32. Prints one JSON line per row and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from storefed.config import compose
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog
from storefed.models.task import build_task
from storefed.update_codec import ENCODINGS, encode_update, encoded_bytes

QUALITY_BASE = ["task=recommender", "federation.num_stores=40", "federation.stores_per_round=10",
                "federation.eval_stores_per_round=40", "federation.rounds=5", "data.generator.num_items=500"]


def sizes(task_name: str, num_items: int) -> list[dict]:
    """One row per encoding: download bytes (the float32 global model) and upload bytes."""
    cfg = compose("simulate", [f"task={task_name}"]).task
    catalog = generate_catalog(StoreGeneratorConfig(num_items=num_items))
    task = build_task(cfg, catalog, seed=0)
    model = task.build_model()
    state = model.state_dict()
    shared = {k: state[k].detach().cpu().float() for k in task.shared_keys(model)}
    noised = {k: v + 0.01 * torch.randn_like(v) for k, v in shared.items()}  # a trained, DP-noised update
    rows = []
    for encoding in ENCODINGS:
        sent = encode_update(noised, shared, encoding)
        rows.append({"task": task_name, "model": getattr(cfg, "model", getattr(cfg, "encoder", "")),
                     "items": num_items, "encoding": encoding, "down_bytes": encoded_bytes(shared),
                     "up_bytes": encoded_bytes(sent), "up_ratio_vs_float32": encoded_bytes(shared) / encoded_bytes(sent)})
    return rows


def quality(encoding: str, seed: int, out: Path) -> dict:
    run_dir = out / f"{encoding}-seed{seed}"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "storefed", "simulate", *QUALITY_BASE, f"seed={seed}",
                           f"federation.update_encoding={encoding}", f"run_dir={run_dir}"],
                          capture_output=True, text=True)
    row = {"encoding": encoding, "seed": seed, "exit": done.returncode, "seconds": round(time.time() - started, 1)}
    if done.returncode:
        return row | {"error": done.stderr[-400:]}
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return row | {"hr@10": summary["final_eval"].get("eval_hr@10")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storefed.simulations.comm_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/comm"))
    args = parser.parse_args(argv)
    rows = [row for items in args.items for row in sizes("recommender", items)] + sizes("review", 1000)
    for row in rows:
        print(json.dumps(row))
    print("| task | items | encoding | down (bytes) | up (bytes) | up: float32 / this |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['task']} ({r['model']}) | {r['items']} | {r['encoding']} | {r['down_bytes']:,} | {r['up_bytes']:,} | "
              f"{r['up_ratio_vs_float32']:.2f}x |")
    if args.quality:
        results = [quality(e, s, args.out) for s in args.seeds for e in ENCODINGS]
        for row in results:
            print(json.dumps(row))
        base = statistics.mean(r["hr@10"] for r in results if r["encoding"] == "float32" and r.get("hr@10"))
        print("| encoding | HR@10 (mean over seeds) | vs float32 |\n| --- | --- | --- |")
        for encoding in ENCODINGS:
            values = [r["hr@10"] for r in results if r["encoding"] == encoding and r.get("hr@10") is not None]
            if values:
                print(f"| {encoding} | {statistics.mean(values):.4f} | {statistics.mean(values) / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
