"""``storefed bench NAME [args]``: the measurements, each printing JSON lines and a table side by side.

    storefed bench dp        DP-SGD step time and memory vs non-private (simulations/dp_training_cost.py)
    storefed bench comm      bytes per merchant per round, down and up, per task and update encoding
                             (--quality: final HR@10 per encoding over seeds; simulations/comm_bench.py)
    storefed bench dropouts  final quality with 30% of merchants failing, per privacy mode
                             (simulations/dropout_study.py)
    storefed bench load      a loopback TLS deployment with N merchant processes (simulations/deployment_load.py)
    storefed bench scale     simulation harness rounds vs the same merchants in one process, round 1 vs later,
                             memory per fleet size (simulations/scale_bench.py)
    storefed bench catalog   model / update size, peak memory and step time, full-table vs hashed item tables,
                             at 50k and 1M catalog items (simulations/catalog_bench.py)

``storefed bench NAME --help`` lists each one's options.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "dp": "storefed.simulations.dp_training_cost",
    "comm": "storefed.simulations.comm_bench",
    "dropouts": "storefed.simulations.dropout_study",
    "load": "storefed.simulations.deployment_load",
    "scale": "storefed.simulations.scale_bench",
    "catalog": "storefed.simulations.catalog_bench",
}


def run_bench_command(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"storefed bench: choose one of {' | '.join(BENCHES)} (storefed bench NAME --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHES[argv[0]])
    sys.argv = [f"storefed bench {argv[0]}", *argv[1:]]  # argparse reads sys.argv in the older benchmarks
    code = module.main(argv[1:]) if argv[0] != "dp" else module.main()
    return int(code or 0)
