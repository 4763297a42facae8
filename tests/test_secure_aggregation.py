"""Secure aggregation (Flower SecAgg+): the sum is right, individual updates never travel in clear,
dropouts up to the reconstruction threshold are tolerated, beyond it the run fails with the reason.

Most tests drive the real ServerApp run (``run_secure_federation``) and the real ClientApp
(``storefed.client.client_app:app``) through an in-process Grid, which also injects the dropouts (test-only:
no fault hook in production code). One test runs ``storefed simulate`` with Ray, as users do.
"""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid

from conftest import SMALL_WORLD, base_settings, node_context, round_config, train_message
from storefed.client import client_app
from storefed.config.schema import FederationConfig, PrivacyConfig
from storefed.models.saved_model import load_global_model
from storefed.server.run_setup import RunFailed
from storefed.server.secure_aggregation import run_secure_federation, secagg_options

flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")  # the package shadows it
NODE_BASE = 1000  # node id of partition p is NODE_BASE + p


class InProcessGrid(Grid):
    """Delivers each message to the ClientApp of its node, in this process.

    ``drop={partition: stage}`` makes that merchant fail (an error reply, as Flower reports a
    crashed or vanished node) from the given SecAgg+ stage on.
    """

    def __init__(self, num_nodes: int, drop: dict[int, str] | None = None, node_config: dict[int, dict] | None = None):
        self.contexts = {
            NODE_BASE + p: Context(
                run_id=1, node_id=NODE_BASE + p, state=RecordDict(), run_config={},
                node_config={"partition-id": p, "num-partitions": num_nodes} | (node_config or {}).get(p, {}),
            )
            for p in range(num_nodes)
        }
        self.drop = drop or {}
        self.dropped: set[int] = set()
        self.replies: list[tuple[str, Message]] = []  # (stage, reply) of every SecAgg+ message

    @property
    def run(self):
        return SimpleNamespace(run_id=1)

    def set_run(self, run_id: int) -> None:
        pass

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [self._deliver(msg) for msg in messages]

    def _deliver(self, msg: Message) -> Message:
        msg = copy.deepcopy(msg)  # as over a real transport: no content shared between nodes
        node = msg.metadata.dst_node_id
        secagg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = str(secagg[Key.STAGE]) if secagg is not None else None
        if node in self.dropped or (stage and self.drop.get(node - NODE_BASE) == stage):
            self.dropped.add(node)
            return Message(Error(0, f"fault injected: merchant {node} dropped out at stage {stage}"), reply_to=msg)
        try:
            reply = client_app.app(msg, self.contexts[node])
        except Exception as exc:  # as Flower does: a failing ClientApp becomes an error reply
            return Message(Error(1, f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if stage:
            self.replies.append((stage, reply))
        return reply


@pytest.fixture
def updates(monkeypatch):
    """What each merchant hands to the SecAgg+ mod before masking: node -> (weight, update arrays)."""
    seen: dict[int, tuple[int, list[np.ndarray]]] = {}
    original = flower_mod._collect_masked_vectors

    def spy(state, configs, num_examples, parameters):
        seen[state.nid] = (num_examples, parameters_to_ndarrays(parameters))
        return original(state, configs, num_examples, parameters)

    monkeypatch.setattr(flower_mod, "_collect_masked_vectors", spy)
    return seen


def _settings(tmp_path, stores: int, rounds: int = 1, **privacy):
    return base_settings(
        "recommender", f"federation.num_stores={stores}", f"federation.stores_per_round={stores}",
        "federation.eval_stores_per_round=2", f"federation.rounds={rounds}", "task.epochs=1",
        f"run_dir={tmp_path / 'run'}", noise_multiplier=1.0, secure_aggregation=True, **privacy,
    )


def _run(settings, grid) -> dict:
    run_dir = Path(settings.run_dir)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_secure_federation(grid, context, settings, run_dir)


def _initial(settings) -> dict[str, np.ndarray]:
    from storefed.data.sources import coordinator_catalog
    from storefed.models.task import build_task

    task = build_task(settings.task, coordinator_catalog(settings.data, settings.seed), seed=settings.seed)
    model = task.build_model()
    return {k: v.numpy() for k, v in model.state_dict().items() if k in task.shared_keys(model)}


def _weighted_mean(initial: dict[str, np.ndarray], updates: dict, nodes: list[int]) -> list[np.ndarray]:
    """The plain FedAvg model: initial + examples-weighted mean of the merchants' updates."""
    total = sum(updates[n][0] for n in nodes)
    return [g + sum(updates[n][0] * updates[n][1][i] for n in nodes) / total for i, g in enumerate(initial.values())]


def _max_error(settings, updates, nodes) -> float:
    """Bound on SecAgg+'s error: one quantization step per merchant, in weight/max_weight units."""
    opts = secagg_options(settings.privacy, settings.federation)
    step = 2 * opts.clipping_range / opts.quantization_range
    return 2 * len(nodes) * step * opts.max_weight / sum(updates[n][0] for n in nodes)


def _assert_model_is(run_dir, expected: list[np.ndarray], names: list[str], tolerance: float) -> float:
    weights, _ = load_global_model(run_dir)
    errors = [float(np.abs(weights[k].numpy() - e).max()) for k, e in zip(names, expected)]
    assert max(errors) <= tolerance, (max(errors), tolerance)
    return max(errors)


def test_secure_aggregate_equals_weighted_mean_and_only_masked_vectors_travel(tmp_path, flower_identity, updates):
    settings = _settings(tmp_path, stores=3)
    initial = _initial(settings)
    grid = InProcessGrid(3)
    summary = _run(settings, grid)

    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    nodes = sorted(updates)
    assert len(nodes) == 3 and all(updates[n][0] > 0 for n in nodes)
    tolerance = _max_error(settings, updates, nodes)
    error = _assert_model_is(run_dir, _weighted_mean(initial, updates, nodes), list(initial), tolerance)
    moved = max(float(np.abs(u).max()) for n in nodes for u in updates[n][1])
    assert moved > 100 * max(error, tolerance / 10), "the test must see real updates, far above quantization error"

    masked = [reply for stage, reply in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(masked) == 3
    for reply in masked:
        assert all(len(record) == 0 for record in reply.content.array_records.values()), "no tensor in clear"
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
        assert 0.45 < vector.mean() / 2**32 < 0.55, "masked values look uniform on the 2**32 modulus"
        metrics = reply.content["fitres.metrics"]
        assert metrics["epsilon_total"] > 0 and metrics["privacy.unit"] == "customer"

    assert summary["rounds_completed"] == 1 and summary["privacy"]["secure_aggregation"]["num_shares"] == 3
    assert len(summary["privacy"]["epsilon_by_node"]) == 3, "per-merchant epsilon is still reported"
    assert "cannot screen individual updates" in summary["privacy"]["secure_aggregation"]["screening"]
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["trained"] == 3 and row["secure_aggregation"] == "aggregated" and "eval_hr@10" in row


@pytest.mark.parametrize("stage", [Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_one_dropout_within_threshold_still_aggregates(tmp_path, flower_identity, updates, stage):
    """3 merchants, num_shares=3, threshold=2: one may drop out. Before sending its masked vector it is
    left out of the sum; after it (unmask stage) its contribution is recovered from the others' shares."""
    settings = _settings(tmp_path, stores=3)
    initial = _initial(settings)
    _run(settings, InProcessGrid(3, drop={0: stage}))
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    included = [n for n in sorted(updates) if not (stage == Stage.COLLECT_MASKED_VECTORS and n == NODE_BASE)]
    expected = _weighted_mean(initial, updates, included)
    _assert_model_is(run_dir, expected, list(initial), _max_error(settings, updates, included))
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["failed"] == 1 and row["secure_aggregation"] == "aggregated"


def test_dropouts_beyond_threshold_fail_the_run_with_the_reason(tmp_path, flower_identity, capsys):
    settings = _settings(tmp_path, stores=3)
    with pytest.raises(RunFailed, match="no round could be securely aggregated"):
        _run(settings, InProcessGrid(3, drop={0: Stage.COLLECT_MASKED_VECTORS, 1: Stage.COLLECT_MASKED_VECTORS}))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed"
    assert "halted at stage 'collect masked vectors': 1 of 3 sampled merchants still active" in status["error"]
    assert "reconstruction threshold 2" in status["error"]
    assert "SKIPPED, global model unchanged" in capsys.readouterr().out
    assert not (tmp_path / "run" / "global_model.safetensors").exists()


def test_refusing_merchant_takes_part_with_zero_weight(tmp_path, flower_identity, updates):
    """A merchant whose budget is exhausted sends a masked zero of weight 0: the sum is the trained two."""
    settings = _settings(tmp_path, stores=3)
    initial = _initial(settings)
    _run(settings, InProcessGrid(3, node_config={2: {"epsilon-budget": 0.01}}))
    run_dir = tmp_path / "run"
    refuser = NODE_BASE + 2
    assert updates[refuser][0] == 0 and all(not a.any() for a in updates[refuser][1])
    trained = [n for n in sorted(updates) if n != refuser]
    expected = _weighted_mean(initial, updates, trained)
    _assert_model_is(run_dir, expected, list(initial), _max_error(settings, updates, trained))
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["trained"], row["refused"], row["failed"]) == (2, 1, 0)


def test_round_with_one_trained_merchant_is_not_unmasked(tmp_path, flower_identity):
    settings = _settings(tmp_path, stores=3)
    low = {"epsilon-budget": 0.01}
    with pytest.raises(RunFailed, match=r"only 1 merchant\(s\) trained"):
        _run(settings, InProcessGrid(3, node_config={1: low, 2: low}))


def test_plain_messages_pass_the_router_unchanged(tmp_path, flower_identity):
    """One ClientApp for both modes: a Message-API train message reaches the normal handler."""
    settings = base_settings("recommender", noise_multiplier=1.0)
    to_clients = round_config(settings, tmp_path, epochs=1)
    initial = _initial(settings)
    reply = client_app.app(train_message(to_clients, ArrayRecord({k: torch.from_numpy(v) for k, v in initial.items()})),
                           node_context({"partition-id": 0}))
    assert set(reply.content.keys()) == {"arrays", "metrics", "privacy"}


@pytest.mark.parametrize(
    "privacy, federation, message",
    [
        ({"central": "fixed"}, {"stores_per_round": 3}, "cannot be combined with privacy.central=fixed"),
        ({}, {"stores_per_round": 1}, "stores_per_round >= 2"),
        ({"secagg_quantization_range": 2**22}, {"stores_per_round": 1024}, "overflows"),
        ({"secagg_reconstruction_threshold": 4}, {"stores_per_round": 10}, "exceeds the 3 merchants"),
        ({"secagg_num_shares": 2}, {"stores_per_round": 10}, "num_shares` as an integer must be greater than 2"),
    ],
)
def test_unusable_combinations_are_refused(privacy, federation, message):
    with pytest.raises(ValueError, match=message):
        secagg_options(PrivacyConfig(secure_aggregation=True, **privacy), FederationConfig(num_stores=2000, **federation))


def test_storefed_simulate_with_secure_aggregation_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "simulate", "privacy.secure_aggregation=true", "federation.num_stores=3", "federation.stores_per_round=3",
        "federation.eval_stores_per_round=2", "federation.rounds=1", "task.epochs=1", f"run_dir={run_dir}",
    ] + [f"data.generator.{k}={v}" for k, v in SMALL_WORLD.items()]
    done = subprocess.run([sys.executable, "-m", "storefed", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and len(summary["privacy"]["epsilon_by_node"]) == 3
    assert "cannot screen individual updates" in done.stdout
    weights, _ = load_global_model(run_dir)
    assert weights["item_embedding.weight"].shape == (SMALL_WORLD["num_items"] + 1, 32)
