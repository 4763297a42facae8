"""simulations/flower_engine.py: Flower 1.39's Simulation Engine with polling, node contexts and a node
registry that do not grow with the fleet, delivering exactly what Flower's own functions deliver."""

from __future__ import annotations

import threading
from queue import Queue

import flwr
import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.supercore.run import Run

from storefed.simulations import flower_engine
from storefed.simulations.scale_bench import fleet_state, poll_sweep_seconds, registered_fleet


def _drain(poller, state, mapping, expected: int) -> list:
    queue, stop = Queue(), threading.Event()
    thread = threading.Thread(target=poller, args=(state, queue, mapping, stop), daemon=True)
    thread.start()
    got = [queue.get(timeout=30) for _ in range(expected)]
    stop.wait(0.5)  # more sweeps: nothing is delivered twice
    stop.set()
    thread.join()
    assert queue.empty(), "a message was delivered twice"
    return got


def test_pending_node_polling_delivers_what_flowers_loop_delivers_once_each():
    for poller in (flower_engine._flower_poll, flower_engine.poll_pending_nodes):
        state, mapping, targets = fleet_state(3000, 7)
        got = _drain(poller, state, mapping, len(targets))
        assert sorted(m.metadata.dst_node_id for m in got) == sorted(targets)
        assert all(m.metadata.delivered_at != "" for m in got)  # marked delivered by Flower's get_message_ins
        assert flower_engine.pending_destinations(state) == set()


def test_a_sweep_costs_the_pending_messages_not_the_registered_nodes():
    small = min(poll_sweep_seconds(flower_engine.poll_pending_nodes, 200, 10) for _ in range(3))
    large = min(poll_sweep_seconds(flower_engine.poll_pending_nodes, 20000, 10) for _ in range(3))
    flower_large = poll_sweep_seconds(flower_engine._flower_poll, 20000, 10)
    assert large < 0.05 and flower_large > 10 * large, (small, large, flower_large)


def test_lazy_node_stores_build_the_same_context_as_flower_on_first_use():
    mapping = {101: 0, 202: 1, 303: 2}
    run = Run.create_empty(run_id=7)
    eager = flower_engine._flower_node_stores(mapping, run, None)
    lazy = flower_engine.lazy_node_stores(mapping, run, None)
    assert dict.__len__(lazy) == 0 and len(lazy) == 3 and 202 in lazy and 404 not in lazy
    for node_id in mapping:
        want, got = eager[node_id].retrieve_context(7), lazy[node_id].retrieve_context(7)
        assert (got.node_id, dict(got.node_config), dict(got.run_config)) == (
            want.node_id, dict(want.node_config), dict(want.run_config))
    assert lazy[303] is lazy[303]  # built once; its context persists across rounds
    with pytest.raises(KeyError):
        lazy[404]


_VARYING = {"node_id", "public_key", "registered_at", "last_activated_at", "online_until"}  # per node / per clock


def test_packed_node_registry_holds_what_flowers_registry_holds_and_stays_mutable():
    flower_state, flower_mapping, flower_run = registered_fleet(flower_engine._flower_register_nodes, 50)
    state, mapping, run_id = registered_fleet(flower_engine.register_nodes_packed, 50)
    assert sorted(mapping.values()) == sorted(flower_mapping.values()) == list(range(50))
    assert state.get_nodes(run_id) == set(mapping) and flower_state.get_nodes(flower_run) == set(flower_mapping)
    want = next(iter(flower_state.nodes.values()))
    for node_id, node in state.nodes.items():
        assert node.node_id == node_id and len(node.public_key) == 32
        assert state.get_node_id_by_public_key(node.public_key) == node_id
        assert {f.name: v for f, v in node.ListFields() if f.name not in _VARYING} == {
            f.name: v for f, v in want.ListFields() if f.name not in _VARYING}
        assert node.online_until > 1e299  # heartbeat interval "infinite", as Flower's simulation nodes
    gone = next(iter(mapping))
    state.delete_node(state.nodes[gone].owner_aid, gone)  # a LinkState write lands in the shared arena
    assert state.nodes[gone].status == "unregistered" and gone not in state.get_nodes(run_id)
    assert state.get_nodes(run_id) == set(mapping) - {gone}


def test_install_patches_flower_1_39_only_and_stock_leaves_it_alone(monkeypatch):
    try:
        monkeypatch.setenv(flower_engine.STOCK_ENGINE_ENV, "stock")
        assert flower_engine.install() is False and vce_api.add_messages_to_queue is flower_engine._flower_poll
        monkeypatch.delenv(flower_engine.STOCK_ENGINE_ENV)
        assert flwr.__version__ == flower_engine.PATCHED_FLOWER_VERSION, "flwr is pinned: recheck the patch first"
        assert flower_engine.install() is True
        assert vce_api.add_messages_to_queue is flower_engine.poll_pending_nodes
        assert vce_api._register_node_info_stores is flower_engine.lazy_node_stores
        assert vce_api._register_nodes is flower_engine.register_nodes_packed
        monkeypatch.setattr(flwr, "__version__", "1.40.0")
        flower_engine.uninstall()
        assert flower_engine.install() is False and vce_api.add_messages_to_queue is flower_engine._flower_poll
        assert vce_api._register_nodes is flower_engine._flower_register_nodes
    finally:
        flower_engine.uninstall()
