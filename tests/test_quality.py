"""Utility under DP on generated stores with a planted signal (real simulations, real Opacus)."""

from __future__ import annotations

import torch

from storefed.config import compose
from storefed.data.sources import coordinator_catalog, load_simulated
from storefed.models.recommender import (
    customer_histories,
    evaluate_scores,
    pad_history,
    popularity_scorer,
    split_leave_last_out,
)
from storefed.models.saved_model import load_global_model
from storefed.models.task import build_task
from storefed.simulations.runner import simulate


def _run(tmp_path, overrides: list[str]) -> tuple[object, dict]:
    settings = compose("simulate", overrides + [f"run_dir={tmp_path / 'run'}"])
    summary = simulate(settings)
    return settings, summary


def test_federated_dp_recommender_beats_popularity_on_full_ranking(tmp_path):
    """Every store takes part in every round, so the final model averages 20 merchants' noisy updates:
    with 10 of 20 per round the last round's model varied from 0.056 to 0.13 HR@10 across runs (DP noise
    comes from OS entropy) and fell below the bar once in seven runs here; with all 20 it gave 0.126-0.134.
    With the catalog's categories (task.catalog_features, default since issue 11) it gave 0.393 against
    popularity's 0.063, so the bar is 3x popularity."""
    stores = 20
    settings, summary = _run(
        tmp_path,
        ["task=recommender", f"federation.num_stores={stores}", f"federation.stores_per_round={stores}",
         "federation.eval_stores_per_round=10", "federation.rounds=5", "privacy.epsilon=8"],
    )
    assert summary["privacy"]["unit"] == "customer" and 0 < summary["privacy"]["epsilon_max"] <= 8.0
    catalog = coordinator_catalog(settings.data, settings.seed)
    task = build_task(settings.task, catalog, seed=settings.seed)
    model = task.build_model()
    weights, _ = load_global_model(tmp_path / "run")
    model.load_state_dict(weights)
    model.eval()
    train, test = [], []
    for store in range(stores):
        tr, te = split_leave_last_out(customer_histories(load_simulated(settings.data, settings.seed, store)[1]))
        train += tr
        test += te

    @torch.no_grad()
    def model_scores(histories):
        return model(torch.stack([pad_history(h, task.max_history) for h in histories]))

    learned = evaluate_scores(model_scores, test, catalog.num_items, 10, 100, seed=0)
    popular = evaluate_scores(popularity_scorer(train, catalog.num_items), test, catalog.num_items, 10, 100, seed=0)
    print(f"DP federated HR@10 {learned['hr@10']:.4f} NDCG@10 {learned['ndcg@10']:.4f}; "
          f"popularity HR@10 {popular['hr@10']:.4f} NDCG@10 {popular['ndcg@10']:.4f} ({len(test)} customers)")
    assert learned["hr@10"] >= 3.0 * popular["hr@10"]
    assert learned["ndcg@10"] >= 3.0 * popular["ndcg@10"]


def test_federated_dp_review_model_beats_majority_class_and_exports_a_pipeline_model(tmp_path):
    """The default review model (frozen encoder, DP head, one reviewer per unit) learns under DP at epsilon 8
    (the whole person budget: privacy.epsilon=8 for this one task), and the run
    leaves a review_model/ folder that transformers' pipeline loads offline with label names."""
    from transformers import pipeline

    _, summary = _run(
        tmp_path,
        ["task=review", "privacy.epsilon=8", "federation.num_stores=6", "federation.stores_per_round=6",
         "federation.eval_stores_per_round=6", "federation.rounds=3"],
    )
    final = summary["final_eval"]
    print({k: v for k, v in final.items() if k.startswith("eval_")})
    assert summary["privacy"]["unit"] == "reviewer" and 0 < summary["privacy"]["epsilon_max"] <= 8.0
    assert final["eval_macro_f1"] >= final["eval_local_majority_macro_f1"] + 0.15
    assert summary["review_model"] == str(tmp_path / "run" / "review_model")
    classify = pipeline("text-classification", model=summary["review_model"], device=-1)
    labels = [r["label"] for r in classify(["terrible awful broke refund", "great excellent love perfect"])]
    assert labels == ["negative", "positive"]
