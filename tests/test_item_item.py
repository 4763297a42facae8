"""The item-item (EASE) recommender: exact without DP, released through the distributed path under DP."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import base_settings
from storefed.data.sources import load_simulated
from storefed.models.matrix_layout import symmetric_from_upper
from storefed.privacy import skellam as sk
from storefed.privacy.ledger import open_ledger
from storefed.privacy.releases import bounded_gram_sum, bounded_sum
from storefed.server.run_setup import prepare_run


def _item_item(tmp_path, *overrides: str, **privacy):
    return base_settings("recommender", "task.model=item_item", "federation.stores_per_round=4", "federation.rounds=2",
                         f"run_dir={tmp_path / 'run'}", *overrides, **privacy)


def _histories(settings, stores: int = 4) -> list[np.ndarray]:
    from storefed.models.task import build_task

    catalog = load_simulated(settings.data, settings.seed, 0)[0]
    task = build_task(settings.task, catalog, seed=settings.seed)
    return [h for p in range(stores) for h in task.split(load_simulated(settings.data, settings.seed, p)[1])[0]]


def test_one_customer_moves_a_release_by_at_most_the_bound():
    rows = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.5]])
    assert np.linalg.norm(bounded_sum(rows[:1], 1.0)) == pytest.approx(1.0)
    assert np.linalg.norm(bounded_sum(rows, 1.0) - bounded_sum(rows[1:], 1.0)) <= 1.0 + 1e-12
    for bound in (1.0, 0.25):
        change = bounded_gram_sum(rows, bound) - bounded_gram_sum(rows[1:], bound)
        assert np.linalg.norm(change) <= bound + 1e-12
    full = symmetric_from_upper(bounded_gram_sum(rows[:1] / 5.0), 3)
    assert np.allclose(full, np.outer(rows[0] / 5.0, rows[0] / 5.0))


def test_without_dp_the_model_is_ease_on_the_pooled_gram_and_fedavg_reproduces_it(tmp_path):
    from storefed.simulations.evaluation.federated import global_model, run_federated

    settings = _item_item(tmp_path, enabled=False)
    assert settings.task.candidate_items == 0 and settings.task.ease_lambda == 100.0, "exact defaults resolved"
    result = run_federated(settings, tmp_path / "run")
    task, model = global_model(settings, tmp_path / "run", result.state)
    histories = _histories(settings)
    n, items = len(histories), task.num_items
    x = np.zeros((n, items))
    for row, h in zip(x, histories):
        row[np.unique(h[-(task.max_history + 1):])] = 1.0
    x /= np.sqrt(x.sum(1, keepdims=True))
    gram = x.T @ x / n
    assert np.allclose(model.popularity.numpy(), x.sum(0) / n, atol=1e-6), "FedAvg's mean is the platform mean"
    inverse = np.linalg.inv(gram + 100.0 * np.diag(gram).mean() * np.eye(items))
    ease = -inverse / np.diag(inverse)
    np.fill_diagonal(ease, 0.0)
    order = np.argsort(-model.popularity.numpy(), kind="stable")
    probe = torch.tensor([[0, 0, 3, 7], [1, 2, 5, 11]])  # item index + 1, 0 = padding
    scores = model(probe).detach().numpy()
    for row, hist in zip(scores, probe.numpy()):
        q = np.zeros(items)
        q[hist[hist > 0] - 1] = 1.0
        q /= np.sqrt(q.sum())
        expected = q[order] @ ease[np.ix_(order, order)]
        assert np.allclose(row[order], expected, atol=1e-4)


def test_distributed_releases_compose_in_the_ledger_within_the_budget(tmp_path):
    from storefed.simulations.evaluation.federated import global_model, run_distributed

    settings = _item_item(tmp_path, mode="distributed", epsilon=8.0)
    setup = prepare_run(settings, tmp_path / "run")
    assert setup.prior is not None and setup.skellam.dim == setup.catalog.num_items + 50 * 51 // 2
    result = run_distributed(settings, tmp_path / "run")
    assert result.trained == 4 and result.refused == 0
    (path, *_) = sorted((tmp_path / "run" / "ledgers").glob("*.ledger.json"))
    rounds = json.loads(path.read_text())["rounds"]
    assert [r["sample_rate"] for r in rounds] == [1.0, 1.0] and all(r["mechanism"] == "skellam" for r in rounds)
    spent = sk.epsilon([(setup.prior, 1.0, 1), (setup.skellam, 1.0, 1)], 1e-5)
    assert 7.0 < spent <= 8.0
    ledger = open_ledger(path.parent, path.name.split(".")[0], "recommender", "customer", 1e-5, "rdp", 8.0)
    assert ledger.epsilon_spent == pytest.approx(spent)
    task, model = global_model(settings, tmp_path / "run", result.state)
    histories = _histories(settings)
    truth = sum(1.0 / np.sqrt(len(np.unique(h[-(task.max_history + 1):]))) * np.bincount(
        np.unique(h[-(task.max_history + 1):]), minlength=task.num_items) for h in histories)
    assert np.corrcoef(model.popularity.numpy(), truth)[0, 1] > 0.8, "the noisy release tracks popularity"
    assert model.cooccurrence.abs().sum() > 0 and torch.isfinite(model(torch.tensor([[0, 1, 2]]))).all()


def test_item_item_goes_through_secaggplus_in_two_rounds(tmp_path, flower_identity):
    from flwr.app import Context, RecordDict
    from test_secure_aggregation import InProcessGrid

    from storefed.models.saved_model import load_global_model
    from storefed.server.secure_aggregation import run_secure_federation

    settings = _item_item(tmp_path, "federation.num_stores=3", "federation.stores_per_round=3",
                          "federation.eval_stores_per_round=0", mode="distributed")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    summary = run_secure_federation(InProcessGrid(3), context, settings, tmp_path / "run")
    assert summary["rounds_completed"] == 2
    claim = summary["privacy"]
    assert claim["mode"] == "distributed" and claim["accountant"] == "skellam-rdp"
    assert claim["sampling"] == "none (every unit, q = 1)" and "holds only while secure aggregation holds" in claim["guarantee"]
    weights, _ = load_global_model(tmp_path / "run")
    assert float(weights["popularity"].max()) > 1.0 and float(weights["cooccurrence"].abs().sum()) > 0
    for path in (tmp_path / "run" / "ledgers").glob("*.ledger.json"):
        assert [r["sample_rate"] for r in json.loads(path.read_text())["rounds"]] == [1.0, 1.0]


@pytest.mark.parametrize("overrides, privacy, message", [
    ((), {}, "privacy.mode='local' is not allowed: must be distributed for task.model=item_item under DP"),
    (("federation.rounds=3",), {"mode": "distributed"}, "federation.rounds=3 is not allowed: must be 2"),
    ((), {"mode": "distributed", "sample_rate": 0.1}, "privacy.sample_rate=0.1 is not allowed: must be null"),
    (("task.ease_lambda=0",), {"enabled": False}, "task.ease_lambda=0"),
    (("task.model=knn",), {"enabled": False}, "task.model='knn' is not allowed"),
])
def test_bad_item_item_settings_are_refused_before_anything_runs(tmp_path, overrides, privacy, message):
    from storefed.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _item_item(tmp_path, *overrides, **privacy)


def test_the_multinomial_objective_uses_each_customers_whole_history_as_one_unit():
    from storefed.models.recommender import PAD, WholeHistoryDataset

    torch.manual_seed(0)
    history = np.array([4, 2, 9, 2, 7, 1])
    dataset = WholeHistoryDataset([history, np.array([5])], max_history=4, num_items=12, input_dropout=0.5)
    assert len(dataset) == 1, "a customer with one item has nothing to predict"
    kept_counts = []
    for _ in range(200):
        inputs, target = dataset[0]
        kept = set((inputs[inputs != PAD] - 1).tolist())
        assert kept and kept <= {2, 9, 7, 1}, "the input is a non-empty subset of the capped history"
        kept_counts.append(len(kept))
        assert torch.allclose(target, torch.tensor([0, .25, .25, 0, 0, 0, 0, .25, 0, .25, 0, 0]))
    assert 1.5 < np.mean(kept_counts) < 2.7, "about half of the four items are hidden"
    logits = torch.zeros(1, 12, requires_grad=True)
    torch.nn.functional.cross_entropy(logits, target.unsqueeze(0)).backward()
    assert logits.grad[0, 1] < 0 and logits.grad[0, 0] > 0, "probability targets pull every history item up"


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_catalog_categories_share_strength_and_train_under_dp(tmp_path, mode):
    from storefed.client.local_training import DPParams, local_training_config, train_local
    from storefed.models.recommender import HistoryRecommender, category_index

    settings = base_settings("recommender", "task.catalog_features=true", "task.embedding_dim=8", "task.epochs=1",
                             f"run_dir={tmp_path}")
    from storefed.models.task import build_task

    catalog, data = load_simulated(settings.data, settings.seed, 0)
    task = build_task(settings.task, catalog, seed=0)
    model = task.build_model()
    categories = category_index(catalog)
    assert model.category_embedding is not None and model.category_output.out_features == int(categories.max()) + 1
    same = torch.nonzero(categories == categories[0]).flatten()[:2] + 1
    with torch.no_grad():
        model.item_embedding.weight.zero_()
        model.output.weight.zero_()
        model.output.bias.zero_()
    scores = model(torch.tensor([[0, int(same[0])]]))
    assert float(scores[0, same[0] - 1]) == pytest.approx(float(scores[0, same[1] - 1])), "same category, same score"
    other = int(torch.nonzero(categories != categories[0]).flatten()[0])
    assert float(scores[0, other]) != pytest.approx(float(scores[0, same[0] - 1])), "another category scores differently"
    local = local_training_config(settings.task)
    before = model.category_embedding.weight.detach().clone()
    train_local(task, model, task.train_dataset(data), local, DPParams(1.0, 1.0, mode), torch.device("cpu"))
    assert not torch.equal(before, model.category_embedding.weight.detach()), "the category table is DP-trained"
    assert HistoryRecommender(10, 4).category_embedding is None
