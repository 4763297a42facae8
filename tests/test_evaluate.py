"""`storefed evaluate` at toy size: files, rows, shared splits, DP bookkeeping, statistics, refusals."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from storefed.cli import main
from storefed.simulations.evaluation.methods import pooled
from storefed.simulations.evaluation.report import summarize, targets

NUM_CUSTOMERS = 24
POSITIVE = ["great", "love", "excellent", "perfect", "awesome"]
NEGATIVE = ["broken", "terrible", "awful", "refund", "junk"]
TINY = ["evaluate.rounds=2", "task.epochs=1", "evaluate.epsilons=[1,8]"]
TINY_RECOMMENDER = [*TINY, "task.embedding_dim=8", "task.batch_size=8"]
TINY_REVIEW = [*TINY, "task.hidden_size=8", "task.intermediate_size=16", "task.batch_size=32", "task.max_length=8",
               "task.vocab_size=256"]


def _amazon_rows() -> list[dict]:
    """24 customers, 5-7 reviews each over 30 items in 3 categories; text reveals the rating."""
    rng = np.random.default_rng(7)
    rows = []
    for u in range(NUM_CUSTOMERS):
        for j in range(5 + u % 3):
            item = int(rng.integers(30))
            rating = int(rng.choice([1, 2, 4, 5, 5, 5]))
            words = rng.choice(POSITIVE if rating >= 4 else NEGATIVE, 3)
            rows.append({
                "reviewerID": f"C{u:03d}", "asin": f"I{item:03d}", "overall": float(rating),
                "reviewText": " ".join(["the", "guitar", *words]), "unixReviewTime": 1_400_000_000 + 1000 * u + j,
                "categories": [[f"Cat{item % 3}"]],
            })
    return rows


def _customers_with_test_case(rows: list[dict]) -> int:
    """Customers with >= 3 interactions: the recommender's leave-last-out test customers."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["reviewerID"]] = counts.get(r["reviewerID"], 0) + 1
    return sum(c >= 3 for c in counts.values())


@pytest.fixture(scope="module")
def amazon_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("amazon") / "reviews_tiny.json.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _amazon_rows()).encode()))
    return path


@pytest.fixture(scope="module")
def movielens_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    lines = []
    for user in range(1, 21):
        for j, item in enumerate(rng.choice(np.arange(1, 41), size=3 + user % 4, replace=False)):
            lines.append(f"{user}\t{item}\t{int(rng.integers(1, 6))}\t{880_000_000 + 100 * user + j}")
    path = tmp_path_factory.mktemp("ml") / "u.data"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def recommender_run(amazon_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rec") / "run"
    code = main(["evaluate", 
        "task=recommender", "data=amazon", f"data.path={amazon_file}", "evaluate.num_merchants=[3]",
        "evaluate.partitions=[iid,dirichlet]", "evaluate.seeds=[0,1]", *TINY_RECOMMENDER, f"run_dir={run_dir}",
    ])
    assert code == 0
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_recommender_run_writes_table_csv_json_and_plot(recommender_run):
    run_dir, results = recommender_run
    png = (run_dir / "privacy_utility.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (run_dir / "results.md").read_text()
    for label in ("popularity (all data", "local popularity", "centralized, non-private", "centralized DP",
                  "local-only", "federated, non-private", "federated DP", "| hr@10 | ndcg@10 |", "sampled100_hr@10",
                  "K = 3 merchants, iid partition", "K = 3 merchants, dirichlet partition"):
        assert label in table, label
    with open(run_dir / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(results["rows"])
    assert {"hr@10", "ndcg@10", "sampled100_hr@10", "epsilon", "delta", "unit", "seed"} <= set(csv_rows[0])


def test_every_cell_has_every_method_on_the_same_test_customers(recommender_run, amazon_file):
    _, results = recommender_run
    rows = results["rows"]
    expected = {
        ("popularity", None), ("local_popularity", None), ("centralized", None), ("local", None),
        ("federated", None), ("centralized_dp", 1.0), ("centralized_dp", 8.0), ("federated_dp", 1.0),
        ("federated_dp", 8.0), ("federated_dp_distributed", 1.0), ("federated_dp_distributed", 8.0),
    }
    test_customers = _customers_with_test_case(_amazon_rows())
    for partition in ("iid", "dirichlet"):
        for seed in (0, 1):
            cell = [r for r in rows if r["partition"] == partition and r["seed"] == seed]
            assert {(r["method"], r["epsilon"]) for r in cell} == expected
            # every method is scored on the same customers: the whole data set's leave-last-out cases
            assert {r["metrics"]["num-examples"] for r in cell} == {test_customers}
            assert {r["metrics"]["merchants"] for r in cell} == {3}
    for r in rows:
        for key in ("hr@10", "ndcg@10", "sampled100_hr@10", "sampled100_ndcg@10"):
            assert 0.0 <= r["metrics"][key] <= 1.0
        assert r["metrics"]["ndcg@10"] <= r["metrics"]["hr@10"] + 1e-12
        assert not any(k.startswith("local_pop") for k in r["metrics"])


def test_dp_rows_state_their_guarantee_and_stay_within_budget(recommender_run):
    run_dir, results = recommender_run
    for r in results["rows"]:
        if r["method"] == "federated_dp_distributed":
            assert r["private"] and r["unit"] == "customer" and r["delta"] == 1e-5
            assert r["accountant"] == "skellam-rdp (population-level)"
            assert 0 < r["epsilon_spent"] <= r["epsilon"] * (1 + 1e-9)
            assert r["details"]["rounds"] >= 2 and r["details"]["trained_updates"] == 3 * r["details"]["rounds"]
        elif r["method"].endswith("_dp"):
            assert r["private"] and r["unit"] == "customer" and r["delta"] == 1e-5 and r["accountant"] == "rdp"
            assert 0 < r["epsilon_spent"] <= r["epsilon"] * (1 + 1e-9)
        else:
            assert not r["private"] and r["epsilon"] is None and r["delta"] is None
    fed = [r for r in results["rows"] if r["method"] == "federated_dp"]
    assert all(r["details"]["trained_updates"] == 3 * 2 and r["details"]["refused"] == 0 for r in fed)
    # the federated epsilon is the merchants' own ledgers: one per merchant, one entry per round taken
    ledgers = list((run_dir / "K3-iid-seed0" / "federated_dp-eps8").glob("ledgers/*.ledger.json"))
    assert len(ledgers) == 3
    assert all(len(json.loads(p.read_text())["rounds"]) == 2 for p in ledgers)
    assert "per customer" in (run_dir / "results.md").read_text()
    assert "### Targets (means over seeds; federated DP at epsilon = 8)" in (run_dir / "results.md").read_text()


def test_summary_is_mean_and_sample_std_of_the_per_seed_rows(recommender_run):
    _, results = recommender_run
    for s in results["summary"]:
        members = [r for r in results["rows"] if all(r[k] == s[k] for k in ("num_merchants", "partition", "method", "epsilon"))]
        assert sorted(r["seed"] for r in members) == [0, 1]
        for metric, stats in s["stats"].items():
            values = [r["metrics"][metric] for r in members]
            assert stats["mean"] == pytest.approx(np.mean(values))
            assert stats["std"] == pytest.approx(np.std(values, ddof=1))


def test_pooled_metrics_and_summary_statistics_by_hand():
    out = pooled([{"hr@10": 0.5, "num-examples": 10}, {"hr@10": 0.2, "num-examples": 30}, {"hr@10": 0.9, "num-examples": 0}])
    assert out == {"hr@10": pytest.approx((0.5 * 10 + 0.2 * 30) / 40), "num-examples": 40, "merchants": 2}
    base = {"num_merchants": 10, "partition": "iid", "method": "federated_dp", "epsilon": 8.0, "delta": 1e-5,
            "unit": "customer", "accountant": "rdp", "private": True}
    rows = [dict(base, seed=s, epsilon_spent=e, metrics={"hr@10": v, "num-examples": 5})
            for s, v, e in ((0, 0.1, 7.9), (1, 0.2, 7.95), (2, 0.6, 7.8))]
    (summary,) = summarize(rows)
    assert summary["stats"]["hr@10"]["mean"] == pytest.approx(0.3)
    assert summary["stats"]["hr@10"]["std"] == pytest.approx(np.sqrt(((0.2) ** 2 + 0.1**2 + 0.3**2) / 2))
    assert summary["epsilon_spent_max"] == 7.95 and summary["seeds"] == [0, 1, 2]


def _summary_row(method: str, value: float, epsilon=None, metric: str = "hr@10") -> dict:
    return {"num_merchants": 10, "partition": "iid", "method": method, "epsilon": epsilon,
            "stats": {metric: {"mean": value, "std": 0.0, "values": [value]}}}


def test_targets_are_checked_on_the_means():
    rows = [_summary_row("centralized", 0.10), _summary_row("local", 0.05), _summary_row("popularity", 0.08),
            _summary_row("federated_dp", 0.02, 1.0), _summary_row("federated_dp", 0.095, 8.0)]
    text = targets("recommender", rows)
    assert "epsilon = 8" in text and "95% of centralized" in text and "target >= 90%: met" in text
    assert "vs local-only 0.0500: beats" in text and "vs popularity 0.0800: beats" in text
    rows[-1] = _summary_row("federated_dp", 0.07, 8.0)
    assert "70% of centralized" in targets("recommender", rows) and "MISSED" in targets("recommender", rows)
    assert "does NOT beat" in targets("recommender", rows)
    review = [_summary_row("centralized", 0.80, metric="macro_f1"), _summary_row("federated_dp", 0.49, 8.0, "macro_f1")]
    assert "31.0 points below (target within 5 points: MISSED)" in targets("review", review)


def test_movielens_udata_through_the_importer(movielens_file, tmp_path):
    run_dir = tmp_path / "ml"
    code = main(["evaluate", 
        "data=movielens", f"data.path={movielens_file}", "evaluate.num_merchants=[2]", "evaluate.partitions=[iid]",
        "evaluate.seeds=[0]", "evaluate.methods=[popularity,local,federated_dp]", *TINY_RECOMMENDER, f"run_dir={run_dir}",
    ])
    assert code == 0
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [(r["method"], r["epsilon"]) for r in rows] == [
        ("popularity", None), ("local_popularity", None), ("local", None), ("federated_dp", 1.0), ("federated_dp", 8.0),
    ]
    assert {r["metrics"]["num-examples"] for r in rows} == {20}  # every user has >= 3 ratings
    assert all(r["data"] == "movielens" for r in rows)


def test_review_run_reports_accuracy_and_macro_f1_per_review(amazon_file, tmp_path):
    run_dir = tmp_path / "review"
    code = main(["evaluate", 
        "task=review", f"data.path={amazon_file}", "evaluate.num_merchants=[2]", "evaluate.partitions=[iid]",
        "evaluate.seeds=[0]", "evaluate.methods=[majority,tfidf_logreg,centralized_dp,federated_dp]", *TINY_REVIEW, "privacy.unit=review",
        f"run_dir={run_dir}",
    ])
    assert code == 0
    rows = {(r["method"], r["epsilon"]): r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    assert set(rows) == {("majority", None), ("local_majority", None), ("tfidf_logreg", None), ("centralized_dp", 1.0),
                         ("centralized_dp", 8.0), ("federated_dp", 1.0), ("federated_dp", 8.0)}
    assert len({r["metrics"]["num-examples"] for r in rows.values()}) == 1  # one held-out set of reviews
    for r in rows.values():
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and 0.0 <= r["metrics"]["macro_f1"] <= 1.0
        assert r["unit"] == "review"
    # the synthetic text gives the rating away: the TF-IDF baseline must beat the majority class
    assert rows[("tfidf_logreg", None)]["metrics"]["macro_f1"] > rows[("majority", None)]["metrics"]["macro_f1"] + 0.2
    assert "| macro_f1 | accuracy |" in (run_dir / "results.md").read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.path=/nonexistent/reviews.json.gz"], "data.path='/nonexistent/reviews.json.gz' is not allowed: no such file"),
        (["evaluate.methods=[popularity,magic]"], "unknown method(s) ['magic'] for task=recommender"),
        (["evaluate.num_merchants=[3,500]"], f"has only {NUM_CUSTOMERS} customers"),
        (["evaluate.epsilons=[0,8]"], "evaluate.epsilons=0.0 is not allowed: must be a finite number > 0"),
        (["evaluate.epsilons=[-1]"], "evaluate.epsilons=-1.0 is not allowed: must be a finite number > 0"),
        (["evaluate.epsilons=[high]"], "evaluate.epsilons=[high]"),
        (["strategy=fedadam"], "strategy='fedadam' is not supported"),
        (["evaluate.partitions=[skewed]"], "evaluate.partitions='skewed' is not allowed: choose one of ['iid', 'dirichlet']"),
        (["evaluate.seeds=[]"], "evaluate.seeds=[] is not allowed: must list at least one value"),
    ],
)
def test_bad_inputs_are_refused_with_one_clear_line(overrides, message, amazon_file, tmp_path, capsys):
    code = main(["evaluate", f"data.path={amazon_file}", f"run_dir={tmp_path / 'never'}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("storefed evaluate: ") and message in err and "\n" not in err
    assert not (tmp_path / "never").exists()


def test_deployment_data_and_unknown_keys_are_refused(tmp_path, capsys):
    assert main(["evaluate", "data=files", f"run_dir={tmp_path / 'x'}"]) == 2
    assert "needs data=amazon, data=movielens or data=virtual" in capsys.readouterr().err
    assert main(["evaluate", "evaluate.bogus=1", f"run_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("storefed evaluate: ") and "evaluate.bogus" in err and "\n" not in err


def test_review_task_on_movielens_is_refused(movielens_file, tmp_path, capsys):
    code = main(["evaluate", "task=review", "data=movielens", f"data.path={movielens_file}", f"run_dir={tmp_path / 'x'}"])
    assert code == 2
    assert "MovieLens u.data has no review text: use task=recommender" in capsys.readouterr().err


def test_non_empty_run_dir_is_refused(amazon_file, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    code = main(["evaluate", f"data.path={amazon_file}", "evaluate.num_merchants=[3]", f"run_dir={tmp_path / 'old'}"])
    assert code == 2 and "is not empty" in capsys.readouterr().err


def test_search_scores_trials_on_validation_reviews_only(amazon_file, tmp_path):
    """The search forces task.holdout=validation: its held-out reviews are carved from the training
    reviews, so their count differs from the test split's, and the best trial is named per row."""
    from storefed.simulations.evaluation.search import main as search_main

    base = ["task=review", f"data.path={amazon_file}", "evaluate.num_merchants=[2]", "evaluate.partitions=[iid]",
            "evaluate.seeds=[0]", "evaluate.methods=[centralized_dp]", "evaluate.epsilons=[8]", *TINY_REVIEW]
    code = search_main([*base, f"run_dir={tmp_path / 's'}", "--trial", "task.lr=0.01", "--trial", "task.lr=0.1"])
    assert code == 0
    result = json.loads((tmp_path / "s" / "search.json").read_text())
    rows = [r for r in result["rows"] if r["method"] == "centralized_dp" and r["epsilon"] == 8.0]
    assert [r["overrides"] for r in rows] == ["task.lr=0.01", "task.lr=0.1"]
    best = result["best"]["centralized_dp K=2 iid eps=8.0"]
    assert best["score"] == max(r["stats"]["macro_f1"]["mean"] for r in rows)
    validation = {r["evaluated"][0] for r in result["rows"]}
    assert main(["evaluate", *base, f"run_dir={tmp_path / 'test'}"]) == 0
    test_rows = json.loads((tmp_path / "test" / "results.json").read_text())["rows"]
    assert validation != {test_rows[0]["metrics"]["num-examples"]}  # a different, held-in part of the data
    assert "the test split is not used" in (tmp_path / "s" / "search.md").read_text()
    assert search_main([*base, "--trial", "task.lr=0.1"]) == 2  # no run_dir


def test_item_item_grid_has_its_methods_exact_rows_agree_and_dp_rows_state_the_release(amazon_file, tmp_path):
    run_dir = tmp_path / "ii"
    code = main(["evaluate", "task=recommender", "task.model=item_item", "data=amazon", f"data.path={amazon_file}",
                 "evaluate.num_merchants=[3]", "evaluate.partitions=[iid]", "evaluate.seeds=[0]",
                 "evaluate.epsilons=[8]", f"run_dir={run_dir}"])
    assert code == 0
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"popularity", "local_popularity", "centralized", "local", "federated",
                              "federated_dp_distributed"}
    assert by_method["federated"]["metrics"]["hr@10"] == pytest.approx(by_method["centralized"]["metrics"]["hr@10"])
    dp = by_method["federated_dp_distributed"]
    assert dp["epsilon"] == 8 and 0 < dp["epsilon_spent"] <= 8 and dp["details"]["rounds"] == 2
    header = (run_dir / "results.md").read_text()
    assert "two one-shot releases" in header and "no sampling, q = 1" in header and "Skellam RDP" in header


def test_virtual_platform_grid_reports_customers_and_plots_the_dp_ratio(tmp_path, capsys):
    from storefed.simulations.evaluation.plot import main as plot_main

    world = ["data.generator.num_items=60", "data.generator.mean_customers=30", "data.generator.max_customers=60"]
    run_dir = tmp_path / "virtual"
    code = main(["evaluate", "task=recommender", "task.model=item_item", "data=virtual", *world,
                 "evaluate.num_merchants=[2,6]", "evaluate.seeds=[0]", "evaluate.epsilons=[8]",
                 "evaluate.methods=[popularity,federated,federated_dp_distributed]", f"run_dir={run_dir}"])
    assert code == 0
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    customers = {r["num_merchants"]: r["customers"] for r in rows}
    assert {r["partition"] for r in rows} == {"generated"} and customers[6] > customers[2] > 0
    assert (run_dir / "dp_ratio_by_customers.png").stat().st_size > 10_000
    capsys.readouterr()
    assert plot_main([str(tmp_path / "ratio.png"), str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"{customers[2]:,} customers: hr@10 ratio" in printed and (tmp_path / "ratio.png").is_file()
    assert plot_main([str(tmp_path / "r.png"), str(tmp_path / "missing")]) == 2


def test_evaluate_writes_its_report_with_the_results_and_the_plot(recommender_run):
    run_dir, _ = recommender_run
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# StoreFed evaluation report: recommender")
    assert "K = 3 merchants, dirichlet partition" in report and "(plots/privacy_utility.png)" in report
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 and "<table>" in page
