"""One person, one budget: a customer's composed epsilon across the recommender and the review model."""

from __future__ import annotations

import math
import re

import pytest
from flwr.app import ArrayRecord

from conftest import base_settings, node_context, round_config, train_message, with_privacy
from storefed.client import client_app
from storefed.client.training_round import merchant_privacy
from storefed.data.sources import coordinator_catalog
from storefed.models.task import build_task
from storefed.privacy.independent_accounting import dp_accounting_epsilon
from storefed.privacy.ledger import open_ledger
from storefed.privacy.ledger_status import format_person_status, person_status
from storefed.privacy.person_budget import person_epsilon, task_share


def _round(task: str, ledger_dir, unit: str | None = None, **privacy):
    settings = base_settings(task, "task.epochs=1", noise_multiplier=1.2, ledger_dir=str(ledger_dir),
                             **({"unit": unit} if unit else {}))
    config = with_privacy(round_config(settings, ledger_dir.parent, epochs=1), **privacy)
    model = build_task(config.task, coordinator_catalog(config.data, config.seed), seed=config.seed,
                       privacy_unit=config.privacy.unit).build_model()
    reply = client_app.train(train_message(config, ArrayRecord(dict(model.state_dict()))),
                             node_context({"partition-id": 0}))
    return reply.content


def _ledger(ledger_dir, task: str, unit: str):
    (path,) = ledger_dir.glob(f"*.{task}.ledger.json")
    return open_ledger(ledger_dir, path.name.split(".")[0], task, unit, 1e-5, "rdp", 8.0)


def test_a_customer_in_both_tasks_is_covered_by_the_composition_of_both(tmp_path, flower_identity):
    ledgers = tmp_path / "ledgers"
    for _ in range(2):
        assert _round("recommender", ledgers)["metrics"]["refused"] == 0
    reply = _round("review", ledgers, unit="user")
    assert reply["metrics"]["refused"] == 0
    recommender, review = _ledger(ledgers, "recommender", "customer"), _ledger(ledgers, "review", "reviewer")
    view = person_epsilon([recommender, review], 1e-5)
    independent = dp_accounting_epsilon(recommender.history + review.history, 1e-5, "rdp")
    assert view.epsilon == pytest.approx(independent, rel=0.01)
    assert view.epsilon > max(recommender.epsilon_spent, review.epsilon_spent)
    assert view.epsilon < recommender.epsilon_spent + review.epsilon_spent  # tighter than the naive sum
    assert reply["metrics"]["epsilon_person"] == pytest.approx(view.epsilon, rel=1e-6)
    rows = person_status(ledgers)
    assert len(rows) == 1 and rows[0]["epsilon"] == pytest.approx(view.epsilon)
    text = format_person_status(rows)
    assert "per customer, all tasks: epsilon" in text and "recommender" in text and "review" in text


@pytest.mark.parametrize("second", ["review", "recommender"])
def test_a_round_past_the_person_budget_is_refused_for_either_task(tmp_path, flower_identity, second):
    ledgers = tmp_path / "ledgers"
    first = "recommender" if second == "review" else "review"
    unit = {"review": "user", "recommender": None}
    done = _round(first, ledgers, unit[first])
    spent = done["metrics"]["epsilon_total"]
    reply = _round(second, ledgers, unit[second], person_epsilon=spent * 1.05)
    assert reply["metrics"]["refused"] == 1
    reason = reply["privacy"]["refusal"]
    assert "per-customer budget across tasks exhausted" in reason and f"privacy.person_epsilon={spent * 1.05:g}" in reason
    assert not list(ledgers.glob(f"*.{second}.ledger.json")) or not _ledger(
        ledgers, second, "reviewer" if second == "review" else "customer").rounds
    assert _round(second, ledgers, unit[second], person_epsilon=spent * 10)["metrics"]["refused"] == 0


def test_the_review_unit_is_covered_only_by_group_privacy(tmp_path, flower_identity):
    ledgers = tmp_path / "ledgers"
    refused = _round("review", ledgers, unit="review")  # default person budget: group privacy cannot fit it
    assert refused["metrics"]["refused"] == 1
    assert "per-customer budget across tasks exhausted" in refused["privacy"]["refusal"]
    assert "group privacy for k=" in refused["privacy"]["refusal"]
    reply = _round("review", ledgers, unit="review", person_epsilon=None)  # reported, not enforced
    review = _ledger(ledgers, "review", "review")
    k = review.group_size
    assert k and k > 1
    view = person_epsilon([review], 1e-5)
    assert "group privacy for k=" in view.method
    assert view.epsilon >= k * review.epsilon_spent  # k reviews: at least k times the per-review epsilon
    assert reply["metrics"]["epsilon_person"] == pytest.approx(view.epsilon, rel=1e-6)
    assert math.isfinite(view.epsilon)


def test_the_default_splits_one_person_budget_between_both_tasks(tmp_path, flower_identity):
    """No privacy.epsilon: each task plans for its share of privacy.person_epsilon=8, and a customer in both
    tasks ends within 8 (the merchant enforces the exact composition of both ledgers)."""
    share = task_share(8.0, 2, 1e-5)
    assert 8.0 / 2 < share < 8.0  # tighter than basic composition's 4, never the whole budget
    assert round_config(base_settings("review"), tmp_path).privacy.epsilon == pytest.approx(share)
    alone = round_config(base_settings("review", "privacy.person_tasks=[review]"), tmp_path).privacy
    assert alone.epsilon == 8.0  # one task trained: it gets the whole budget
    ledgers = tmp_path / "ledgers"
    for task in ("recommender", "review", "recommender", "review"):
        reply = _auto_round(task, ledgers)
        assert reply["metrics"]["epsilon_budget"] == pytest.approx(share)
    recommender, review = _ledger(ledgers, "recommender", "customer"), _ledger(ledgers, "review", "reviewer")
    assert recommender.rounds and review.rounds
    view = person_epsilon([recommender, review], 1e-5)
    assert max(recommender.epsilon_spent, review.epsilon_spent) <= share + 1e-9
    assert view.epsilon <= 8.0 + 1e-9
    assert view.epsilon == pytest.approx(dp_accounting_epsilon(recommender.history + review.history, 1e-5, "rdp"),
                                         rel=0.01)


def test_a_merchant_s_own_person_budget_is_split_too(tmp_path):
    proposed = round_config(base_settings("recommender"), tmp_path).privacy
    own = merchant_privacy(proposed, {"person-epsilon-budget": 3.0})
    assert own.person_epsilon == 3.0 and own.epsilon == pytest.approx(task_share(3.0, 2, 1e-5))
    assert merchant_privacy(proposed, {"person-epsilon-budget": 3.0, "epsilon-budget": 2.5}).epsilon == 2.5
    assert merchant_privacy(proposed, {"person-epsilon-budget": 100.0}).epsilon == proposed.epsilon  # never raised


@pytest.mark.parametrize("overrides, message", [
    (["privacy.epsilon=9"], "exceeds privacy.person_epsilon=8"),
    (["privacy.person_epsilon=null"], "set privacy.epsilon (this task's budget) or privacy.person_epsilon"),
    (["privacy.person_tasks=[review]"], "must include the task this run trains (recommender)"),
    (["privacy.person_tasks=[review,review]"], "list each task once"),
    (["privacy.person_tasks=[ads]"], "privacy.person_tasks='ads'"),
])
def test_budget_settings_that_cannot_hold_are_refused(overrides, message):
    from storefed.config.validate import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        base_settings("recommender", *overrides)


def _auto_round(task: str, ledger_dir):
    """A round at the default budgets (noise planned for the task's share)."""
    settings = base_settings(task, "task.epochs=1", ledger_dir=str(ledger_dir))
    config = round_config(settings, ledger_dir.parent, epochs=1)
    model = build_task(config.task, coordinator_catalog(config.data, config.seed), seed=config.seed,
                       privacy_unit=config.privacy.unit).build_model()
    return client_app.train(train_message(config, ArrayRecord(dict(model.state_dict()))),
                            node_context({"partition-id": 0})).content
