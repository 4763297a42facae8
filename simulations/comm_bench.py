"""Bytes per merchant per round, down and up, for every task and update encoding, measured side by side.

    python -m storefed.simulations.comm_bench [--items 1000 50000] [--quality --seeds 0 1 2]

Sizes: each task's global model (what a merchant downloads) and its update as sent under each
``federation.update_encoding`` (a real encoded update of a DP-noised model: the payload bytes of
the ArrayRecord). ``--quality`` also runs a federation per encoding and seed, side by side (the in-process
harness through the real ClientApp and strategy; ``--dp`` under local DP), and reports the final
HR@10 of every store relative to float32. Prints one JSON line per row and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from storefed.config import compose
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog
from storefed.models.task import build_task
from storefed.update_codec import ENCODINGS, encode_update, encoded_bytes

QUALITY_BASE = ["task=recommender", "federation.num_stores=40", "federation.stores_per_round=10",
                "federation.rounds=5", "data.generator.num_items=500"]


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


def quality(encoding: str, seed: int, out: Path, private: bool) -> dict:
    """Final pooled HR@10 of a federation run through the real ClientApp and strategy, in one process:
    merchants sampled from the seed, so encodings differ only by what the wire carries (and, under DP,
    by the noise draw)."""
    from storefed.data.sources import load_simulated
    from storefed.simulations.evaluation.federated import run_federated
    from storefed.simulations.evaluation.methods import evaluate_model

    overrides = [*QUALITY_BASE, f"seed={seed}", f"federation.update_encoding={encoding}",
                 f"run_dir={out / f'{encoding}-seed{seed}-dp{int(private)}'}"] + ([] if private else ["privacy=none"])
    settings = compose("simulate", overrides)
    started = time.time()
    result = run_federated(settings, Path(settings.run_dir))
    catalog, _ = load_simulated(settings.data, settings.seed, 0)
    merchants = [load_simulated(settings.data, settings.seed, k)[1] for k in range(settings.federation.num_stores)]
    task = build_task(settings.task, catalog, seed=settings.seed)
    model = task.build_model()
    model.load_state_dict(result.state, strict=False)
    metrics = evaluate_model(task, model, merchants)
    return {"encoding": encoding, "seed": seed, "dp": private, "hr@10": metrics["hr@10"],
            "up_bytes": result.train_metrics[-1].get("update_bytes"), "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storefed.simulations.comm_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--dp", action="store_true", help="--quality under local DP (default: without DP)")
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
        results = [quality(e, s, args.out, args.dp) for s in args.seeds for e in ENCODINGS]
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
