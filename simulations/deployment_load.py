"""Load check: a real loopback deployment (TLS gRPC, node authentication) with N merchant processes.

    python -m storefed.simulations.deployment_load --merchants 8 --rounds 5 --out runs/load

Creates a CA, the coordinator's certificate and N merchant keys (``storefed certs``), N merchant
directories of virtual stores, starts ``storefed server`` and N ``storefed merchant`` processes, waits
for the run, and prints one JSON line and a table: exit codes, rounds completed, merchants trained per
round, wall time, and the peak resident memory of all StoreFed processes together (sampled every
0.5 s from /proc). Every process is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from storefed.data.merchant_files import write_catalog, write_merchant_dir
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.flower_env import flower_env


def free_ports(n: int) -> list[int]:
    """n free TCP ports on 127.0.0.1 (bound, read, released)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _storefed(*args: str) -> list[str]:
    return [sys.executable, "-m", "storefed", *args]


def _tree_rss_mib(pids: list[int]) -> float:
    """Resident memory of the given processes and all their descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, list(pids)
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storefed.simulations.deployment_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merchants", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/load"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        print(f"deployment_load: --out {out} is not empty: choose a new folder", file=sys.stderr)
        return 2
    names = [f"shop-{i:02d}" for i in range(args.merchants)]
    certs = out / "certs"
    subprocess.run(_storefed("certs", f"out_dir={certs}", f"merchants=[{','.join(names)}]"), check=True,
                   capture_output=True)
    gen = StoreGeneratorConfig(num_items=500, mean_customers=60)
    catalog = generate_catalog(gen)
    write_catalog(catalog, out / "catalog.csv")
    for i, name in enumerate(names):
        write_merchant_dir(generate_store(gen, i), catalog, out / name)
        (out / name / "catalog.csv").write_bytes((out / "catalog.csv").read_bytes())
    fleet, control, *node_ports = free_ports(2 + args.merchants)
    env = flower_env()
    procs: list[subprocess.Popen] = []
    started, peak, code = time.time(), 0.0, None
    try:
        server_log = open(out / "server.log", "w")
        server = subprocess.Popen(_storefed(
            "server", f"run_dir={out / 'run'}", f"server.certs_dir={certs}",
            f"server.authorized_dir={certs / 'merchants'}", f"server.fleet_address=127.0.0.1:{fleet}",
            f"server.control_port={control}", f"data.catalog={out / 'catalog.csv'}",
            f"federation.num_stores={args.merchants}", f"federation.stores_per_round={args.merchants}",
            f"federation.rounds={args.rounds}", "task.epochs=1"), stdout=server_log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True)
        procs.append(server)
        while f"registered {args.merchants} merchant key(s)" not in (out / "server.log").read_text() \
                and server.poll() is None and time.time() - started < 300:
            time.sleep(0.5)  # a merchant that connects before its key is registered is refused for good
        for name, port in zip(names, node_ports):
            log = open(out / f"{name}.log", "w")
            procs.append(subprocess.Popen(_storefed(
                "merchant", f"data_dir={out / name}", f"ledger_dir={out / name / 'ledger'}",
                f"superlink=127.0.0.1:{fleet}", f"ca_cert={certs / 'ca.crt'}",
                f"private_key={certs / 'merchants' / name}", f"port={port}"), stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True))
        while code is None and time.time() - started < 3600:
            peak = max(peak, _tree_rss_mib([p.pid for p in procs]))
            code = server.poll()
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()] \
        if (out / "run" / "metrics.jsonl").exists() else []
    result = {"merchants": args.merchants, "rounds": args.rounds, "server_exit": code,
              "rounds_completed": len(rows), "trained_per_round": [r.get("trained", 0) for r in rows],
              "wall_s": round(time.time() - started, 1), "peak_rss_mib_all_processes": round(peak),
              "cpus": os.cpu_count()}
    print(json.dumps(result))
    print(f"| merchants | rounds completed | trained per round | wall s | peak RSS, all processes (MiB) |\n"
          f"| --- | --- | --- | --- | --- |\n| {args.merchants} | {len(rows)}/{args.rounds} | "
          f"{result['trained_per_round']} | {result['wall_s']} | {result['peak_rss_mib_all_processes']} |")
    return 0 if code == 0 and len(rows) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
