"""A merchant's round, called as Flower calls it: reply contents, epsilon, budget refusals."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord
from opacus.accountants import RDPAccountant

from conftest import base_settings, node_context, round_config, train_message, with_privacy
from storefed.client import client_app
from storefed.config.schema import RecommenderConfig
from storefed.data.sources import coordinator_catalog, load_simulated
from storefed.models.task import build_task
from storefed.privacy.dp_sgd import plan_sampling
from storefed.server.screening import screen_train_replies
from storefed.wire import TRAIN_METRIC_KEYS


@pytest.fixture
def setup(tmp_path, flower_identity):
    settings = base_settings("recommender", noise_multiplier=1.3, epsilon=8)  # all of the person budget: one task
    to_clients = round_config(settings, tmp_path, epochs=1)
    catalog = coordinator_catalog(to_clients.data, to_clients.seed)
    task = build_task(to_clients.task, catalog, seed=to_clients.seed)
    model = task.build_model()
    state = model.state_dict()
    arrays = ArrayRecord({k: state[k] for k in task.shared_keys(model)})
    return to_clients, task, arrays


def _train(to_clients, arrays, server_round=1, partition=0):
    return client_app.train(train_message(to_clients, arrays, server_round), node_context({"partition-id": partition}))


def test_reply_carries_exactly_the_shared_tensors_and_numbers(setup):
    to_clients, task, arrays = setup
    reply = _train(to_clients, arrays)
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "privacy"}
    sent = content["arrays"]
    assert {k: tuple(v.shape) for k, v in sent.items()} == {k: tuple(v.shape) for k, v in arrays.items()}
    assert set(content["metrics"].keys()) == set(TRAIN_METRIC_KEYS)
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert set(content["privacy"].keys()) == {"unit", "accountant", "guarantee"}
    assert content["privacy"]["unit"] == "customer"
    assert "-DP per customer" in content["privacy"]["guarantee"]
    assert not any(k.startswith("_module") for k in sent.keys())


def test_reported_epsilon_matches_independent_accountant_across_rounds_and_restarts(setup):
    to_clients, task, arrays = setup
    _, data = load_simulated(to_clients.data, to_clients.seed, 0)
    plan = plan_sampling(len(task.train_dataset(data)), to_clients.task.batch_size, 1)
    independent = RDPAccountant()
    for server_round in (1, 2, 3):
        metrics = _train(to_clients, arrays, server_round).content["metrics"]
        for _ in range(plan.steps):
            independent.step(noise_multiplier=1.3, sample_rate=plan.sample_rate)
        assert metrics["steps"] == plan.steps
        assert metrics["sample_rate"] == pytest.approx(plan.sample_rate)
        assert metrics["epsilon_total"] == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
        assert metrics["delta"] == 1e-5
    # Each call re-opens the ledger from disk, as a restarted merchant process does.
    assert metrics["epsilon_total"] > metrics["epsilon_round"] > 0


def test_round_past_budget_is_refused_and_changes_nothing(setup, tmp_path):
    to_clients, task, arrays = setup
    first = _train(to_clients, arrays).content["metrics"]
    to_clients = with_privacy(to_clients, epsilon=first["epsilon_total"] * 1.2)  # room for less than one more round
    ledger_file = next((tmp_path / "ledgers").glob("*.ledger.json"))
    before = ledger_file.read_text(encoding="utf-8")
    reply = _train(to_clients, arrays, server_round=2)
    assert "arrays" not in reply.content
    assert reply.content["metrics"]["refused"] == 1
    reason = reply.content["privacy"]["refusal"]
    assert "privacy budget exhausted" in reason and f"{first['epsilon_total']:.3f}" in reason
    assert ledger_file.read_text(encoding="utf-8") == before
    screening = screen_train_replies([reply], {k: tuple(v.shape) for k, v in arrays.items()})
    assert screening.accepted == [] and list(screening.refused.values()) == [reason]


def test_delta_not_below_one_over_n_is_refused(setup):
    to_clients, task, arrays = setup
    to_clients = with_privacy(to_clients, delta=0.5)
    reply = _train(to_clients, arrays)
    assert reply.content["metrics"]["refused"] == 1
    assert "delta=0.5 is not below 1/n" in reply.content["privacy"]["refusal"]


def test_auto_noise_plans_the_budget_over_the_planned_rounds(setup):
    to_clients, task, arrays = setup
    to_clients = with_privacy(to_clients, noise_multiplier=None, planned_rounds=2, epsilon=4.0)
    totals = [_train(to_clients, arrays, r).content["metrics"]["epsilon_total"] for r in (1, 2)]
    assert totals[0] < totals[1] <= 4.0
    assert totals[1] > 3.8  # the plan spends (almost) the whole budget over the 2 planned rounds
    third = _train(to_clients, arrays, 3).content
    assert third["metrics"]["epsilon_total"] <= 4.0


def test_review_round_is_accounted_per_review(tmp_path, flower_identity):
    settings = base_settings("review", noise_multiplier=1.0, unit="review", epsilon=8, person_epsilon="null")
    to_clients = round_config(settings, tmp_path, epochs=1)
    task = build_task(to_clients.task, coordinator_catalog(to_clients.data, to_clients.seed), seed=to_clients.seed,
                      privacy_unit="review")
    model = task.build_model()
    arrays = ArrayRecord({k: v for k, v in model.state_dict().items()})
    reply = _train(to_clients, arrays)
    assert reply.content["privacy"]["unit"] == "review"
    assert set(reply.content["arrays"].keys()) == set(model.state_dict().keys())
    _, data = load_simulated(to_clients.data, to_clients.seed, 0)
    plan = plan_sampling(len(task.train_dataset(data)), to_clients.task.batch_size, 1)
    independent = RDPAccountant()
    for _ in range(plan.steps):
        independent.step(noise_multiplier=1.0, sample_rate=plan.sample_rate)
    assert reply.content["metrics"]["epsilon_total"] == pytest.approx(independent.get_epsilon(delta=1e-5))


def test_dp_noise_and_sampling_are_not_reproducible_from_public_seeds():
    """Same seeded init, same data, same seed set before training: DP results must still differ."""
    import torch

    from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
    from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store

    gen = StoreGeneratorConfig(num_items=100, mean_customers=30)
    task = build_task(RecommenderConfig(embedding_dim=8), generate_catalog(gen))
    dataset = task.train_dataset(generate_store(gen, 2))
    results = []
    for _ in range(2):
        model = task.build_model()  # seeds torch with the public task seed
        torch.manual_seed(0)
        train_local(task, model, dataset, LocalTrainingConfig(epochs=1, batch_size=8, lr=0.1), DPParams(1.0, 1.0),
                    torch.device("cpu"))
        results.append(model.output.bias.detach().clone())
    assert not torch.equal(results[0], results[1])
    assert float((results[0] - results[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batches_still_take_a_noisy_step(mode):
    """With batch_size=1 many Poisson batches are empty; each is still a DP step (noise on a zero sum)."""
    import torch

    from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
    from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store

    gen = StoreGeneratorConfig(num_items=100, mean_customers=30)
    task = build_task(RecommenderConfig(embedding_dim=8), generate_catalog(gen))
    dataset = task.train_dataset(generate_store(gen, 2))
    model = task.build_model()
    before = model.output.bias.detach().clone()
    result = train_local(task, model, dataset, LocalTrainingConfig(epochs=1, batch_size=1, lr=0.1, optimizer="sgd"),
                         DPParams(1.0, 1.0, mode), torch.device("cpu"))
    assert result.steps == len(dataset)  # every planned step was taken, empty or not
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before, model.output.bias)
