"""``privacy.unit=user`` for the review model: one DP sample = one reviewer's reviews.

Opacus clips per item of the batch dimension. These tests show that with the reviewer unit that
item *is* the reviewer: its per-sample gradient is exactly the sum of the gradients of the
reviewer's reviews, so clipping bounds the reviewer's whole contribution, and removing the
reviewer moves the clipped sum by at most C.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from conftest import task_from_dict
from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store

GEN = StoreGeneratorConfig(num_items=100, mean_customers=40, review_probability=0.6)
TASK = {"name": "review", "encoder": "scratch", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
        "max_length": 12, "vocab_size": 256, "max_reviews_per_user": 3, "privacy_unit": "user"}


@pytest.fixture(scope="module")
def store():
    catalog = generate_catalog(GEN)
    return task_from_dict(TASK, catalog), task_from_dict(dict(TASK, privacy_unit="review"), catalog), generate_store(GEN, 2)


def _inputs(task, ids, mask):
    *lead, length = ids.shape
    positions = torch.arange(length).expand(*lead, length).contiguous()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "position_ids": positions}


def test_one_item_per_reviewer_holding_their_most_recent_reviews(store):
    task, per_review, data = store
    assert task.privacy_unit == "reviewer" and per_review.privacy_unit == "review"
    ids, mask, labels = task.train_dataset(data).tensors
    train_idx = per_review._split_indices(data, "train")
    reviewers = np.unique(data.reviews.user[train_idx])
    assert ids.shape == (len(reviewers), 3, 12) and labels.shape == (len(reviewers), 3)
    counts = [min(3, int((data.reviews.user[train_idx] == u).sum())) for u in reviewers]
    assert (labels != -100).sum(1).tolist() == counts  # capped at 3, padding labelled -100
    assert ((mask.sum(-1) > 0) == (labels != -100)).all()  # padded slots are empty
    prolific = int(np.argmax([(data.reviews.user[train_idx] == u).sum() for u in reviewers]))
    mine = train_idx[data.reviews.user[train_idx] == reviewers[prolific]]
    newest = mine[np.argsort(-data.reviews.timestamp[mine], kind="stable")][:3]
    expected_ids, _ = per_review._encode([data.reviews.text[i] for i in newest])
    assert torch.equal(ids[prolific, : len(newest)], expected_ids)


def test_a_reviewers_encoding_equals_encoding_each_review_alone(store):
    task, _, data = store
    ids, mask, _ = task.train_dataset(data).tensors
    model = task.build_model().eval()
    with torch.no_grad():
        grouped = model(**_inputs(task, ids[:5], mask[:5]))
        for row in range(5):
            valid = mask[row].sum(-1) > 0
            alone = model(**_inputs(task, ids[row][valid], mask[row][valid]))
            torch.testing.assert_close(grouped[row][valid], alone, rtol=1e-5, atol=1e-5)


def _per_sample(task, ids, mask, labels):
    model = task.build_model().double()
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    logits = module(**_inputs(task, ids, mask))
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").backward()
    params = [p for p in module.parameters() if p.requires_grad]
    return module, params, torch.cat([p.grad_sample.reshape(len(ids), -1) for p in params], dim=1).detach()


def test_a_reviewers_per_sample_gradient_is_the_sum_over_their_reviews_and_is_clipped_as_one(store):
    task, _, data = store
    ids, mask, labels = task.train_dataset(data).tensors
    ids, mask, labels = ids[:8], mask[:8], labels[:8]
    _, _, grouped = _per_sample(task, ids, mask, labels)
    for row in range(8):
        valid = labels[row] != -100
        _, _, alone = _per_sample(task, ids[row][valid][:, None], mask[row][valid][:, None], labels[row][valid][:, None])
        torch.testing.assert_close(grouped[row], alone.sum(0), rtol=1e-6, atol=1e-9)

    def clipped_sum(rows: list[int], max_grad_norm: float) -> torch.Tensor:
        module, params, _ = _per_sample(task, ids[rows], mask[rows], labels[rows])
        optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                                expected_batch_size=len(rows), loss_reduction="sum")
        optimizer.clip_and_accumulate()
        return torch.cat([p.summed_grad.flatten() for p in optimizer.params])

    max_grad_norm = float(grouped.norm(dim=1).median())
    everyone = list(range(8))
    for row in (int(grouped.norm(dim=1).argmax()), int(grouped.norm(dim=1).argmin())):
        change = clipped_sum(everyone, max_grad_norm) - clipped_sum([r for r in everyone if r != row], max_grad_norm)
        assert float(change.norm()) <= max_grad_norm * (1 + 1e-9)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_training_at_reviewer_level_takes_its_planned_steps(store, mode):
    task, _, data = store
    dataset = task.train_dataset(data)
    model = task.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = train_local(task, model, dataset, LocalTrainingConfig(epochs=2, batch_size=8, lr=0.01),
                         DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode), torch.device("cpu"))
    assert result.steps == result.plan.steps and result.num_units == len(dataset)
    assert np.isfinite(result.mean_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reviewer_unit_is_refused_where_it_is_not_implemented():
    catalog = generate_catalog(GEN)
    with pytest.raises(ValueError, match="privacy.unit=user is implemented for task.encoder=frozen and scratch, not lora"):
        task_from_dict(dict(TASK, encoder="lora", pretrained_dir="/nonexistent"), catalog)
    with pytest.raises(ValueError, match="privacy.unit='household' is not available for the review model"):
        task_from_dict(dict(TASK, privacy_unit="household"), catalog)
    with pytest.raises(ValueError, match="privacy.unit='review' is not available for the recommender"):
        task_from_dict({"name": "recommender", "privacy_unit": "review"}, catalog)
