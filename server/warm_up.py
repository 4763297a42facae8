"""Simulation only: warm every Ray actor before round 1, so that round 1 costs what a later round does.

A Ray actor imports the merchant stack (torch, Opacus, Flower's SecAgg+ mod: about 5 s on 2 shared
cores) when it unpickles the ClientApp for its first message. Without a warm-up that lands in round 1
(4-7x a later round). :func:`warm_actors` sends one ``query.warmup`` message per actor, carrying the
round config, before the first round: each actor imports once, builds the public catalog (cached per
process by storefed.data.sources), the task's model and its optimizer (client/warm_up.py) and answers
with its process id. No
merchant data is read and nothing leaves but the pid and seconds. The warm-up's own wall clock is
reported (``warm_up.json`` and one console line), never folded into a round.

Deployed merchants are separate long-lived processes; the coordinator never sends them a warm-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from storefed.atomic_files import atomic_write_text
from storefed.wire import CONFIG, METRICS

WARM_UP_MESSAGE = "query.warmup"
WARM_UP_FILE = "warm_up.json"
NODE_POLL_S = 0.2  # while the simulation registers its nodes


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up did: messages sent, distinct actor processes that answered, seconds, errors."""

    sent: int
    actors: int
    seconds: float
    errors: tuple[str, ...] = ()

    def line(self) -> str:
        ready = f"{self.actors}" if self.actors == self.sent else f"{self.actors} of {self.sent}"
        text = (f"warm-up: {ready} Ray actor(s) ready in {self.seconds:.1f} s (imports, public catalog and model, "
                f"once per actor; before round 1, not counted in it)")
        if self.errors:
            text += f"; {len(self.errors)} failed: {self.errors[0]}"
        return text


def warm_actors(grid: Grid, config: ConfigRecord, actors: int, timeout_s: float) -> WarmUp:
    """Send ``actors`` warm-up messages to distinct nodes and wait for their replies (at most ``timeout_s``
    in all). The simulation registers its nodes while the ServerApp starts: wait until ``actors`` are there."""
    started = time.monotonic()
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < actors and time.monotonic() - started < timeout_s:
        time.sleep(NODE_POLL_S)
        node_ids = list(grid.get_node_ids())
    node_ids = node_ids[:actors]
    messages = [Message(RecordDict({CONFIG: config}), dst_node_id=node_id, message_type=WARM_UP_MESSAGE)
                for node_id in node_ids]
    left = max(timeout_s - (time.monotonic() - started), 1.0)
    replies = list(grid.send_and_receive(messages, timeout=left)) if messages else []
    pids, errors = set(), []
    for reply in replies:
        if reply.has_error():
            errors.append(reply.error.reason)
        else:
            pids.add(int(reply.content[METRICS]["pid"]))
    if len(messages) < actors:
        errors.append(f"only {len(messages)} of {actors} node(s) registered within {timeout_s:g} s")
    missing = len(messages) - len(replies)
    if missing:
        errors.append(f"{missing} warm-up(s) unanswered within {timeout_s:g} s")
    return WarmUp(len(messages), len(pids), round(time.monotonic() - started, 2), tuple(errors))


def save_warm_up(run_dir: Path, warm_up: WarmUp) -> None:
    """``<run_dir>/warm_up.json`` (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / WARM_UP_FILE, json.dumps(asdict(warm_up), indent=2))
