"""The recommender's DP unit is the customer: removing one customer's whole history moves the
clipped gradient sum by at most the clipping norm C.

Per-sample gradients come from Opacus (``GradSampleModule``, hooks mode) and are clipped by
Opacus' own ``DPOptimizer.clip_and_accumulate`` (noise multiplier 0, so the comparison is of
the clipped sum itself). The batch holds every training customer of a store (no Poisson
sampling), built from the store's data with and without one customer's interactions; each
customer's random next-item cut is seeded by the customer, so both batches see identical
examples for everyone else. One extra customer has a 300-item history, far beyond the
dataset's ``max_history`` cap: their whole history still enters through one clipped sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from conftest import task_from_dict
from storefed.data.schema import Interactions, MerchantData
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.models.recommender import PAD, customer_histories

LONG_HISTORY = 300


@pytest.fixture(scope="module")
def world():
    cfg = StoreGeneratorConfig(num_items=100, mean_customers=30)
    catalog = generate_catalog(cfg)
    task = task_from_dict({"name": "recommender", "embedding_dim": 8}, catalog)
    data = _with_long_history_customer(generate_store(cfg, 0), catalog.num_items)
    return task, data


def _with_long_history_customer(data: MerchantData, num_items: int) -> MerchantData:
    rng = np.random.default_rng(7)
    user = data.num_users
    inter = data.interactions
    new_items = rng.integers(0, num_items, size=LONG_HISTORY)
    new_times = int(inter.timestamp.max()) + np.arange(1, LONG_HISTORY + 1)
    interactions = Interactions(
        user=np.concatenate([inter.user, np.full(LONG_HISTORY, user)]),
        item=np.concatenate([inter.item, new_items]),
        timestamp=np.concatenate([inter.timestamp, new_times]),
    )
    return MerchantData(data.merchant_id, data.num_users + 1, interactions, data.reviews)


def _without(data: MerchantData, user: int) -> MerchantData:
    """The same store with every interaction of ``user`` removed."""
    inter = data.interactions
    keep = inter.user != user
    interactions = Interactions(user=inter.user[keep], item=inter.item[keep], timestamp=inter.timestamp[keep])
    return MerchantData(data.merchant_id, data.num_users, interactions, data.reviews)


def _batch(task, data: MerchantData):
    """All training examples of ``data``, as (customer ids, histories, targets)."""
    dataset = task.train_dataset(data)
    customers = [u for u, h in enumerate(customer_histories(data)) if len(h) >= 2]
    assert len(dataset) == len(customers)  # one dataset item per customer
    histories, targets = [], []
    for index, customer in enumerate(customers):
        torch.manual_seed(customer)  # the customer's next-item cut, identical in both batches
        history, target = dataset[index]
        histories.append(history)
        targets.append(target)
    return customers, torch.stack(histories), torch.stack(targets)


def _clipped(task, histories, targets, max_grad_norm: float):
    """Opacus-clipped gradient sum (flattened) and the unclipped per-sample gradients."""
    model = task.build_model().double()  # same seeded weights every call
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(targets),
        loss_reduction="sum",
    )
    F.cross_entropy(module(histories), targets, reduction="sum").backward()
    per_sample = torch.cat([p.grad_sample.reshape(len(targets), -1) for p in optimizer.params], dim=1)
    optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in optimizer.params])
    return summed, per_sample.detach()


def test_removing_one_customers_whole_history_moves_the_clipped_sum_by_at_most_c(world):
    task, data = world
    assert task.privacy_unit == "customer"
    customers, histories, targets = _batch(task, data)
    long_customer = data.num_users - 1
    assert customers[-1] == long_customer

    # The long history is capped by the dataset, but it is still one example for one customer.
    assert len(customer_histories(data)[long_customer]) == LONG_HISTORY > task.max_history
    assert int((histories[-1] != PAD).sum()) <= task.max_history

    _, per_sample = _clipped(task, histories, targets, max_grad_norm=1e9)
    norms = per_sample.norm(dim=1)
    max_grad_norm = float(norms.median())  # half the customers are clipped, half are not
    full, _ = _clipped(task, histories, targets, max_grad_norm)

    chosen = {long_customer, customers[int(norms.argmax())], customers[int(norms.argmin())], customers[len(customers) // 2]}
    clipped_seen = unclipped_seen = False
    for customer in sorted(chosen):
        row = customers.index(customer)
        others, other_histories, other_targets = _batch(task, _without(data, customer))
        assert others == customers[:row] + customers[row + 1 :]  # exactly that customer's one example is gone
        assert torch.equal(other_histories, torch.cat([histories[:row], histories[row + 1 :]]))
        without, _ = _clipped(task, other_histories, other_targets, max_grad_norm)

        change = full - without
        assert float(change.norm()) <= max_grad_norm * (1 + 1e-9)
        # The change is exactly that customer's own clipped gradient: nobody else's moved.
        own = per_sample[row] * min(1.0, max_grad_norm / (float(norms[row]) + 1e-6))
        torch.testing.assert_close(change, own, rtol=1e-7, atol=1e-10)
        if norms[row] > max_grad_norm:
            clipped_seen = True
            assert float(change.norm()) == pytest.approx(max_grad_norm, rel=1e-5)  # the bound is tight
        else:
            unclipped_seen = True
    assert clipped_seen and unclipped_seen
