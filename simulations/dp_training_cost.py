"""Cost of DP-SGD in a merchant's local training, measured side by side in one run.

For each task (recommender, review), trains the same model on the same virtual store with the
platform's own ``train_local`` three ways — non-private, DP with ghost clipping, DP with
Opacus hooks — on the device ``choose_device`` picks (CUDA when present), and prints the time
per optimizer step and peak accelerator memory, with ratios DP / non-private.

    python -m storefed.simulations.dp_training_cost [--device auto|cpu|cuda] [--customers N] [--items N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from storefed.client.device import choose_device
from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.config.schema import RecommenderConfig, ReviewConfig, TaskConfig
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.models.task import build_task

TASKS: dict[str, TaskConfig] = {
    "recommender": RecommenderConfig(embedding_dim=64, max_history=50),
    "review": ReviewConfig(encoder="scratch", vocab_size=4096, max_length=64, hidden_size=128, num_layers=2, num_heads=4,
                           intermediate_size=256),
}
MODES = {"non-private": None, "dp-ghost": "ghost", "dp-hooks": "hooks"}


def measure(task_cfg: TaskConfig, gen: StoreGeneratorConfig, mode: str | None, device: torch.device, epochs: int,
            batch_size: int) -> dict:
    """Seconds per optimizer step (after one warm-up session) and peak accelerator memory."""
    catalog = generate_catalog(gen)
    task = build_task(task_cfg, catalog)
    dataset = task.train_dataset(generate_store(gen, 0))
    dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode) if mode else None
    train_local(task, task.build_model(), dataset, LocalTrainingConfig(1, batch_size, 0.01), dp, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_local(task, task.build_model(), dataset, LocalTrainingConfig(epochs, batch_size, 0.01), dp, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"units": len(dataset), "steps": result.steps, "s_per_step": seconds / result.steps, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--customers", type=int, default=400, help="mean customers of the measured store")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    device = choose_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    gen = StoreGeneratorConfig(num_items=args.items, mean_customers=args.customers, review_probability=0.5)
    rows = []
    for task_name, task_cfg in TASKS.items():
        base = None
        for label, mode in MODES.items():
            row = {"task": task_name, "mode": label} | measure(task_cfg, gen, mode, device, args.epochs, args.batch_size)
            base = base or row
            row["time_ratio"] = row["s_per_step"] / base["s_per_step"]
            row["memory_ratio"] = row["peak_mib"] / base["peak_mib"] if device.type == "cuda" else float("nan")
            rows.append(row)
            print(f"{task_name:12s} {label:12s} units {row['units']:6d} steps {row['steps']:4d} "
                  f"{1000 * row['s_per_step']:8.2f} ms/step  x{row['time_ratio']:.2f} vs non-private  "
                  f"peak {row['peak_mib']:9.1f} MiB  x{row['memory_ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "name": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
