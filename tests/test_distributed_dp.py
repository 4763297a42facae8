"""Distributed DP (privacy.mode=distributed): integers, noise shares, accounting, the merchant's share."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import stats

from conftest import base_settings
from storefed.client.distributed_round import distributed_share, unit_losses
from storefed.privacy import skellam as sk
from storefed.privacy.dp_sgd import clipped_gradient_sum
from storefed.privacy.ledger import open_ledger
from storefed.server.run_setup import prepare_run


def _plan(dim: int = 40, sigma: float = 1.0, shares: int = 5, clip: float = 1.0) -> sk.SkellamPlan:
    return sk.SkellamPlan(dim, clip, sigma, sk.choose_gamma(dim, clip), shares)


def _clipped_sums(rng, merchants: int, dim: int, units: int, clip: float) -> list[np.ndarray]:
    sums = []
    for _ in range(merchants):
        g = rng.normal(size=(units, dim))
        g *= np.minimum(1.0, clip / np.linalg.norm(g, axis=1, keepdims=True))
        sums.append(g.sum(0))
    return sums


def test_the_integer_sum_is_the_clipped_sum_plus_noise_of_variance_sigma2_delta2():
    rng = np.random.default_rng(0)
    plan = _plan()
    sums = _clipped_sums(rng, 5, plan.dim, 7, plan.clip)
    signal = sum(np.rint(plan.gamma * s).astype(np.int64) for s in sums)
    draws = np.stack([sum(sk.encode(s, plan, rng) for s in sums) for _ in range(400)])
    assert draws.dtype == np.int64
    noise = (draws - signal).ravel()  # 16,000 noise values
    target = (plan.noise_multiplier * plan.delta2) ** 2
    assert abs(noise.mean()) < 4 * math.sqrt(target / noise.size)
    assert noise.var() == pytest.approx(target, rel=0.05)
    # decoded: within the noise of the real clipped sum, in model units
    decoded = sk.decode(draws[0], plan)
    assert np.abs(decoded - sum(sums)).max() < 6 * plan.noise_multiplier * plan.delta2 / plan.gamma
    # no wrap-around: every message stays within the bound Flower's SecAgg+ range is sized from
    bound = plan.bound(units=7)
    assert all(np.abs(sk.encode(s, plan, rng)).max() <= bound for s in sums)
    assert 5 * 2 * bound < 2**32


def test_one_share_alone_is_too_little_noise_but_the_tolerated_dropouts_keep_enough():
    rng = np.random.default_rng(1)
    plan = _plan(shares=4)  # 5 merchants send shares, the noise is sized for 4 survivors
    share = sk.skellam(plan.share_mu, (20000,), rng)
    assert share.var() == pytest.approx((plan.noise_multiplier * plan.delta2) ** 2 / 4, rel=0.05)
    survivors = sum(sk.skellam(plan.share_mu, (20000,), rng) for _ in range(4))  # one of five dropped
    assert survivors.var() >= 0.95 * (plan.noise_multiplier * plan.delta2) ** 2
    population = sk.epsilon([(plan, 0.05, 100)], 1e-5)
    alone = sk.epsilon([(sk.share_only(plan), 0.05, 100)], 1e-5)
    assert alone > 3 * population  # a coordinator that broke secure aggregation learns far more


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (0.8, 0.05, 200), (2.0, 0.2, 100), (1.2, 0.17, 120)])
def test_accountant_is_at_least_and_within_5_percent_of_opacus_gaussian(sigma, q, steps):
    """With the integer noise large (mu ~ 1e8), Skellam behaves like the Gaussian of the same std and
    sensitivity: its epsilon must be >= Opacus' subsampled-Gaussian epsilon (a Gaussian with the same
    variance is the limit) and within 5% of it."""
    plan = _plan(dim=60000, sigma=sigma)
    ours = sk.epsilon([(plan, q, steps)], 1e-5)
    orders = list(sk.ORDERS)
    gaussian, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                                    orders=orders), delta=1e-5)
    assert gaussian <= ours <= 1.05 * gaussian


@pytest.mark.parametrize("mu, shift", [(4.0, 1), (30.0, 2), (200.0, 3)])
def test_skellam_rdp_bound_dominates_the_exact_renyi_divergence(mu, shift):
    """Independent computation: the Renyi divergence between Sk(mu) and Sk(mu) + shift, summed over the pmf."""
    from scipy.special import logsumexp

    support = np.arange(-int(12 * math.sqrt(mu)) - 40, int(12 * math.sqrt(mu)) + 40)
    log_p = stats.skellam.logpmf(support, mu, mu)
    log_q = stats.skellam.logpmf(support - shift, mu, mu)
    keep = np.isfinite(log_p) & np.isfinite(log_q)
    for alpha in (2, 5, 20):
        exact = logsumexp(alpha * log_p[keep] + (1 - alpha) * log_q[keep]) / (alpha - 1)
        bound = sk.skellam_rdp(alpha, mu, shift, shift)
        assert exact <= bound * (1 + 1e-9)
        if mu >= 30:
            assert bound <= 1.25 * exact


def test_subsampled_rdp_is_opacus_exact_value_for_the_gaussian():
    for q, sigma, alpha in [(0.01, 1.0, 8), (0.2, 2.0, 4), (0.5, 0.9, 32)]:
        ours = sk.subsampled_rdp(alpha, q, lambda a: a / (2 * sigma**2))
        theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
        assert ours == pytest.approx(theirs, rel=1e-9)


def test_integers_survive_flower_secaggplus_arithmetic_exactly():
    """SecAgg+'s own quantize / factor / modulus / dequantize steps (masks cancel mod 2^32) return the
    exact integer sum when clipping_range = R and quantization_range = 2R, as the distributed mode sets them."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_mod
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(2)
    n, bound = 5, 2**26
    messages = [rng.integers(-bound, bound, size=3000) for _ in range(n)]
    qr = 2 * bound
    uploads = [factor_combine(qr, quantize([m.astype(np.float64)], bound, qr)) for m in messages]
    summed = [sum(u[j].astype(np.int64) for u in uploads) for j in range(2)]
    summed = parameters_mod(summed, 2**32)
    total_ratio, recon = factor_extract(summed)
    vector = dequantize(recon, bound, qr)[0] - (n - 1) * bound
    vector *= qr / total_ratio  # the workflow's 1 / (sum of ratios): the mean of the messages
    assert np.array_equal(np.rint(vector * n).astype(np.int64), np.sum(messages, axis=0))


class _Pooled(torch.nn.Module):
    """A history-pooled model (the recommender's shape): embedding rows averaged, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.items, self.out = torch.nn.Embedding(12, 5, padding_idx=0), torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.items(x).mean(dim=1))


@pytest.mark.parametrize("mode", ["auto", "book", "hooks"])
@pytest.mark.parametrize("shape", ["mlp", "pooled", "layernorm"])
def test_clipped_gradient_sum_is_per_unit_clipping(mode, shape):
    """Book-keeping (auto/book) and Opacus hooks give the same per-unit clipped sum as clipping each
    unit's own gradient; auto falls back to hooks for a LayerNorm, book refuses it by name."""
    torch.manual_seed(0)
    if shape == "pooled":
        model, x = _Pooled(), torch.randint(1, 12, (9, 4))  # no padding: Opacus hooks would give row 0 a gradient
    else:
        layers = [torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)]
        if shape == "layernorm":
            layers.insert(1, torch.nn.LayerNorm(4))
        model, x = torch.nn.Sequential(*layers), torch.randn(9, 6) * 5
    y = torch.randint(0, 3, (9,))
    clip = 0.5

    def loss_of(m):
        return torch.nn.functional.cross_entropy(m(x), y, reduction="sum")

    if shape == "layernorm" and mode == "book":
        with pytest.raises(ValueError, match="LayerNorm"):
            clipped_gradient_sum(model, loss_of, clip, mode)
        return
    ours = clipped_gradient_sum(model, loss_of, clip, mode)
    assert all(p.grad is None for p in model.parameters()), "no gradient is left on the model"
    assert all("forward" not in vars(m) for m in model.modules()), "book-keeping's recording forwards are undone"
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(9):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i: i + 1]), y[i: i + 1]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        expected = [e + factor * g for e, g in zip(expected, grads)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, expected))
    assert not hasattr(model, "_module") and all(not hasattr(p, "grad_sample") or p.grad_sample is None
                                                 for p in model.parameters())


def test_unit_losses_average_a_reviewers_reviews():
    logits = torch.zeros(2, 3, 2)
    targets = torch.tensor([[0, 1, -100], [1, -100, -100]])
    assert torch.allclose(unit_losses(logits, targets, None), torch.full((2,), math.log(2.0)))


def _distributed_settings(tmp_path, *extra):
    return base_settings("recommender", "task.epochs=1", f"run_dir={tmp_path / 'run'}", *extra,
                         mode="distributed", sample_rate=0.2, planned_rounds=4)


def test_a_merchants_share_records_the_population_epsilon_and_its_own_share_alone(tmp_path):
    settings = _distributed_settings(tmp_path)
    setup = prepare_run(settings, tmp_path / "run")
    assert setup.skellam is not None and setup.to_clients.privacy.mode == "distributed"
    assert setup.to_clients.privacy.noise_shares == settings.federation.stores_per_round
    state = dict(setup.shared)
    share = distributed_share(setup.to_clients, state, 1, {"partition-id": 0})
    assert share.message.dtype == np.int64 and share.message.size == setup.skellam.dim
    assert share.metrics["refused"] == 0 and share.metrics["steps"] == 1
    ledger_dir = setup.to_clients.privacy.ledger_dir
    (record,) = [p for p in (tmp_path / "run" / "ledgers").glob("*.ledger.json")]
    ledger = open_ledger(ledger_dir, record.name.split(".")[0], "recommender", "customer", 1e-5, "rdp", 8.0)
    (entry,) = ledger.rounds
    assert entry.mechanism == "skellam" and entry.epsilon_total == pytest.approx(
        sk.epsilon([(setup.skellam, 0.2, 1)], 1e-5))
    assert entry.epsilon_own_share_total > entry.epsilon_total
    assert "population level" in share.privacy["guarantee"] and "own share alone" in share.privacy["guarantee"]


def test_a_merchant_over_budget_sends_its_noise_share_only(tmp_path):
    settings = _distributed_settings(tmp_path)
    setup = prepare_run(settings, tmp_path / "run")
    poor = dataclasses.replace(setup.to_clients, privacy=dataclasses.replace(setup.to_clients.privacy, epsilon=1e-3))
    share = distributed_share(poor, dict(setup.shared), 1, {"partition-id": 0})
    assert share.metrics["refused"] == 1 and "privacy budget exhausted" in share.privacy["refusal"]
    plan = setup.skellam
    assert abs(share.message.mean()) < 5 * math.sqrt(2 * plan.share_mu / share.message.size)
    assert share.message.var() == pytest.approx(2 * plan.share_mu, rel=0.1)
    assert not list((tmp_path / "run" / "ledgers").glob("*.ledger.json")), "a refusal spends nothing"


def test_distributed_mode_is_refused_where_it_cannot_hold():
    from storefed.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.central='fixed' is not allowed: must be none"):
        base_settings("recommender", "privacy.central=fixed", mode="distributed")
    with pytest.raises(ConfigError, match="privacy.colluders=2 is not allowed: must be below privacy.min_survivors=2"):
        base_settings("recommender", colluders=2, mode="distributed")
    with pytest.raises(ConfigError, match="privacy.accountant='prv' is not allowed"):
        base_settings("recommender", accountant="prv", mode="distributed")


# --- through Flower's SecAgg+ (in-process grid, the real workflow and ClientApp) --------------------------
def _secure_distributed(tmp_path, stores: int, **privacy):
    return base_settings(
        "recommender", f"federation.num_stores={stores}", f"federation.stores_per_round={stores}",
        "federation.eval_stores_per_round=0", "federation.rounds=1", "task.epochs=1", f"run_dir={tmp_path / 'run'}",
        **({"mode": "distributed", "sample_rate": 0.3, "planned_rounds": 2} | privacy),
    )


@pytest.fixture
def integer_traffic(monkeypatch):
    """Each merchant's integer message, and the integer sum the coordinator decodes."""
    import storefed.client.secure_train as secure_train
    from storefed.server.distributed_dp import DistributedUpdate

    seen = {"messages": [], "sums": []}
    share_fn, step_fn = secure_train.distributed_share, DistributedUpdate.step

    def share(*args, **kwargs):
        out = share_fn(*args, **kwargs)
        seen["messages"].append(out.message.copy())
        return out

    def step(self, integer_sum, population):
        seen["sums"].append(np.asarray(integer_sum).copy())
        return step_fn(self, integer_sum, population)

    monkeypatch.setattr(secure_train, "distributed_share", share)
    monkeypatch.setattr(DistributedUpdate, "step", step)
    return seen


def test_secaggplus_delivers_the_exact_integer_sum(tmp_path, flower_identity, integer_traffic):
    from flwr.app import Context, RecordDict
    from test_secure_aggregation import InProcessGrid

    from storefed.server.secure_aggregation import run_secure_federation

    settings = _secure_distributed(tmp_path, stores=3)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    summary = run_secure_federation(InProcessGrid(3), context, settings, tmp_path / "run")
    (total,) = integer_traffic["sums"]
    assert len(integer_traffic["messages"]) == 3
    assert np.array_equal(total, np.sum(integer_traffic["messages"], axis=0))
    assert np.abs(total).max() > 1000, "real integers, not zeros"
    assert summary["rounds_completed"] == 1 and summary["privacy"]["epsilon_max"] > 0


@pytest.mark.parametrize("min_survivors, aggregated", [(3, False), (2, True)])
def test_a_dropout_is_tolerated_only_when_the_noise_was_sized_for_it(tmp_path, flower_identity, integer_traffic,
                                                                      min_survivors, aggregated):
    from flwr.app import Context, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import Stage
    from test_secure_aggregation import InProcessGrid

    from storefed.server.run_setup import RunFailed
    from storefed.server.secure_aggregation import run_secure_federation

    settings = _secure_distributed(tmp_path, stores=3, min_survivors=min_survivors)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    grid = InProcessGrid(3, drop={0: Stage.COLLECT_MASKED_VECTORS})
    if aggregated:
        run_secure_federation(grid, context, settings, tmp_path / "run")
        assert len(integer_traffic["sums"]) == 1  # two shares sized for two survivors: the full noise
    else:
        with pytest.raises(RunFailed, match="only 2 of the 3 noise shares the round needs arrived"):
            run_secure_federation(grid, context, settings, tmp_path / "run")
        assert integer_traffic["sums"] == [], "an under-noised sum is never unmasked"


@pytest.mark.parametrize("unit", ["review", "user"])
def test_the_review_model_shares_too(tmp_path, unit):
    settings = base_settings("review", "task.epochs=1", f"run_dir={tmp_path / 'run'}", "task.max_length=16",
                             mode="distributed", sample_rate=0.3, planned_rounds=3, unit=unit,
                             **({"person_epsilon": "null", "epsilon": 8} if unit == "review" else {}))
    setup = prepare_run(settings, tmp_path / "run")
    share = distributed_share(setup.to_clients, dict(setup.shared), 1, {"partition-id": 1})
    assert share.metrics["refused"] == 0 and share.message.size == setup.skellam.dim
    expected_unit = "reviewer" if unit == "user" else "review"
    assert f"per {expected_unit} at the population level" in share.privacy["guarantee"]
    assert np.abs(share.message).max() > 0


def test_popularity_prior_release_is_composed_in_the_ledger_and_tracks_true_popularity(tmp_path):
    """One-shot DP statistic through the same path: each customer's distinct items at norm 1, q = 1."""
    from storefed.client.distributed_round import prior_share
    from storefed.data.sources import load_simulated

    settings = _distributed_settings(tmp_path, "task.popularity_prior=true", "data.generator.mean_customers=300")
    setup = prepare_run(settings, tmp_path / "run")
    assert setup.prior is not None and setup.prior.dim == setup.catalog.num_items
    shares = [prior_share(setup.to_clients, 0, {"partition-id": p}) for p in range(4)]
    released = sk.decode(np.sum([s.message for s in shares], axis=0), setup.prior)
    truth = sum(setup.task.prior_vectors(load_simulated(settings.data, settings.seed, p)[1]).sum(0) for p in range(4))
    assert np.all(np.linalg.norm(setup.task.prior_vectors(load_simulated(settings.data, settings.seed, 0)[1]), axis=1)
                  == pytest.approx(1.0))
    assert np.corrcoef(released, truth)[0, 1] > 0.8
    state = setup.task.apply_prior(dict(setup.shared), released)
    assert torch.equal(state["output.bias"], torch.from_numpy(np.log1p(np.clip(released, 0, None))).float())
    # the release and then a training round, composed in one ledger at the population level
    distributed_share(setup.to_clients, state, 1, {"partition-id": 0})
    (path,) = (tmp_path / "run" / "ledgers").glob("store-00000*.ledger.json")
    ledger = open_ledger(path.parent, path.name.split(".")[0], "recommender", "customer", 1e-5, "rdp", 8.0)
    assert [r.sample_rate for r in ledger.rounds] == [1.0, 0.2]
    assert ledger.epsilon_spent == pytest.approx(sk.epsilon([(setup.prior, 1.0, 1), (setup.skellam, 0.2, 1)], 1e-5))
    # the training noise was planned for what is left after the release
    assert sk.epsilon([(setup.prior, 1.0, 1), (setup.skellam, 0.2, 4)], 1e-5) <= 8.0


def test_popularity_prior_needs_the_distributed_mode():
    from storefed.config import ConfigError

    with pytest.raises(ConfigError, match="task.popularity_prior=True is not allowed: needs privacy.mode=distributed"):
        base_settings("recommender", "task.popularity_prior=true")


def test_popularity_prior_goes_through_secaggplus_in_round_one(tmp_path, flower_identity, integer_traffic):
    from flwr.app import Context, RecordDict
    from test_secure_aggregation import InProcessGrid

    from storefed.models.saved_model import load_global_model
    from storefed.server.secure_aggregation import run_secure_federation

    settings = _secure_distributed(tmp_path, stores=3)
    settings = dataclasses.replace(settings, task=dataclasses.replace(settings.task, popularity_prior=True),
                                   federation=dataclasses.replace(settings.federation, rounds=2))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    summary = run_secure_federation(InProcessGrid(3), context, settings, tmp_path / "run")
    assert summary["rounds_completed"] == 2 and len(integer_traffic["sums"]) == 1  # round 1 released the prior
    weights, _ = load_global_model(tmp_path / "run")
    assert float(weights["output.bias"].max()) > 1.0, "the bias carries log(1 + released popularity)"
    ledgers = list((tmp_path / "run" / "ledgers").glob("*.ledger.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        rounds = json.loads(path.read_text())["rounds"]
        assert [r["sample_rate"] for r in rounds] == [1.0, 0.3] and all(r["mechanism"] == "skellam" for r in rounds)
