"""Book-keeping clipping (``privacy.grad_sample_mode=book``, privacy/book_keeping.py) is exact: per-sample
norms, the clipped sum and the clipped, noised update equal Opacus' (hooks) on small recommenders in
float64, with the same noise draw; unsupported layers are refused by name."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from storefed.client.local_training import DPParams, LocalTrainingConfig, _unit_losses, train_local
from storefed.config.schema import RecommenderConfig
from storefed.data.schema import Catalog
from storefed.models.recommender import CustomerDataset, RecommenderTask, WholeHistoryDataset, pad_history
from storefed.privacy.book_keeping import BookKeeping, BookKeepingOptimizer, UnsupportedModuleError
from storefed.privacy.dp_sgd import make_private

CLIP = 2.9  # between the per-sample norms of these models: some samples are clipped, others not
BATCH = 16


def _task(num_items: int, **cfg) -> RecommenderTask:
    catalog = Catalog(item_ids=[f"i{n}" for n in range(num_items)], categories=[f"c{n % 3}" for n in range(num_items)])
    return RecommenderTask(RecommenderConfig(**({"embedding_dim": 8} | cfg)), catalog, seed=0)


def _histories(num_items: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, num_items, size=int(rng.integers(2, 12))) for _ in range(count)]


def _batch(num_items: int, seed: int = 1):
    histories = _histories(num_items, BATCH, seed)
    histories[0] = np.array([3, 3, 3, 5, 3])  # repeated items: equal embedding rows within one sample
    return (torch.stack([pad_history(h[:-1], 50) for h in histories]), torch.tensor([int(h[-1]) for h in histories]))


TASKS = {
    "full": lambda: _task(300, catalog_features=True),
    "hashed": lambda: _task(300, catalog_features=True, item_buckets=64),  # full softmax over hashed buckets
    "hashed-sampled": lambda: _task(20_000, catalog_features=True, item_buckets=128, sampled_negatives=32),
}


def _logits(task, module, batch):
    task.negatives_rng.manual_seed(5)  # the same public negatives for every run
    return task.forward(module, batch, torch.device("cpu"))


def _opacus_per_sample(task, model, batch) -> torch.Tensor:
    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    logits, targets = _logits(task, hooks, batch)
    F.cross_entropy(logits, targets, reduction="sum").backward()
    per_sample = torch.cat([p.grad_sample.reshape(BATCH, -1) for p in hooks.parameters() if p.requires_grad], dim=1)
    hooks._close()
    return per_sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@pytest.mark.parametrize("name", list(TASKS))
def test_norms_and_clipped_sum_equal_opacus_hooks(name):
    task = TASKS[name]()
    model = task.build_model().double()
    batch = _batch(task.num_items)
    per_sample = _opacus_per_sample(task, model, batch)
    norms = per_sample.norm(dim=1)
    assert 4 <= int((norms > CLIP).sum()) < BATCH  # clipping active for some samples, not all
    expected = (per_sample * (CLIP / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)).sum(0)

    mine = copy.deepcopy(model)
    book = BookKeeping(mine, loss_reduction="sum")
    logits, targets = _logits(task, mine, batch)
    F.cross_entropy(logits, targets, reduction="sum").backward()
    assert all(p.grad is None for p in mine.parameters())  # one backward pass, no weight gradients formed
    sums = book.clipped_sums(CLIP)
    assert _rel(book.per_sample_gradient_norms, norms) < 1e-6
    assert (book.per_sample_gradient_norms - norms).abs().max() / norms.min() < 1e-6
    assert _rel(torch.cat([sums[p].reshape(-1) for p in mine.parameters()]), expected) < 1e-6
    book.close()
    assert not any("forward" in m.__dict__ for m in mine.modules())


@pytest.mark.parametrize("name", ["full", "hashed-sampled"])
def test_noised_update_equals_opacus_dp_optimizer_with_the_same_noise(name):
    task = TASKS[name]()
    model = task.build_model().double()
    batch = _batch(task.num_items, seed=2)
    noise, expected_batch = 0.7, 20

    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    reference = DPOptimizer(torch.optim.SGD(hooks.parameters(), lr=0.1), noise_multiplier=noise, max_grad_norm=CLIP,
                            expected_batch_size=expected_batch, loss_reduction="mean",
                            generator=torch.Generator().manual_seed(123))
    logits, targets = _logits(task, hooks, batch)
    F.cross_entropy(logits, targets).backward()
    reference.pre_step()
    expected = [p.grad.clone() for p in hooks.parameters()]

    mine = copy.deepcopy(model)
    book = BookKeeping(mine, loss_reduction="mean")
    optimizer = BookKeepingOptimizer(torch.optim.SGD(mine.parameters(), lr=0.1), book, noise, CLIP, expected_batch,
                                     torch.Generator().manual_seed(123))
    logits, targets = _logits(task, mine, batch)
    F.cross_entropy(logits, targets, reduction="none").mean().backward()
    before = [p.detach().clone() for p in mine.parameters()]
    optimizer.step()
    for p, want, old in zip(mine.parameters(), expected, before):
        assert p.grad.shape == want.shape and _rel(p.grad, want) < 1e-6
        assert torch.allclose(p.detach(), old - 0.1 * want, rtol=1e-9, atol=1e-12)  # the SGD step applied it

    # the same without noise: the clipped mean alone agrees (noise does not hide a clipping error)
    hooks.zero_grad()
    reference.zero_grad()
    reference.noise_multiplier = 0.0
    logits, targets = _logits(task, hooks, batch)
    F.cross_entropy(logits, targets).backward()
    reference.pre_step()
    optimizer.noise_multiplier = 0.0
    optimizer.zero_grad()
    with torch.no_grad():
        for p, old in zip(mine.parameters(), before):
            p.copy_(old)
    logits, targets = _logits(task, mine, batch)
    F.cross_entropy(logits, targets, reduction="none").mean().backward()
    optimizer.pre_step()
    assert _rel(torch.cat([p.grad.reshape(-1) for p in mine.parameters()]),
                torch.cat([p.grad.reshape(-1) for p in hooks.parameters()])) < 1e-6
    hooks._close()


def test_empty_batch_adds_opacus_noise_only():
    task = TASKS["hashed"]()
    model = task.build_model().double()
    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    reference = DPOptimizer(torch.optim.SGD(hooks.parameters(), lr=0.0), noise_multiplier=1.3, max_grad_norm=0.5,
                            expected_batch_size=8, loss_reduction="mean", generator=torch.Generator().manual_seed(9))
    for p in hooks.parameters():  # what client/local_training.py's empty-batch step gives Opacus
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    reference.pre_step()
    mine = copy.deepcopy(model)
    optimizer = BookKeepingOptimizer(torch.optim.SGD(mine.parameters(), lr=0.0), BookKeeping(mine), 1.3, 0.5, 8,
                                     torch.Generator().manual_seed(9))
    optimizer.zero_grad()
    optimizer.step()
    for p, q in zip(mine.parameters(), hooks.parameters()):
        assert torch.equal(p.grad, q.grad)
    noise = torch.cat([p.grad.reshape(-1) for p in mine.parameters()]) * 8
    assert abs(float(noise.std()) / (1.3 * 0.5) - 1) < 0.05  # std noise_multiplier * C before the 1/8
    hooks._close()


@pytest.mark.parametrize("steps", [3, 40])  # 3: ghost norm (T^2 <= d p); 40: instantiated per-sample gradient
def test_linear_on_sequences_equals_opacus(steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(BATCH, steps, 6, dtype=torch.float64)
    target = torch.randn(BATCH, 4, dtype=torch.float64)

    def loss_of(module):
        return ((module(x).mean(1) - target) ** 2).sum()

    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    loss_of(hooks).backward()
    per_sample = torch.cat([p.grad_sample.reshape(BATCH, -1) for p in hooks.parameters() if p.requires_grad], dim=1)
    norms = per_sample.norm(dim=1)
    clip = float(norms.median())
    expected = (per_sample * (clip / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)).sum(0)
    mine = copy.deepcopy(model)
    book = BookKeeping(mine, loss_reduction="sum")
    loss_of(mine).backward()
    sums = book.clipped_sums(clip)
    assert _rel(book.per_sample_gradient_norms, norms) < 1e-6
    assert _rel(torch.cat([sums[p].reshape(-1) for p in mine.parameters()]), expected) < 1e-6
    hooks._close()


def test_frozen_parameters_are_skipped():
    task = TASKS["full"]()
    model = task.build_model().double()
    model.item_embedding.weight.requires_grad_(False)
    model.user_tower[0].bias.requires_grad_(False)
    batch = _batch(task.num_items)
    per_sample = _opacus_per_sample(task, model, batch)
    mine = copy.deepcopy(model)
    book = BookKeeping(mine, loss_reduction="sum")
    logits, targets = _logits(task, mine, batch)
    F.cross_entropy(logits, targets, reduction="sum").backward()
    sums = book.clipped_sums(CLIP)
    assert mine.item_embedding.weight not in sums and mine.user_tower[0].bias not in sums
    assert _rel(book.per_sample_gradient_norms, per_sample.norm(dim=1)) < 1e-6
    book.close()


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.norm(self.embedding(x).mean(1)))


def test_unsupported_layers_are_refused_by_name():
    model = _Normed()
    with pytest.raises(UnsupportedModuleError, match=r"norm \(torch.nn.modules.normalization.LayerNorm\)"):
        BookKeeping(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 2, dtype=torch.long),
                                                                        torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(UnsupportedModuleError, match="LayerNorm"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 1.0, 1.0, "book")
    assert not any("forward" in m.__dict__ for m in model.modules())
    model.norm.requires_grad_(False)  # frozen: nothing to clip there
    BookKeeping(model).close()
    with pytest.raises(UnsupportedModuleError, match="max_norm"):
        BookKeeping(nn.Embedding(5, 2, max_norm=1.0))


def test_a_weight_used_outside_its_layer_is_refused_at_the_step():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 4)

        def forward(self, x):
            return self.embedding(x).mean(1) @ self.embedding.weight.t()  # tied output: unclipped by BK

    model = Tied()
    optimizer = BookKeepingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), BookKeeping(model), 1.0, 1.0, 4)
    F.cross_entropy(model(torch.randint(0, 10, (4, 3))), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(RuntimeError, match="ordinary \\(unclipped\\) gradient"):
        optimizer.step()


def test_make_private_book_keeps_opacus_sampling():
    task = TASKS["hashed"]()
    model = task.build_model()
    dataset = CustomerDataset(_histories(300, 50, seed=3), task.max_history)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 1.0, 1.0, "book")
    assert private.model is model and private.loader.sample_rate == 1 / 7
    assert private.optimizer.expected_batch_size == int(50 / 7)
    assert type(private.loader).__name__ == "DPDataLoader"
    private.optimizer.book.close()


def test_dp_training_with_book_keeping_changes_the_shared_tensors():
    task = _task(100_000, catalog_features=True, item_buckets=512, embedding_dim=16, sampled_negatives=256)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = CustomerDataset(_histories(100_000, 120, seed=7), task.max_history)
    result = train_local(task, model, dataset, LocalTrainingConfig(epochs=1, batch_size=32, lr=0.01),
                         DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="book"), torch.device("cpu"))
    assert result.steps == 4 and np.isfinite(result.mean_loss)
    assert all(not torch.equal(before[k], model.state_dict()[k]) for k in task.shared_keys(model))
    assert not any("forward" in m.__dict__ or "_bk_record" in m.__dict__ for m in model.modules())


def test_unit_losses_are_per_unit_means():
    torch.manual_seed(0)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    logits, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    unit = _unit_losses(criterion, logits, targets)
    assert torch.allclose(unit, F.cross_entropy(logits, targets, weight=criterion.weight, reduction="none"))
    records = torch.tensor([[0, 1, -100], [2, -100, -100], [1, 1, 0], [-100, -100, -100]])
    logits3 = torch.randn(4, 3, 3)
    unit = _unit_losses(nn.CrossEntropyLoss(), logits3, records)
    for b in range(4):
        valid = records[b] != -100
        expected = F.cross_entropy(logits3[b][valid], records[b][valid], reduction="sum") / max(int(valid.sum()), 1)
        assert torch.allclose(unit[b], expected)
    soft = torch.softmax(torch.randn(4, 3), 1)  # the multinomial objective's target distributions
    assert torch.allclose(_unit_losses(nn.CrossEntropyLoss(), logits, soft),
                          -(soft * torch.log_softmax(logits, 1)).sum(1))


def test_multinomial_objective_trains_under_book_keeping():
    task = _task(200, objective="multinomial", embedding_dim=8)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = WholeHistoryDataset(_histories(200, 40, seed=4), task.max_history, 200, 0.2)
    result = train_local(task, model, dataset, LocalTrainingConfig(epochs=1, batch_size=10, lr=0.01),
                         DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="book"), torch.device("cpu"))
    assert result.steps == 4 and np.isfinite(result.mean_loss)
    assert all(not torch.equal(before[k], model.state_dict()[k]) for k in task.shared_keys(model))


def test_a_step_without_backward_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    optimizer = BookKeepingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), BookKeeping(model), 1.0, 1.0, 4)
    model(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="no layer got an output gradient"):
        optimizer.step()


def test_auto_uses_book_keeping_for_the_recommenders_and_ghost_clipping_where_it_cannot():
    from storefed.config.schema import PrivacyConfig, ReviewConfig
    from storefed.models.review import ReviewTask
    from storefed.privacy.dp_sgd import resolve_grad_sample_mode

    assert PrivacyConfig().grad_sample_mode == "auto" and DPParams(1.0, 1.0).grad_sample_mode == "auto"
    for buckets in (0, 64):
        assert resolve_grad_sample_mode(_task(50, item_buckets=buckets).build_model(), "auto") == "book"
    catalog = Catalog(item_ids=[f"i{n}" for n in range(10)], categories=["c"] * 10)
    bert = ReviewTask(ReviewConfig(encoder="scratch", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                   vocab_size=64, max_length=8), catalog, privacy_unit="review").build_model()
    assert resolve_grad_sample_mode(bert, "auto") == "ghost"  # LayerNorm: book-keeping cannot clip it
    assert resolve_grad_sample_mode(bert, "hooks") == "hooks"
