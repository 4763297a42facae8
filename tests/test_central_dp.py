"""Client-level central DP: Flower's wrappers behind screening, fixed-denominator dropouts, budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from storefed.config.schema import FedAvgConfig, FederationConfig
from storefed.privacy.central_dp import WEIGHT_KEY, check_privacy_options
from storefed.server.strategy import build_strategy

STORES = FederationConfig(num_stores=6, stores_per_round=3, eval_stores_per_round=3)
EXPECTED = {"w": (4,)}


def _privacy(**overrides):
    from storefed.config.schema import PrivacyConfig

    return PrivacyConfig(**({"central": "fixed", "central_delta": 1e-3} | overrides))


class FakeGrid:
    """Just enough of a Flower Grid for strategy sampling: six connected merchants."""

    def get_node_ids(self):
        return [1, 2, 3, 4, 5, 6]


def _replies(instructions: list[Message], kinds: list[str], update: np.ndarray) -> list[Message]:
    out = []
    for msg, kind in zip(instructions, kinds):
        base = msg.content["arrays"]["w"].numpy()
        metrics = {"num-examples": 10, "refused": 0, "epsilon_total": 1.0, "delta": 1e-5}
        if kind == "error":
            out.append(Message(Error(code=0, reason="merchant crashed"), reply_to=msg))
            continue
        content = RecordDict({"metrics": MetricRecord(metrics | {"refused": int(kind == "refused")})})
        if kind == "ok":
            content["arrays"] = ArrayRecord({"w": Array(base + update)})
        else:
            content["privacy"] = ConfigRecord({"refusal": "budget"})
        out.append(Message(content=content, reply_to=msg))
    return out


def _strategy(privacy, seen: list):
    return build_strategy(FedAvgConfig(), STORES, EXPECTED, lambda r, s: seen.append(s), None, privacy)


def _round(strategy, server_round: int, kinds: list[str], update: np.ndarray, start: np.ndarray):
    instructions = list(strategy.configure_train(server_round, ArrayRecord({"w": Array(start)}), ConfigRecord(), FakeGrid()))
    assert len(instructions) == 3
    return strategy.aggregate_train(server_round, _replies(instructions, kinds, update))


def _opacus_epsilon(z: float, releases: int, delta: float) -> float:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    return get_privacy_spent(orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=releases, orders=orders),
                             delta=delta)[0]


def test_dropouts_become_zero_updates_and_the_average_divides_by_the_sampled_number(flower_identity):
    seen: list = []
    strategy = _strategy(_privacy(central_noise_multiplier=1e-3, central_clipping_norm=1.0, central_epsilon=1e9), seen)
    start = np.ones(4, dtype=np.float32)
    update = np.array([3.0, 4.0, 0.0, 0.0], dtype=np.float32)  # norm 5: clipped to norm 1
    arrays, metrics = _round(strategy, 1, ["ok", "error", "refused"], update, start)
    assert seen[0].failed and seen[0].refused and len(seen[0].accepted) == 1
    # one clipped update (norm 1) and two zero updates, divided by the 3 sampled merchants
    np.testing.assert_allclose(arrays["w"].numpy(), start + update / 5 / 3, atol=3e-3)
    assert strategy.central.standins_total == 2
    assert metrics["client_releases"] == 1 and WEIGHT_KEY not in metrics
    assert metrics["num-examples"] == 10  # train metrics come from real replies only


def test_updates_are_weighted_equally_under_central_dp(flower_identity):
    strategy = _strategy(_privacy(central_noise_multiplier=1e-5, central_clipping_norm=100.0, central_epsilon=1e15), [])
    start = np.zeros(4, dtype=np.float32)
    instructions = list(strategy.configure_train(1, ArrayRecord({"w": Array(start)}), ConfigRecord(), FakeGrid()))
    replies = _replies(instructions, ["ok", "ok", "ok"], np.zeros(4, dtype=np.float32))
    for value, (reply, examples) in enumerate(zip(replies, (1, 10, 1000)), start=1):
        reply.content["arrays"] = ArrayRecord({"w": Array(np.full(4, float(value), dtype=np.float32))})
        reply.content["metrics"]["num-examples"] = examples
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 2.0), atol=3e-3)  # (1+2+3)/3, not example-weighted


def test_fixed_mode_reports_client_epsilon_that_opacus_reproduces_and_stops_at_the_budget(flower_identity):
    z, delta = 1.0, 1e-3
    budget = (_opacus_epsilon(z, 2, delta) + _opacus_epsilon(z, 3, delta)) / 2  # room for exactly 2 releases
    strategy = _strategy(_privacy(central_noise_multiplier=z, central_epsilon=budget), [])
    start, update = np.zeros(4, dtype=np.float32), np.full(4, 0.1, dtype=np.float32)
    for server_round in (1, 2):
        _, metrics = _round(strategy, server_round, ["ok"] * 3, update, start)
        assert metrics["client_epsilon"] == pytest.approx(_opacus_epsilon(z, server_round, delta), rel=0.01)
        assert metrics["client_delta"] == delta
    with pytest.raises(PrivacyBudgetExhausted, match="exceed max_epsilon"):
        strategy.configure_train(3, ArrayRecord({"w": Array(start)}), ConfigRecord(), FakeGrid())
    assert strategy.latest_arrays is not None
    summary = strategy.central.summary()
    assert summary["releases"] == 2 and summary["epsilon"] <= budget
    assert "no amplification" in summary["accountant"] and "merchant" in summary["unit"]


def test_adaptive_mode_moves_the_clipping_bound_and_accounts_both_releases(flower_identity):
    z, delta = 0.2, 1e-3
    strategy = _strategy(_privacy(central="adaptive", central_noise_multiplier=z, central_clipping_norm=0.01,
                                  central_epsilon=1e6), [])
    start, update = np.zeros(4, dtype=np.float32), np.full(4, 5.0, dtype=np.float32)
    norms = []
    for server_round in (1, 2, 3):
        _, metrics = _round(strategy, server_round, ["ok"] * 3, update, start)
        norms.append(metrics["central_clipping_norm"])
    assert 0.01 < norms[0] < norms[1] < norms[2]  # every update is clipped: the bound grows (Andrew et al.)
    wrapper = strategy.central.wrapper
    combined = (wrapper.noise_multiplier**-2 + wrapper.clipped_count_stddev**-2) ** -0.5
    assert metrics["central_noise_multiplier"] == pytest.approx(combined)
    assert combined < z  # the count release is accounted too: weaker than the configured z alone
    assert metrics["client_epsilon"] == pytest.approx(_opacus_epsilon(combined, 3, delta), rel=0.01)


def test_central_noise_does_not_follow_the_run_seed(flower_identity):
    outcomes = []
    for _ in range(2):
        np.random.seed(0)  # anything seeding numpy's global RNG before the run must not fix the noise
        strategy = _strategy(_privacy(central_noise_multiplier=1.0), [])
        arrays, _ = _round(strategy, 1, ["ok"] * 3, np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.float32))
        outcomes.append(arrays["w"].numpy())
    assert not np.allclose(outcomes[0], outcomes[1])


@pytest.mark.parametrize(
    "overrides, strategy, message",
    [
        ({"central": "gaussian"}, "fedavg", "privacy.central='gaussian' is unknown"),
        ({}, "fedadam", "needs strategy=fedavg or fedprox"),
        ({"secure_aggregation": True}, "fedavg", "cannot be combined with privacy.secure_aggregation=true"),
        ({"central_delta": 0.2}, "fedavg", "must lie in (0, 1/federation.num_stores=0.166667)"),
        ({"central_noise_multiplier": 0.0}, "fedavg", "must both be > 0"),
        ({"central_epsilon": float("inf")}, "fedavg", "finite positive client-level budget"),
    ],
)
def test_settings_that_would_not_give_the_guarantee_are_refused(overrides, strategy, message):
    with pytest.raises(ValueError) as err:
        check_privacy_options(_privacy(**overrides), strategy, 6)
    assert message in str(err.value)


def test_simulation_stops_cleanly_when_the_client_level_budget_is_spent(tmp_path):
    from test_simulation import SMALL, _storefed

    budget = (_opacus_epsilon(1.0, 2, 1e-3) + _opacus_epsilon(1.0, 3, 1e-3)) / 2
    run_dir = tmp_path / "central"
    done = _storefed("simulate", *SMALL, "federation.rounds=4", f"run_dir={run_dir}", "task.epochs=1",
                     "privacy.central=fixed", "privacy.central_delta=1e-3", f"privacy.central_epsilon={budget}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and "client-level privacy budget exhausted" in summary["stopped_early"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "global_model.safetensors").exists()
    client = summary["privacy"]["client_level"]
    assert client["releases"] == 2 and client["epsilon"] <= budget
    assert summary["privacy"]["epsilon_by_node"]  # record-level epsilon per merchant, reported separately
    assert "client-level epsilon" in done.stdout and "per customer, delta=1e-05" in done.stdout
