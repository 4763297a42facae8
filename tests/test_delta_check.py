"""delta >= 1/n is refused at configuration time where n is known, with a message naming n."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_importers import amazon_records, write_jsonl

from conftest import ROOT
from storefed.privacy.delta_check import check_merchant_delta, delta_problem
from storefed.simulations.checks import check_simulation_delta


def test_delta_problem_names_n_the_unit_and_the_fix():
    assert delta_problem(1e-5, 1000, "customer", "merchant m") is None
    message = delta_problem(0.01, 100, "customer", "merchant m")
    assert message == ("privacy.delta=0.01 is not below 1/n = 1/100 customers at merchant m: a delta of 1/n or more "
                       "allows publishing one customer's data outright; set privacy.delta below 0.01")
    assert "must lie in (0, 1)" in delta_problem(0.0, 100, "review", "x")
    assert "must lie in (0, 1)" in delta_problem(1.5, 0, "review", "x")


def _amazon_settings(tmp_path, *overrides: str):
    from storefed.config import compose

    path = write_jsonl(tmp_path / "reviews.json.gz", amazon_records(num_users=30, num_items=6), compress=True)
    return compose("simulate", ["data=amazon", f"data.path={path}", "data.num_merchants=3", "federation.num_stores=3",
                    "federation.stores_per_round=2", *overrides])


def test_simulation_refuses_delta_at_or_above_one_over_the_smallest_merchants_customers(tmp_path):
    from storefed.data.sources import _partitioned

    settings = _amazon_settings(tmp_path, "privacy.delta=0.2")
    with pytest.raises(ValueError) as err:
        check_simulation_delta(settings)
    _partitioned.cache_clear()
    # 30 customers in 3 merchants: 10 each, every one with two reviews (one training example each)
    assert "privacy.delta=0.2 is not below 1/n = 1/10 customers at merchant" in str(err.value)
    check_simulation_delta(_amazon_settings(tmp_path, "privacy.delta=0.05"))
    check_simulation_delta(_amazon_settings(tmp_path, "privacy=none"))  # no DP: nothing to check


def test_storefed_simulate_refuses_before_starting_anything(tmp_path):
    path = write_jsonl(tmp_path / "reviews.json.gz", amazon_records(num_users=30, num_items=6), compress=True)
    done = subprocess.run(
        [sys.executable, "-m", "storefed", "simulate", "data=amazon", f"data.path={path}", "data.num_merchants=3",
         "federation.num_stores=3", "federation.stores_per_round=2", "privacy.delta=0.5", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 2
    assert "privacy.delta=0.5 is not below 1/n = 1/10 customers" in done.stderr
    assert not (tmp_path / "run").exists()


def test_merchant_agent_refuses_its_own_delta_against_its_data():
    check_merchant_delta(None, 3, 1)  # the coordinator's proposal is checked at round time
    check_merchant_delta(1e-5, 5000, 300)
    with pytest.raises(ValueError, match=r"privacy.delta=0.03 is not below 1/n = 1/40 reviews at this merchant"):
        check_merchant_delta(0.03, 20, 40)
    with pytest.raises(ValueError, match=r"privacy.delta=0.01 is not below 1/n = 1/5000 customers at this merchant"):
        check_merchant_delta(0.01, 5000, 0)
