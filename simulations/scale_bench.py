"""``storefed bench scale``: the simulation harness against the same merchants' work in one process.

For each fleet size it runs ``storefed simulate`` (recommender, local DP, no evaluation rounds, so a
round is the train phase) in a subprocess, sampling the resident memory of the whole process tree
(driver, Ray and its actors) every 0.5 s. It reads each round's wall clock from ``metrics.jsonl``
and which merchants trained in each round from their ledgers, then replays exactly those merchants'
rounds, in order, in this process with ``client.training_round.train_round`` (data, noise planning,
DP training, ledger: everything a merchant does, without Flower and Ray). Printed, side by side:

- harness round / the same merchants' rounds in one process, per round after the first;
- round 1 / the median later round (actor start-up, imports);
- peak memory per fleet size (flat means stores are generated only when their client needs them);
- the warm-up before round 1 (server/warm_up.py), one poll sweep of Flower's engine over its nodes and
  the resident bytes per node of its node registry (each in a fresh process), with ``--stock`` also for
  Flower's engine unchanged without warm-up (simulations/flower_engine.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from storefed.cache_dir import cache_root
from storefed.console import setup_console
from storefed.simulations.deployment_load import _tree_rss_mib
from storefed.simulations.flower_engine import STOCK_ENGINE_ENV, _flower_poll, poll_pending_nodes


def registered_fleet(register, num_nodes: int):
    """Flower's in-memory LinkState (as its Simulation Engine creates it) with ``num_nodes`` simulation nodes
    registered by ``register`` (Flower's ``_register_nodes`` or ours) and one run:
    ``(state, {node_id: partition_id}, run_id)``."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = register(num_nodes, factory)
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, "bench", "serverapp")
    return state, mapping, run_id


def fleet_state(num_nodes: int, pending: int):
    """Flower's in-memory LinkState with ``num_nodes`` registered simulation nodes and one undelivered
    message for each of the last ``pending`` of them (so that Flower's sweep reaches them last):
    ``(state, {node_id: partition_id}, pending node ids)``."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.task_identity import TaskIdentity

    from storefed.simulations.evaluation.federated import flower_identity

    state, mapping, run_id = registered_fleet(vce_api._register_nodes, num_nodes)
    targets = list(mapping)[-pending:]
    with flower_identity():  # restores this process's identity after
        TaskIdentity.run_id, TaskIdentity.node_id = run_id, SUPERLINK_NODE_ID  # push as a ServerApp does
        for node_id in targets:
            message = Message(RecordDict(), dst_node_id=node_id, message_type="query")
            message.metadata.__dict__["_message_id"] = message.object_id  # what the Grid assigns on push
            if state.store_message_ins(message) is None:
                raise RuntimeError("Flower refused a benchmark message")
    return state, mapping, targets


def registry_bytes_here(num_nodes: int, packed: bool) -> float:
    """Resident bytes per node this process gains while ``num_nodes`` simulation nodes register (Linux /proc)."""
    from storefed.simulations import flower_engine

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    register = flower_engine.register_nodes_packed if packed else flower_engine._flower_register_nodes
    before = resident()
    state, mapping, _ = registered_fleet(register, num_nodes)  # ``state`` holds the registry while measured
    return (resident() - before) / len(mapping)


_REGISTRY_CHILD = ("import sys; from storefed.simulations.scale_bench import registry_bytes_here; "
                   "print(registry_bytes_here(int(sys.argv[1]), sys.argv[2] == 'packed'))")


def poll_sweep_seconds(poller, num_nodes: int, pending: int) -> float:
    """Seconds until ``poller`` (Flower's or ours) has queued every pending message of a fresh fleet state:
    one full sweep over the nodes for Flower's, which repeats it every 0.1 s for the whole round."""
    import threading
    from queue import Queue

    state, mapping, targets = fleet_state(num_nodes, pending)
    queue, stop = Queue(), threading.Event()
    start = time.perf_counter()
    thread = threading.Thread(target=poller, args=(state, queue, mapping, stop), daemon=True)
    thread.start()
    got = [queue.get(timeout=120) for _ in targets]
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    if sorted(m.metadata.dst_node_id for m in got) != sorted(targets):
        raise RuntimeError("the poller delivered other messages than the pending ones")
    return seconds


def registry_bytes_per_node(num_nodes: int, packed: bool) -> float:
    """Resident bytes per node that Flower's in-memory LinkState gains when ``num_nodes`` simulation nodes
    register, Flower's way or packed (simulations/flower_engine.py), in a fresh process (Linux /proc)."""
    out = subprocess.run([sys.executable, "-c", _REGISTRY_CHILD, str(num_nodes), "packed" if packed else "flower"],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _simulate(stores: int, per_round: int, rounds: int, run_dir: Path, stock: bool = False) -> tuple[float, float]:
    """Run one simulation; (wall seconds, peak resident MiB of its process tree). ``stock``: Flower's
    engine unchanged and no warm-up (what the harness was before simulations/flower_engine.py)."""
    command = [sys.executable, "-m", "storefed", "simulate", "task=recommender", f"federation.num_stores={stores}",
               f"federation.stores_per_round={per_round}", "federation.eval_stores_per_round=0",
               f"federation.rounds={rounds}", f"run_dir={run_dir}", f"federation.warm_up={str(not stock).lower()}"]
    env = dict(os.environ)
    if stock:
        env[STOCK_ENGINE_ENV] = "stock"
    start, peak = time.monotonic(), 0.0
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while proc.poll() is None:
        peak = max(peak, _tree_rss_mib([proc.pid]))
        time.sleep(0.5)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"storefed simulate ({stores} stores) failed: {stderr[-2000:]}")
    return time.monotonic() - start, peak


def _rounds_of(run_dir: Path) -> dict[int, list[int]]:
    """Partition ids of the merchants that trained in each round (from their ledgers)."""
    trained: dict[int, list[int]] = {}
    for path in sorted((run_dir / "ledgers").glob("*.recommender.ledger.json")):
        ledger = json.loads(path.read_text(encoding="utf-8"))
        partition = int(ledger["merchant_id"].rsplit("-", 1)[1])
        for record in ledger["rounds"]:
            trained.setdefault(int(record["server_round"]), []).append(partition)
    return trained


def _in_process(run_dir: Path, trained: dict[int, list[int]]) -> dict[int, float]:
    """Seconds of each round's merchants' ``train_round`` calls, one after another in this process
    (the run's own settings, ledgers in a fresh folder so the budgets start where the run's did)."""
    import yaml

    from storefed.client.training_round import train_round
    from storefed.config.schema import RunConfig
    from storefed.config.serialize import from_dict
    from storefed.server.run_setup import prepare_run

    settings = from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        setup = prepare_run(settings, Path(tmp) / "run")
        privacy = dataclasses.replace(setup.to_clients.privacy, ledger_dir=str(Path(tmp) / "ledgers"))
        config = dataclasses.replace(setup.to_clients, privacy=privacy)
        state = {k: torch.as_tensor(v) for k, v in setup.shared.items()}
        seconds = {}
        for server_round in sorted(trained):
            start = time.perf_counter()
            for partition in trained[server_round]:
                train_round(config, state, server_round, 0.0, {"partition-id": partition})
            seconds[server_round] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storefed bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="100,1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--cold", action="store_true", help="empty the on-disk RDP cache first (a fresh machine)")
    parser.add_argument("--stock", action="store_true",
                        help="also run each size on Flower's engine unchanged, without warm-up, side by side")
    args = parser.parse_args(argv)
    setup_console(simulated_merchants=True)  # the in-process replay's merchant lines stay quiet, as in simulation
    sizes = [int(s) for s in args.stores.split(",")]
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        print(f"storefed bench scale: --out {out} is not empty; give a new folder", file=sys.stderr)
        return 2
    rows = []
    for stores in sizes:
        for stock in (False, True) if args.stock else (False,):
            if args.cold:  # every run starts from a fresh machine's caches
                shutil.rmtree(cache_root() / "rdp", ignore_errors=True)
            rows.append(_measure(stores, args, out / f"stores-{stores}{'-stock' if stock else ''}", stock))
            print(json.dumps(rows[-1], default=lambda v: round(v, 4)), flush=True)
    _print_table(rows, args)
    return 0


def _measure(stores: int, args: argparse.Namespace, run_dir: Path, stock: bool) -> dict:
    wall, peak = _simulate(stores, args.per_round, args.rounds, run_dir, stock)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    harness = {int(m["round"]): float(m["train_seconds"]) for m in metrics}
    local = _in_process(run_dir, _rounds_of(run_dir))
    later = [r for r in harness if r > 1]
    warm = run_dir / "warm_up.json"
    return {
        "stores": stores, "engine": "flower-stock" if stock else "storefed", "per_round": args.per_round,
        "rounds": args.rounds, "wall_s": round(wall, 1), "peak_rss_mib": round(peak),
        "warm_up_s": json.loads(warm.read_text())["seconds"] if warm.exists() else 0.0,
        "harness_round_s": harness, "in_process_round_s": local,
        "round1_over_later": harness[1] / statistics.median(harness[r] for r in later),
        "harness_over_in_process_later": statistics.median(harness[r] / local[r] for r in later),
        "poll_sweep_s": poll_sweep_seconds(_flower_poll if stock else poll_pending_nodes, stores, args.per_round),
        "node_registry_bytes_per_node": registry_bytes_per_node(stores, packed=not stock),
        "device": "cpu", "cpus": os.cpu_count(), "client_cpus": 1,
    }


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nstorefed bench scale: recommender, local DP, {args.per_round} merchants per round, {args.rounds} rounds, "
          f"no evaluation rounds; {os.cpu_count()} CPUs, 1 CPU per virtual client; round = train phase wall clock; "
          f"poll sweep = one pass of the engine over its nodes with {args.per_round} messages pending; "
          f"node registry = resident bytes per registered node in Flower's LinkState (fresh process)\n")
    print("stores | engine | peak memory MiB (process tree) | warm-up s | round 1 s | later rounds s (median) | "
          "same merchants in one process s (median) | harness / in-process | round 1 / later | poll sweep s | "
          "node registry B/node | run wall s")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for row in rows:
        later = [r for r in row["harness_round_s"] if r > 1]
        print(f"{row['stores']:,} | {row['engine']} | {row['peak_rss_mib']:,} | {row['warm_up_s']:.1f} | "
              f"{row['harness_round_s'][1]:.1f} | {statistics.median(row['harness_round_s'][r] for r in later):.1f} | "
              f"{statistics.median(row['in_process_round_s'][r] for r in later):.1f} | "
              f"{row['harness_over_in_process_later']:.2f}x | {row['round1_over_later']:.2f}x | "
              f"{row['poll_sweep_s']:.4f} | {row['node_registry_bytes_per_node']:,.0f} | {row['wall_s']:.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
