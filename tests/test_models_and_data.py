"""Unit behaviour of the pieces a round is built from: metrics, tokenizer, generator, screening."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from conftest import ROOT
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.models.hashing_tokenizer import HashingTokenizer
from storefed.models.recommender import CustomerDataset, rank_of_targets, ranking_metrics, split_leave_last_out
from storefed.models.review import classification_metrics, review_labels
from storefed.server.screening import screen_train_replies


def test_ranking_metrics_numbers():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    ranks = rank_of_targets(scores, torch.tensor([2, 0]))
    assert ranks.tolist() == [1, 1]
    m = ranking_metrics(torch.tensor([0, 1, 12]), k=10)
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(3)) / 3)


def test_leave_last_out_split_and_one_example_per_customer():
    histories = [np.array([5, 6, 7, 8]), np.array([1, 2]), np.array([3])]
    train, test = split_leave_last_out(histories)
    assert [h.tolist() for h in train] == [[5, 6, 7], [1, 2]]
    assert [(h.tolist(), t) for h, t in test] == [([5, 6, 7], 8)]
    dataset = CustomerDataset(train, max_history=4)
    assert len(dataset) == 2  # one DP sample per customer
    history, target = dataset[0]
    assert history.shape == (4,) and int(target) in (6, 7)
    assert int(history[0]) == 0  # left padding


def test_classification_metrics_and_labels():
    assert review_labels(np.array([1, 2, 3, 4, 5]), "polarity").tolist() == [0, 0, -1, 1, 1]
    assert review_labels(np.array([1, 3, 5]), "three_class").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="task.labels='stars' is unknown"):
        review_labels(np.array([1]), "stars")
    m = classification_metrics(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 0]), 2)
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((0 + 2 * 3 / 7) / 2)


def test_hashing_tokenizer_ids_are_stable_across_processes():
    tok = HashingTokenizer(vocab_size=1000, max_length=8)
    ids = tok.encode("Great guitar, would buy again")
    code = "from models.hashing_tokenizer import HashingTokenizer as H; print(H(1000, 8).encode('Great guitar, would buy again'))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT)), check=True)
        assert out.stdout.strip() == str(ids)
    batch = tok(["a b", "x " * 20])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_virtual_stores_are_deterministic_heterogeneous_and_generated_alone():
    cfg = StoreGeneratorConfig(seed=3, num_items=300, mean_customers=40)
    a, b = generate_store(cfg, 7), generate_store(cfg, 7)
    assert a.num_users == b.num_users and np.array_equal(a.interactions.item, b.interactions.item)
    assert a.reviews.text == b.reviews.text
    far = generate_store(cfg, 9_999)  # no need to generate the 9,999 before it
    assert far.merchant_id == "store-09999" and len(far.interactions) > 0
    sizes = [generate_store(cfg, s).num_users for s in range(30)]
    assert max(sizes) > 2 * min(sizes)  # log-normal store sizes
    assert generate_catalog(cfg).num_items == 300
    ratings = np.concatenate([generate_store(cfg, s).reviews.rating for s in range(10)])
    assert 0.5 < np.mean(ratings >= 4) < 0.9 and np.mean(ratings <= 2) > 0.1


def _reply(node: int, arrays: dict, examples: int = 10, refused: int = 0):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    request = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "refused": refused})})
    if arrays:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content=content, reply_to=request)


def test_screening_rejects_wrong_names_shapes_and_non_finite_updates():
    expected = {"w": (2, 3), "b": (3,)}
    good = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    replies = [
        _reply(1, good),
        _reply(2, {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}),
        _reply(3, {"w": np.zeros((2, 3), np.float32)}),
        _reply(4, {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}),
        _reply(5, good, examples=0),
        _reply(6, {}, examples=0, refused=1),
        _reply(7, good, examples=float("nan")),
        _reply(8, good, examples=float("inf")),
        _reply(9, good, examples=1e12),
        _reply(10, good, examples=12.5),
        _reply(11, {"w": np.zeros((2, 3), np.int64), "b": np.zeros(3, np.float32)}),
        _reply(12, {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}),
        _reply(13, {"w": np.zeros((2, 3), bool), "b": np.zeros(3, np.float32)}),
    ]
    out = screen_train_replies(replies, expected)
    assert [m.metadata.src_node_id for m in out.accepted] == [1]
    assert out.rejected == {
        2: "tensor w has shape (3, 2), expected (2, 3)",
        3: "tensor names differ from the global model (missing ['b'], unexpected [])",
        4: "tensor w has non-finite values",
        5: "num-examples=0 must lie in 1..1e+08",
        7: "num-examples=nan must be a whole number",
        8: "num-examples=inf must be a whole number",
        9: "num-examples=1e+12 must lie in 1..1e+08",
        10: "num-examples=12.5 must be a whole number",
        11: "tensor w has dtype int64, expected float32 (the global model's)",
        12: "tensor w has dtype float64, expected float32 (the global model's)",
        13: "tensor w has dtype bool, expected float32 (the global model's)",
    }
    assert list(out.refused) == [6]


def _poisoned_round(strategy_cfg, max_update_norm=None):
    """4 honest merchants move the global model by ~0.01; merchant 5 sends a 1e6-scaled update."""
    import dataclasses

    from storefed.config.schema import FederationConfig
    from storefed.server.strategy import build_strategy

    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(4, 5)).astype(np.float32)}
    honest = [{"w": start["w"] + rng.normal(scale=0.01, size=(4, 5)).astype(np.float32)} for _ in range(4)]
    attack = {"w": start["w"] + 1e6 * (honest[0]["w"] - start["w"])}
    federation = dataclasses.replace(FederationConfig(num_stores=5, stores_per_round=5), max_update_norm=max_update_norm)
    seen = []
    strategy = build_strategy(strategy_cfg, federation, {"w": (4, 5)}, lambda r, s: seen.append(s))
    strategy._current = ArrayRecord({"w": Array(start["w"])})  # the model this round started from
    arrays, _ = strategy.aggregate_train(1, [_reply(n + 1, a) for n, a in enumerate(honest + [attack])])
    honest_mean = np.mean([h["w"] for h in honest], axis=0)
    spread = max(np.linalg.norm(h["w"] - honest_mean) for h in honest)
    return np.linalg.norm(arrays["w"].numpy() - honest_mean), spread, seen[0]


def test_one_poisoned_update_takes_over_fedavg_but_not_a_robust_strategy_or_a_norm_bound():
    from storefed.config.schema import FedAvgConfig, FedMedianConfig, FedTrimmedAvgConfig

    distance, spread, _ = _poisoned_round(FedAvgConfig())
    assert distance > 1000, "plain FedAvg follows the attacker"
    for cfg in (FedMedianConfig(), FedTrimmedAvgConfig(beta=0.2)):
        distance, spread, screening = _poisoned_round(cfg)
        assert distance <= spread, f"{cfg.name}: within the honest updates' own spread of their mean"
        assert len(screening.accepted) == 5
    distance, _, screening = _poisoned_round(FedAvgConfig(), max_update_norm=1.0)
    assert distance < 1e-6, "the bound rejects the attacker and FedAvg averages the honest four exactly"
    assert list(screening.rejected) == [5] and "exceeds federation.max_update_norm=1" in screening.rejected[5]
