"""Hashed item tables (``task.item_buckets > 0``, models/hashed_items.py): size independent of the
catalog, exact chunked full ranking, sampled softmax that keeps per-sample clipping a valid
per-customer bound, and Opacus ghost clipping agreeing with Opacus hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.config import ConfigError, compose
from storefed.config.schema import RecommenderConfig
from storefed.data.schema import Catalog
from storefed.models.hashed_items import HashedHistoryRecommender, hash_coefficients, hash_rows
from storefed.models.recommender import (
    CustomerDataset,
    HistoryRecommender,
    RecommenderTask,
    chunked_ranks,
    evaluate_chunked,
    evaluate_scores,
    pad_history,
    popularity_scorer,
    rank_of_targets,
)


def _catalog(num_items: int, categories: int = 1) -> Catalog:
    return Catalog(item_ids=[f"i{n}" for n in range(num_items)],
                   categories=[f"c{n % categories}" for n in range(num_items)])


def _task(num_items: int, categories: int = 1, **cfg) -> RecommenderTask:
    return RecommenderTask(RecommenderConfig(**cfg), _catalog(num_items, categories), seed=0)


def _histories(num_items: int, count: int, seed: int, max_len: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, num_items, size=int(rng.integers(2, max_len))) for _ in range(count)]


def _batch(histories: list[np.ndarray], max_history: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([pad_history(h[:-1], max_history) for h in histories]),
            torch.tensor([int(h[-1]) for h in histories]))


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_parameters_do_not_depend_on_the_catalog():
    small = HashedHistoryRecommender(1_000, 64, 4096)
    large = HashedHistoryRecommender(1_000_000, 64, 4096)
    assert _shapes(small) == _shapes(large)
    assert sum(v.numel() for v in large.state_dict().values()) == 4097 * 64 + 64 * 64 + 64 + 4096 * 64 + 4096
    task = _task(1_000_000, item_buckets=4096, embedding_dim=64)
    assert set(task.shared_keys(task.build_model())) == set(_shapes(large))


def test_buckets_zero_keeps_the_full_table_model_bit_for_bit():
    catalog = _catalog(40, categories=3)
    task = RecommenderTask(RecommenderConfig(embedding_dim=8), catalog, seed=3)
    model = task.build_model()
    assert type(model) is HistoryRecommender
    torch.manual_seed(3)
    reference = HistoryRecommender(40, 8, task.item_categories)
    assert _shapes(model) == {"item_embedding.weight": (41, 8), "user_tower.0.weight": (8, 8), "user_tower.0.bias": (8,),
                              "output.weight": (40, 8), "output.bias": (40,), "category_embedding.weight": (4, 8),
                              "category_output.weight": (3, 8)}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    history, target = _batch(_histories(40, 5, seed=1))
    logits, targets = task.forward(model, (history, target), torch.device("cpu"))
    assert logits.shape == (5, 40) and torch.equal(targets, target)


def test_hash_functions_are_fixed_and_spread_items():
    a, c = hash_coefficients(2)
    assert torch.equal(a, hash_coefficients(2)[0]) and torch.equal(c, hash_coefficients(2)[1])
    rows = hash_rows(torch.arange(100_000), a, c, 4096)
    assert rows.shape == (100_000, 2) and int(rows.min()) >= 0 and int(rows.max()) < 4096
    pairs = np.unique(rows.numpy(), axis=0)
    assert len(pairs) > 0.99 * 100_000  # two items rarely share all their rows
    counts = np.bincount(rows[:, 0].numpy(), minlength=4096)
    assert counts.min() > 0 and counts.max() < 3 * 100_000 / 4096


@pytest.mark.parametrize("categories", [1, 4])
def test_chunked_full_ranking_equals_ranking_all_items_at_once(categories):
    num_items = 300
    task = _task(num_items, categories, item_buckets=64, embedding_dim=8)  # many collisions: ties happen
    model = task.build_model().eval()
    test = [(h[:-1], int(h[-1])) for h in _histories(num_items, 70, seed=2, max_len=30)]
    history = torch.stack([pad_history(h, task.max_history) for h, _ in test])
    with torch.no_grad():
        state = model.score_state(model.encode(history))
        scores = model(history)
    masked = scores.clone()
    for row, (h, t) in enumerate(test):
        masked[row, torch.as_tensor(np.setdiff1d(h, [t]), dtype=torch.long)] = -float("inf")
    at_once = rank_of_targets(masked, torch.tensor([t for _, t in test]))
    for chunk in (7, 64, 299, 300, 65536):
        ranks = chunked_ranks(state, model.score_from, [h for h, _ in test], [t for _, t in test], num_items, chunk)
        assert torch.equal(ranks, at_once), chunk

    def state_of(histories):
        with torch.no_grad():
            return model.score_state(model.encode(torch.stack([pad_history(h, task.max_history) for h in histories])))

    def all_scores(histories):
        with torch.no_grad():
            return model(torch.stack([pad_history(h, task.max_history) for h in histories]))

    expected = evaluate_scores(all_scores, test, num_items, 10, 100, seed=0)
    assert evaluate_chunked(state_of, model.score_from, test, num_items, 10, 100, seed=0, chunk_items=13) == expected


def test_task_evaluation_of_a_hashed_model_matches_ranking_all_items():
    task = _task(3_000, 3, item_buckets=256, embedding_dim=8)
    model = task.build_model()
    data = _store(task.num_items)
    metrics = task.evaluate(model, data, torch.device("cpu"))
    train, test = task.split(data)

    def all_scores(histories):
        with torch.no_grad():
            return model(torch.stack([pad_history(h, task.max_history) for h in histories]))

    expected = evaluate_scores(all_scores, test, 3_000, 10, 100, seed=0)
    assert {k: metrics[k] for k in expected} == expected
    popular = evaluate_scores(popularity_scorer(train, 3_000), test, 3_000, 10, 100, seed=0)
    assert {k: metrics[f"local_pop_{k}"] for k in popular} == popular


def test_small_catalog_uses_the_exact_full_softmax():
    task = _task(500, item_buckets=128, embedding_dim=8, sampled_negatives=500)
    model = task.build_model()
    history, target = _batch(_histories(500, 6, seed=3))
    logits, targets = task.forward(model, (history, target), torch.device("cpu"))
    assert logits.shape == (6, 500) and torch.equal(targets, target)


def test_sampled_loss_of_one_customer_ignores_the_others():
    """The DP-validity property: with the batch's public negatives fixed, changing customer 1 changes
    neither the loss nor the per-sample gradient of customer 0."""
    task = _task(50_000, categories=3, item_buckets=256, embedding_dim=8, sampled_negatives=64)
    assert task.sampled
    base = _histories(50_000, 4, seed=4)
    other = list(base)
    other[1] = np.array([7, 8, 9, 10, 11, 49_999])
    outputs = []
    for histories in (base, other):
        task.negatives_rng.manual_seed(11)  # the same public draw for both batches
        module = GradSampleModule(copy.deepcopy(task.build_model()), loss_reduction="sum")
        logits, targets = task.forward(module, _batch(histories), torch.device("cpu"))
        assert logits.shape == (4, 65) and not bool(targets.any())
        losses = F.cross_entropy(logits, targets, reduction="none")
        losses.sum().backward()
        outputs.append((losses.detach(), [p.grad_sample[0].clone() for p in module.parameters()]))
    (loss_a, grad_a), (loss_b, grad_b) = outputs
    assert torch.equal(loss_a[0], loss_b[0]) and torch.equal(loss_a[2:], loss_b[2:])
    assert not torch.equal(loss_a[1], loss_b[1])
    assert all(torch.allclose(x, y, rtol=0, atol=1e-7) for x, y in zip(grad_a, grad_b))


def test_accidental_hits_are_masked():
    model = HashedHistoryRecommender(100, 4, 16)
    history, _ = _batch(_histories(100, 2, seed=5))
    logits = model(history, torch.tensor([3, 5, 3]), torch.tensor([3, 9]))
    assert torch.isinf(logits[0, [1, 3]]).all() and torch.isfinite(logits[0, [0, 2]]).all()
    assert torch.isfinite(logits[1]).all()


def test_ghost_clipping_norms_and_clipped_sum_equal_opacus_hooks():
    task = _task(20_000, categories=3, item_buckets=128, embedding_dim=8, sampled_negatives=32)
    model = task.build_model().double()
    batch = _batch(_histories(20_000, 16, seed=6))
    clip = 0.05  # below most per-sample norms: clipping is active

    task.negatives_rng.manual_seed(5)
    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    logits, targets = task.forward(hooks, batch, torch.device("cpu"))
    F.cross_entropy(logits, targets, reduction="sum").backward()
    per_sample = torch.cat([p.grad_sample.reshape(16, -1) for p in hooks.parameters()], dim=1)
    norms = per_sample.norm(dim=1)
    assert (norms > clip).sum() >= 8
    clipped = (per_sample * (clip / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)).sum(0)

    task.negatives_rng.manual_seed(5)
    ghost = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="sum", max_grad_norm=clip)
    optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=0.0), noise_multiplier=0.0,
                                                max_grad_norm=clip, expected_batch_size=16, loss_reduction="sum")
    criterion = DPLossFastGradientClipping(ghost, optimizer, torch.nn.CrossEntropyLoss(reduction="sum"), "sum")
    logits, targets = task.forward(ghost, batch, torch.device("cpu"))
    criterion(logits, targets).backward()
    assert torch.allclose(ghost.per_sample_gradient_norms, norms, rtol=0, atol=1e-5)
    summed = torch.cat([p.grad.reshape(-1) for p in ghost.parameters()])
    assert torch.allclose(summed, clipped, rtol=0, atol=1e-5)
    assert float(summed.norm()) <= 16 * clip + 1e-9


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_training_runs_through_the_project_path(mode):
    task = _task(100_000, categories=3, item_buckets=512, embedding_dim=16, sampled_negatives=256)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = CustomerDataset(_histories(100_000, 120, seed=7), task.max_history)
    result = train_local(task, model, dataset, LocalTrainingConfig(epochs=1, batch_size=32, lr=0.01),
                         DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode), torch.device("cpu"))
    assert result.steps == 4 and np.isfinite(result.mean_loss)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = task.evaluate(model, _store(task.num_items), torch.device("cpu"))
    assert 0.0 <= metrics["hr@10"] <= 1.0 and metrics["num-examples"] > 0


def _store(num_items: int):
    from storefed.data.schema import Interactions, MerchantData, Reviews

    histories = _histories(num_items, 30, seed=8)
    user = np.concatenate([np.full(len(h), u) for u, h in enumerate(histories)])
    item = np.concatenate(histories)
    return MerchantData("m0", len(histories), Interactions(user=user, item=item, timestamp=np.arange(len(item))),
                        Reviews(*(np.zeros(0, dtype=np.int64),) * 3, [], np.zeros(0, dtype=np.int64)))


def test_multinomial_on_a_sampled_catalog_is_refused():
    with pytest.raises(ValueError, match="objective=multinomial needs the full softmax"):
        _task(30_000, item_buckets=256, objective="multinomial")
    assert not _task(900, item_buckets=256, objective="multinomial").sampled


@pytest.mark.parametrize(("override", "message"), [
    ("task.item_buckets=-1", "task.item_buckets=-1 is not allowed"),
    ("task.item_buckets=1", "task.item_buckets=1 is not allowed"),
    ("task.item_hashes=0", "task.item_hashes=0 is not allowed"),
    ("task.sampled_negatives=0", "task.sampled_negatives=0 is not allowed"),
])
def test_bad_hashing_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("simulate", ["task=recommender", override])


def test_hashing_settings_compose():
    task = compose("simulate", ["task=recommender", "task.item_buckets=4096", "task.item_hashes=3"]).task
    assert (task.item_buckets, task.item_hashes, task.sampled_negatives) == (4096, 3, 20000)
    with pytest.raises(ConfigError, match="task.item_buckets=64 is not allowed: hashed item tables are for"):
        compose("simulate", ["task=recommender", "task.model=item_item", "task.item_buckets=64"])
