"""Strategy assembly, metric aggregation, FedProx's proximal step, and imported-data sources."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from conftest import task_from_dict
from storefed.client.local_training import LocalTrainingConfig, train_local
from storefed.config.schema import FedAdamConfig, FedAvgConfig, FederationConfig, FedProxConfig, ImportedDataConfig
from storefed.data.sources import coordinator_catalog, load_simulated
from storefed.server.strategy import aggregate_train_metrics, build_strategy

FEDERATION = FederationConfig(num_stores=10, stores_per_round=4, eval_stores_per_round=5)


@pytest.mark.parametrize(
    "cfg, cls", [(FedAvgConfig(), FedAvg), (FedAdamConfig(eta=0.01), FedAdam), (FedProxConfig(proximal_mu=0.1), FedProx)]
)
def test_strategies_are_flowers_own_with_configured_sampling(cfg, cls):
    strategy = build_strategy(cfg, FEDERATION, {}, lambda *_: None).inner
    assert isinstance(strategy, cls)
    assert strategy.min_train_nodes == 4 and strategy.fraction_train == pytest.approx(0.4)
    assert strategy.min_evaluate_nodes == 5 and strategy.min_available_nodes == 10


def test_bad_sampling_is_refused():
    with pytest.raises(ValueError, match="stores_per_round=11"):
        build_strategy(FedAvgConfig(), dataclasses.replace(FEDERATION, stores_per_round=11), {}, lambda *_: None)


def test_train_metrics_sum_counts_and_report_the_weakest_epsilon():
    records = [
        RecordDict({"metrics": MetricRecord({"num-examples": 10, "train_loss": 1.0, "epsilon_total": 2.0, "steps": 3})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 30, "train_loss": 3.0, "epsilon_total": 5.0, "steps": 4})}),
    ]
    out = aggregate_train_metrics(records, "num-examples")
    assert out["num-examples"] == 40 and out["steps"] == 7
    assert out["train_loss"] == pytest.approx(2.5)
    assert out["epsilon_total"] == 5.0


def test_fedprox_proximal_step_keeps_weights_closer_to_the_global_model():
    from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store

    gen = StoreGeneratorConfig(num_items=100, mean_customers=40)
    task = task_from_dict({"name": "recommender", "embedding_dim": 8}, generate_catalog(gen))
    dataset = task.train_dataset(generate_store(gen, 1))
    distances = []
    for mu in (0.0, 5.0):
        model = task.build_model()
        start = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(0)
        train_local(task, model, dataset, LocalTrainingConfig(epochs=3, batch_size=16, lr=0.05, proximal_mu=mu), None,
                    torch.device("cpu"))
        distances.append(sum(float((p - s).norm()) for p, s in zip(model.parameters(), start)))
    assert distances[1] < 0.9 * distances[0]


def test_amazon_file_feeds_the_simulation_data_source(tmp_path):
    path = tmp_path / "reviews.json.gz"
    rows = [
        {"reviewerID": f"U{u}", "asin": f"A{(u + k) % 7}", "overall": float(1 + (u + k) % 5),
         "reviewText": "great" if (u + k) % 5 >= 3 else "broken", "unixReviewTime": 1_400_000_000 + k}
        for u in range(12) for k in range(4)
    ]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows))
    data_cfg = ImportedDataConfig(source="amazon", path=str(path), num_merchants=3, partition="iid")
    catalog = coordinator_catalog(data_cfg, 0)
    assert catalog.num_items == 7
    merchants = [load_simulated(data_cfg, 0, p)[1] for p in range(3)]
    assert sum(m.num_users for m in merchants) == 12
    assert sum(len(m.interactions) for m in merchants) == len(rows)
    with pytest.raises(ValueError, match="partition-id 3 is out of range: data has 3 merchants"):
        load_simulated(data_cfg, 0, 3)


def test_storefed_import_writes_loadable_merchant_directories(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from storefed.data.merchant_files import load_catalog, load_merchant_dir

    source = tmp_path / "u.data"
    source.write_text("".join(f"{u}\t{(u * 3 + k) % 11 + 1}\t{1 + k % 5}\t{880000000 + k}\n" for u in range(1, 9) for k in range(5)))
    out = tmp_path / "merchants"
    cmd = [sys.executable, "-m", "storefed", "import", "data=movielens", f"data.path={source}",
           "data.num_merchants=2", f"out_dir={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    catalog = load_catalog(out / "catalog.csv")
    loaded = [load_merchant_dir(out / f"merchant-00{k}", catalog) for k in range(2)]
    assert sum(m.num_users for m in loaded) == 8 and sum(len(m.interactions) for m in loaded) == 40
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "is not empty" in again.stderr
