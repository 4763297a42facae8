"""Cost of secure aggregation: plain FedAvg vs Flower SecAgg+, side by side in one run.

    python -m storefed.simulations.secagg_cost [key=value ...]      (hydra overrides, e.g. federation.rounds=3)

Both runs use the same config, the same Flower Simulation Engine (Ray) setup, the same ClientApp
and the same ServerApp code (``run_federation`` vs ``run_secure_federation``). Measured: wall time
per round (train + federated evaluation: the median of rounds 2.., whose workers are warm; the mean
over all rounds is printed too), and bytes the coordinator sends
and receives (message contents serialized as Flower's protobuf RecordDict; under SecAgg+ the
merchant-to-merchant key shares are relayed by the coordinator, so they are counted too).
Lives in simulations/ (not a top-level benchmarks/ package: opacus installs one of that name).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from storefed.config.schema import RunConfig

DEFAULTS = [
    "federation.num_stores=4", "federation.stores_per_round=4", "federation.eval_stores_per_round=4",
    "federation.rounds=3", "task.epochs=1", "data.generator.num_items=1000", "data.generator.mean_customers=60",
]


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    exchanges: int = 0  # send_and_receive calls (protocol stages)
    spans: dict[int, list[float]] = field(default_factory=dict)  # round -> [first send, last reply]

    def timed(self, server_round: int, start: float, end: float) -> None:
        span = self.spans.setdefault(server_round, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)

    def steady_seconds_per_round(self) -> float:
        """Median wall time of rounds 2.. (round 1 also pays the Ray workers' first imports)."""
        times = sorted(end - start for r, (start, end) in self.spans.items() if r > 1 or len(self.spans) == 1)
        return times[len(times) // 2]


def _round(msg: Message) -> int:
    if msg.metadata.group_id:  # SecAgg+ and legacy workflows set it
        return int(msg.metadata.group_id)
    return int(msg.content["config"]["server-round"])  # Message-API strategies send it in the config


def _size(msg: Message) -> int:
    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


class CountingGrid(Grid):
    """A Grid that forwards everything and counts the bytes of message contents both ways."""

    def __init__(self, inner: Grid, traffic: Traffic) -> None:
        self.inner, self.traffic = inner, traffic

    @property
    def run(self):
        return self.inner.run

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.traffic.exchanges += 1
        self.traffic.sent += sum(_size(m) for m in messages)
        start = time.perf_counter()
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if messages:
            self.traffic.timed(_round(messages[0]), start, time.perf_counter())
        self.traffic.received += sum(_size(m) for m in replies)
        return replies


def measure(settings: RunConfig, secure: bool, run_dir: Path) -> dict:
    """One simulated run; wall seconds per round and bytes per round at the coordinator."""
    from flwr.simulation import run_simulation

    from storefed.client.client_app import app as client_app
    from storefed.flower_env import prepare_simulation_environment
    from storefed.server.secure_aggregation import run_secure_federation
    from storefed.server.server_app import run_federation

    prepare_simulation_environment(run_dir.parent / ".flwr")
    settings = dataclasses.replace(settings, privacy=dataclasses.replace(settings.privacy, secure_aggregation=secure))
    traffic, clock = Traffic(), {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        counted = CountingGrid(grid, traffic)
        clock["start"] = time.perf_counter()
        if secure:
            run_secure_federation(counted, context, settings, run_dir)
        else:
            run_federation(counted, settings, run_dir)
        clock["end"] = time.perf_counter()

    federation = settings.federation
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=federation.num_stores,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"logging_level": "error", "log_to_driver": False, "include_dashboard": False}},
    )
    status = json.loads((run_dir / "status.json").read_text())
    if status["status"] != "completed":
        raise RuntimeError(f"{'secure' if secure else 'plain'} run failed: {status['error']}")
    rounds = federation.rounds
    return {
        "seconds_per_round": traffic.steady_seconds_per_round(),
        "seconds_per_round_incl_first": (clock["end"] - clock["start"]) / rounds,
        "bytes_sent_per_round": traffic.sent / rounds,
        "bytes_received_per_round": traffic.received / rounds,
        "exchanges_per_round": traffic.exchanges / rounds,
    }


def main(overrides: list[str]) -> None:
    from storefed.config import compose

    settings = compose("simulate", DEFAULTS + overrides)
    fed = settings.federation
    print(f"SecAgg+ cost: {fed.num_stores} stores, {fed.stores_per_round} per round, {fed.rounds} rounds, "
          f"task={settings.task.name}, privacy.enabled={settings.privacy.enabled} "
          f"(2 CPU cores, Ray simulation; Ray start-up excluded)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = measure(settings, False, Path(tmp) / "plain")
        secure = measure(settings, True, Path(tmp) / "secure")
    print(f"{'per round':<28}{'plain FedAvg':>16}{'SecAgg+':>16}{'ratio':>10}")
    rows = (("seconds_per_round", "s"), ("seconds_per_round_incl_first", "s"), ("bytes_sent_per_round", "B"),
            ("bytes_received_per_round", "B"), ("exchanges_per_round", ""))
    for key, unit in rows:
        ratio = secure[key] / plain[key] if plain[key] else float("nan")
        print(f"{key.replace('_per_round', ''):<28}{plain[key]:>15.4g}{unit:1}{secure[key]:>15.4g}{unit:1}{ratio:>9.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
