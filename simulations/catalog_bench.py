"""Model size, update size, memory and step time of the history recommender as the catalog grows:
the full-table model (``task.item_buckets=0``) next to hashed item tables (``task.item_buckets=M``).

For each catalog size, model and mode (non-private; DP-SGD with Opacus ghost clipping, the
project default; DP-SGD with book-keeping, ``privacy.grad_sample_mode=book``: one backward pass)
one *fresh subprocess* builds the task on a synthetic catalog and synthetic customer histories
(uniform items, 2-50 per customer), trains one warm-up session and one timed session with the
platform's own ``train_local``, scores the full-ranking rank of 256 held-out targets over the whole catalog (hashed: exact, in chunks of ``ITEM_CHUNK`` items), and reports:

* ``params`` / ``update_mb``: the federated tensors (``task.shared_keys``), float32, MB = 10^6 bytes;
* ``peak_rss_mb``: the subprocess' peak resident memory, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  (Linux: KiB), i.e. everything the process held at its peak (python, torch, the catalog, data,
  model, optimizer, Opacus buffers); ``base_rss_mb`` is the same reading taken just before the model
  is built (imports + catalog + data), so ``train_rss_mb = peak - base`` is what training and
  evaluation added. CPU memory only: on CUDA the accelerator's ``max_memory_allocated`` is added;
* ``s_per_step``: wall seconds per optimizer step of the timed session (Poisson batches under DP).

    storefed bench catalog [--items 50000 1000000] [--buckets 65536] [--full-at-1m] [--device cpu]
                           [--modes non-private dp-ghost dp-book]

The full-table model at 1M items needs several GB (a ``B x 1M`` logit matrix and its gradients,
plus a 1M-row input and output table with Adam state; measured on CPU at dim 64, batch 256: 7.2 GB
peak RSS non-private, 8.0 GB under DP, 7-13 s per step): it is skipped unless ``--full-at-1m``
(``--skip-full-at-1m`` is the default); its parameter count is then computed, not measured. The
default run (50k and 1M items, full-table at 1M skipped) takes about 2.5 minutes on 2 CPU cores;
``--full-at-1m`` adds about 3 minutes. Step times are wall times on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

RUSAGE_UNIT = 1024  # ru_maxrss is in KiB on Linux
MODES = {"non-private": None, "dp-ghost": "ghost", "dp-book": "book"}
# privacy.mode=distributed: each round is ONE per-unit clipped gradient sum over the sampled customers
# (client/distributed_round.clipped_sum), by Opacus hooks (before) or book-keeping (grad_sample_mode=auto)
DISTRIBUTED_MODES = {"dist-hooks": "hooks", "dist-book": "book"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RUSAGE_UNIT / 1e6


def full_table_params(items: int, dim: int) -> int:
    """Parameters of the full-table model without category tables (input rows + tower + output)."""
    return (items + 1) * dim + dim * dim + dim + items * dim + items


def measure(spec: dict) -> dict:
    """One configuration, in this process (run it in a fresh subprocess for a clean peak RSS)."""
    from storefed.client.device import choose_device
    from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
    from storefed.config.schema import RecommenderConfig
    from storefed.data.schema import Catalog
    from storefed.models.hashed_items import HashedHistoryRecommender
    from storefed.models.recommender import CustomerDataset, chunked_ranks, pad_history, rank_of_targets
    from storefed.models.task import build_task

    torch.set_num_threads(spec["threads"])
    device = choose_device(spec["device"])
    items, batch = spec["items"], spec["batch"]
    catalog = Catalog(item_ids=tuple(f"i{n}" for n in range(items)), categories=("all",) * items)
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, items, size=int(rng.integers(2, 51))) for _ in range(batch * spec["steps"])]
    dataset = CustomerDataset(histories, 50)
    cfg = RecommenderConfig(embedding_dim=spec["dim"], batch_size=batch, item_buckets=spec["buckets"],
                            item_hashes=spec["hashes"], sampled_negatives=spec["negatives"])
    task = build_task(cfg, catalog, seed=0)
    base = _rss_mb()
    model = task.build_model()
    state = model.state_dict()
    params = sum(state[k].numel() for k in task.shared_keys(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec["mode"] in DISTRIBUTED_MODES:
        seconds, steps = _distributed_sums(task, model, dataset, DISTRIBUTED_MODES[spec["mode"]], device, spec)
    else:
        mode = MODES[spec["mode"]]
        dp = DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode) if mode else None
        local = LocalTrainingConfig(1, batch, 0.01)
        train_local(task, task.build_model(), dataset, local, dp, device)  # warm-up session
        start = time.perf_counter()
        steps = train_local(task, model, dataset, local, dp, device).steps
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    test = [(h[:-1], int(h[-1])) for h in histories[:256]]
    start = time.perf_counter()
    with torch.no_grad():
        history = torch.stack([pad_history(h, 50) for h, _ in test]).to(device)
        targets = [t for _, t in test]
        if isinstance(model, HashedHistoryRecommender):
            chunked_ranks(model.score_state(model.encode(history)), model.score_from, [h for h, _ in test], targets,
                          items)
        else:
            scores = model(history).float().cpu()
            for row, (h, t) in enumerate(test):
                scores[row, torch.as_tensor(np.setdiff1d(h, [t]), dtype=torch.long)] = -float("inf")
            rank_of_targets(scores, torch.tensor(targets))
    eval_seconds = time.perf_counter() - start
    peak = _rss_mb()
    accel = torch.cuda.max_memory_allocated() / 1e6 if device.type == "cuda" else None
    return {**spec, "device": str(device), "params": int(params), "update_mb": params * 4 / 1e6,
            "base_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1), "train_rss_mb": round(peak - base, 1),
            "accel_peak_mb": accel, "steps": steps, "s_per_step": seconds / max(steps, 1),
            "eval_s_per_256_customers": eval_seconds, "torch": torch.__version__}


def _distributed_sums(task, model, dataset, grad_sample_mode: str, device, spec: dict) -> tuple[float, int]:
    """Seconds of ``spec["steps"]`` distributed-mode clipped sums of ``batch`` customers each (after one
    warm-up sum), through the product's own ``client.distributed_round.clipped_sum``."""
    from storefed.client.distributed_round import clipped_sum

    model.to(device).train()
    names = task.shared_keys(model)
    batch = spec["batch"]
    clipped_sum(task, model, dataset, np.arange(batch), 1.0, device, names, grad_sample_mode)  # warm-up
    start = time.perf_counter()
    for step in range(spec["steps"]):
        clipped_sum(task, model, dataset, np.arange(step * batch, (step + 1) * batch), 1.0, device, names,
                    grad_sample_mode)
    return time.perf_counter() - start, spec["steps"]


def _run_child(spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "storefed.simulations.catalog_bench", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def _table(rows: list[dict]) -> str:
    head = ("items", "model", "mode", "params", "update MB", "peak RSS MB", "train RSS MB", "s/step", "DP/np time",
            "DP/np peak RSS", "eval s/256")
    out = [" | ".join(head), " | ".join("---" for _ in head)]
    nonprivate = {(r["items"], r["model"]): r.get("s_per_step") for r in rows if r["mode"] == "non-private"}
    np_peak = {(r["items"], r["model"]): r.get("peak_rss_mb") for r in rows if r["mode"] == "non-private"}
    for r in rows:
        if "error" in r or "skipped" in r:
            reason = r.get("error") or r["skipped"]
            size = f"{r['params']:,} | {r['update_mb']:.1f}" if "params" in r else " | "
            out.append(f"{r['items']:,} | {r['model']} | {r['mode']} | {size} | {reason} | | | | | |")
            continue
        ratio = r["s_per_step"] / nonprivate[(r["items"], r["model"])] if nonprivate.get((r["items"], r["model"])) else None
        peak = r["peak_rss_mb"] / np_peak[(r["items"], r["model"])] if np_peak.get((r["items"], r["model"])) else None
        out.append(f"{r['items']:,} | {r['model']} | {r['mode']} | {r['params']:,} | {r['update_mb']:.1f} | "
                   f"{r['peak_rss_mb']:.0f} | {r['train_rss_mb']:.0f} | {r['s_per_step']:.3f} | "
                   f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if peak is None else f'{peak:.2f}x'} | "
                   f"{r['eval_s_per_256_customers']:.2f}")
    return "\n".join(out)


def _size_ratios(rows: list[dict]) -> list[str]:
    lines = []
    for items in sorted({r["items"] for r in rows}):
        full = next((r for r in rows if r["items"] == items and r["model"] == "full"), None)
        hashed = next((r for r in rows if r["items"] == items and r["model"] == "hashed" and "params" in r), None)
        if full and hashed and "params" in full:
            lines.append(f"{items:,} items: hashed / full parameters = {hashed['params'] / full['params']:.3f} "
                         f"({hashed['update_mb']:.1f} MB vs {full['update_mb']:.1f} MB per update)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storefed bench catalog", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[50_000, 1_000_000], help="catalog sizes")
    parser.add_argument("--buckets", type=int, default=65536, help="task.item_buckets of the hashed model")
    parser.add_argument("--hashes", type=int, default=2, help="task.item_hashes")
    parser.add_argument("--negatives", type=int, default=20000, help="task.sampled_negatives")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed session")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    parser.add_argument("--modes", nargs="+", choices=[*MODES, *DISTRIBUTED_MODES], default=list(MODES),
                        help="modes to measure (dist-*: privacy.mode=distributed's one clipped sum per round)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--skip-full-at-1m", dest="full_at_1m", action="store_false", default=False,
                       help="(default) do not train the full-table model at >= 1M items (it needs several GB)")
    group.add_argument("--full-at-1m", dest="full_at_1m", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return 0
    rows = []
    for items in args.items:
        for model, buckets in (("full", 0), ("hashed", args.buckets)):
            for mode in args.modes:
                spec = {"items": items, "model": model, "mode": mode, "buckets": buckets, "hashes": args.hashes,
                        "negatives": args.negatives, "dim": args.dim, "batch": args.batch, "steps": args.steps,
                        "threads": args.threads, "device": args.device}
                if model == "full" and items >= 1_000_000 and not args.full_at_1m:
                    params = full_table_params(items, args.dim)
                    row = {**spec, "params": params, "update_mb": params * 4 / 1e6,
                           "skipped": "not trained (--skip-full-at-1m, the default); parameters computed"}
                else:
                    row = _run_child(spec, args.timeout)
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = next((r["device"] for r in rows if "device" in r), args.device)
    print(f"\ndevice: {device}, torch {torch.__version__}, {args.threads} torch thread(s) per subprocess; "
          f"dim {args.dim}, batch {args.batch}, hashed: {args.buckets} buckets x {args.hashes} hashes, sampled "
          f"softmax with {args.negatives} shared negatives above {args.negatives} items; "
          "peak RSS = ru_maxrss of a fresh subprocess per row (MB = 10^6 bytes)\n")
    print(_table(rows))
    for line in _size_ratios(rows):
        print(line)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
