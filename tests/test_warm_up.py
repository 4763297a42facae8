"""Simulation warm-up (server/warm_up.py, client/warm_up.py): one message per actor before round 1,
answered with the process id only; a failed warm-up is reported, never fatal."""

from __future__ import annotations

import dataclasses
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from test_secure_aggregation import InProcessGrid

from conftest import base_settings, round_config
from storefed.client import client_app
from storefed.config.schema import ImportedDataConfig
from storefed.server.warm_up import WARM_UP_MESSAGE, warm_actors
from storefed.simulations.evaluation.federated import flower_identity
from storefed.wire import CONFIG, METRICS


def test_warm_up_reply_carries_only_the_process_id_and_seconds(tmp_path):
    config = round_config(base_settings("recommender"), tmp_path / "run")
    with flower_identity():
        msg = Message(RecordDict({CONFIG: ConfigRecord(config.to_record())}), dst_node_id=5, message_type=WARM_UP_MESSAGE)
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = client_app.app(msg, context)
    assert set(reply.content.keys()) == {METRICS}
    assert set(reply.content[METRICS].keys()) == {"pid", "seconds"}
    assert int(reply.content[METRICS]["pid"]) == os.getpid() and reply.content[METRICS]["seconds"] >= 0


def test_warm_actors_counts_distinct_processes_and_reports_failures(tmp_path):
    settings = base_settings("recommender")
    config = round_config(settings, tmp_path / "run")
    with flower_identity():
        warmed = warm_actors(InProcessGrid(4), ConfigRecord(config.to_record()), 3, timeout_s=30)
        assert (warmed.sent, warmed.actors, warmed.errors) == (3, 1, ())  # one process answered all three
        assert "warm-up: 1 of 3 Ray actor(s) ready" in warmed.line()
        missing = dataclasses.replace(config, data=ImportedDataConfig(source="amazon", path=str(tmp_path / "none.json.gz")))
        failed = warm_actors(InProcessGrid(2), ConfigRecord(missing.to_record()), 2, timeout_s=30)
    assert (failed.sent, failed.actors, len(failed.errors)) == (2, 0, 2)
    assert "none.json.gz" in failed.errors[0] and "2 failed" in failed.line()


class _SlowRegistry(InProcessGrid):
    """Nodes appear one per call of get_node_ids, as while the simulation registers them."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes)
        self.calls = 0

    def get_node_ids(self):
        self.calls += 1
        return list(self.contexts)[: self.calls - 1]


def test_warm_up_waits_for_the_nodes_being_registered(tmp_path):
    config = round_config(base_settings("recommender"), tmp_path / "run")
    with flower_identity():
        grid = _SlowRegistry(4)
        warmed = warm_actors(grid, ConfigRecord(config.to_record()), 3, timeout_s=30)
        assert (warmed.sent, warmed.errors) == (3, ()) and grid.calls == 4
        never = warm_actors(_SlowRegistry(1), ConfigRecord(config.to_record()), 3, timeout_s=1)
    assert never.sent == 1 and "only 1 of 3 node(s) registered within 1 s" in never.errors[0]
