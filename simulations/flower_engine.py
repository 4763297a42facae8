"""Three fixes to Flower 1.39's Simulation Engine so that a round's cost and the memory per registered
node stay small at fleet scale.

Written by hand because Flower 1.39 (pinned) has no option for any of them; all keep its semantics:

- **Polling.** Flower's ``add_messages_to_queue`` asks the LinkState for every registered node's
  messages every 0.1 s (``get_message_ins`` once per node, each scanning every pending message): at
  100,000 virtual stores one sweep takes seconds and keeps a core busy for the whole round.
  :func:`poll_pending_nodes` asks only for the nodes that have an undelivered message, through the
  same ``get_message_ins`` call (which still checks expiry and marks delivery).
- **Node contexts.** Flower builds one ``DeprecatedRunInfoStore`` (a Context with its RecordDict) for
  every node before round 1 (about 1.2 KB each: 0.12 GB at 100,000 stores). :class:`LazyNodeStores`
  builds a node's store the first time a message for it is processed, with the same node config;
  its context then persists across rounds exactly as before.
- **Node registry.** Flower registers every simulated node in its in-memory LinkState as a separate
  ``NodeInfo`` protobuf message; with protobuf's upb runtime each one owns an arena of its own (about
  1.3 KB; 1.6 KB per node in all: 0.16 GB at 100,000 stores). :func:`register_nodes_packed` registers
  them through the same LinkState calls, then moves each ``NodeInfo`` into one shared arena (a
  repeated field of one parent message): the registry maps the same node ids to mutable ``NodeInfo``
  messages with the same fields, at about half the memory.

:func:`install` applies all three, only to the Flower version they were written against (``1.39.0``);
on any other version it changes nothing and says so.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from queue import Queue
from typing import Any

import flwr
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
)
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
from flwr.proto.control_pb2 import ListNodesResponse  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

log = logging.getLogger("storefed.simulate")

PATCHED_FLOWER_VERSION = "1.39.0"
POLL_INTERVAL_S = 0.1  # Flower's own interval between sweeps
_flower_poll = vce_api.add_messages_to_queue
_flower_node_stores = vce_api._register_node_info_stores
_flower_register_nodes = vce_api._register_nodes


def pending_destinations(state: InMemoryLinkState) -> set[int]:
    """Node ids with at least one undelivered message (one pass over the pending messages)."""
    with state.lock:
        return {m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""}


def poll_pending_nodes(state: LinkState, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue``, asking only nodes that have something pending."""
    if not isinstance(state, InMemoryLinkState):  # the pending set is read from the in-memory store only
        _flower_poll(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for node_id in pending_destinations(state):
            if node_id in nodes_mapping:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        f_stop.wait(POLL_INTERVAL_S)


class LazyNodeStores(dict):
    """``{node_id: DeprecatedRunInfoStore}`` that builds a node's store (and its run's Context) on first use."""

    def __init__(self, nodes_mapping: dict[int, int], run: Any, app_dir: str | None) -> None:
        super().__init__()
        self._mapping, self._run, self._app_dir = nodes_mapping, run, app_dir
        self._num_partitions = len(set(nodes_mapping.values()))
        self._lock = threading.Lock()  # Flower's worker threads look stores up concurrently

    def __missing__(self, node_id: int) -> DeprecatedRunInfoStore:
        if node_id not in self._mapping:
            raise KeyError(node_id)
        with self._lock:
            if dict.__contains__(self, node_id):
                return dict.__getitem__(self, node_id)
            store = DeprecatedRunInfoStore(
                node_id=node_id,
                node_config={PARTITION_ID_KEY: self._mapping[node_id], NUM_PARTITIONS_KEY: self._num_partitions},
            )
            store.register_context(run_id=self._run.run_id, run=self._run, app_dir=self._app_dir)
            self[node_id] = store
            return store

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._mapping

    def __len__(self) -> int:
        return len(self._mapping)


def lazy_node_stores(nodes_mapping: dict[int, int], run: Any, app_dir: str | None = None) -> LazyNodeStores:
    """Drop-in for Flower's ``_register_node_info_stores``."""
    return LazyNodeStores(nodes_mapping, run, app_dir)


def register_nodes_packed(num_nodes: int, state_factory: Any) -> dict[int, int]:
    """Flower's ``_register_nodes`` (same LinkState calls, same ``{node_id: partition_id}``), with every
    ``NodeInfo`` moved into one shared protobuf arena as soon as it is registered (so the peak stays low)."""
    state = state_factory.state()
    if not isinstance(state, InMemoryLinkState):  # only the in-memory registry holds NodeInfo objects
        return _flower_register_nodes(num_nodes, state_factory)
    arena = ListNodesResponse()  # any message with ``repeated NodeInfo``: its children share its arena
    mapping: dict[int, int] = {}
    for partition_id in range(num_nodes):
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                    heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        with state.lock:
            packed = arena.nodes_info.add()
            packed.CopyFrom(state.nodes[node_id])
            state.nodes[node_id] = packed  # the child keeps the shared arena alive
        mapping[node_id] = partition_id
    return mapping


STOCK_ENGINE_ENV = "STOREFED_FLOWER_ENGINE"  # =stock: Flower's engine unchanged (``storefed bench scale --stock``)


def install() -> bool:
    """Apply the three fixes to Flower's Simulation Engine; ``False`` (nothing changed) on another Flower version
    or when ``STOREFED_FLOWER_ENGINE=stock`` (side-by-side benchmarks)."""
    if os.environ.get(STOCK_ENGINE_ENV) == "stock":
        return False
    if flwr.__version__ != PATCHED_FLOWER_VERSION:
        log.warning("Flower %s is not %s: its Simulation Engine is used unchanged (rounds at 100,000 stores cost "
                    "more; docs/performance.md)", flwr.__version__, PATCHED_FLOWER_VERSION)
        return False
    vce_api.add_messages_to_queue = poll_pending_nodes
    vce_api._register_node_info_stores = lazy_node_stores
    vce_api._register_nodes = register_nodes_packed
    return True


def uninstall() -> None:
    """Flower's own functions back (tests)."""
    vce_api.add_messages_to_queue = _flower_poll
    vce_api._register_node_info_stores = _flower_node_stores
    vce_api._register_nodes = _flower_register_nodes
