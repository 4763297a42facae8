"""Checks of a composed run configuration that need the layers below (data, models, privacy).

Run by ``storefed simulate`` / ``server`` / ``evaluate`` after the typed config has passed its
range checks and **before** Ray or a SuperLink starts: one line naming the key and what to do.
"""

from __future__ import annotations

from storefed.config.schema import ImportedDataConfig, ReviewConfig, RunConfig
from storefed.config.validate import ConfigError
from storefed.data.sources import partitioned
from storefed.models.task import build_task
from storefed.privacy.central_dp import check_privacy_options
from storefed.privacy.delta_check import delta_problem


def check_run(settings: RunConfig) -> None:
    """Refuse combinations no single key can show wrong (raises ConfigError)."""
    data, federation, privacy = settings.data, settings.federation, settings.privacy
    if isinstance(data, ImportedDataConfig) and federation.num_stores != data.num_merchants:
        raise ConfigError(
            f"federation.num_stores={federation.num_stores} but data.num_merchants={data.num_merchants}: "
            "with imported data every merchant is one virtual store; set both to the same number"
        )
    if isinstance(settings.task, ReviewConfig) and getattr(data, "source", "") == "movielens":
        raise ConfigError("data=movielens has no review text: use task=recommender with data=movielens")
    try:
        check_privacy_options(privacy, settings.strategy.name, federation.num_stores)
        if privacy.secure_aggregation or privacy.mode == "distributed":
            from storefed.server.secure_aggregation import secagg_options

            secagg_options(privacy, federation)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if federation.overselect != 1 and (privacy.secure_aggregation or privacy.mode == "distributed"):
        raise ConfigError(f"federation.overselect={federation.overselect:g} cannot be used with secure aggregation: "
                          "SecAgg+ sizes its thresholds to federation.stores_per_round and tolerates dropouts within "
                          "them (privacy.min_survivors); set federation.overselect=1")
    if federation.update_encoding != "float32" and (privacy.secure_aggregation or privacy.mode == "distributed"):
        raise ConfigError(f"federation.update_encoding={federation.update_encoding} cannot be used with secure "
                          "aggregation: SecAgg+ already sends the update as integers of privacy.secagg_bits")
    check_simulation_delta(settings)


def check_simulation_delta(settings: RunConfig) -> None:
    """Refuse a simulation whose delta is not below 1/n at its smallest imported merchant.

    Virtual stores are generated on demand: their delta is checked by every merchant at round time.
    """
    privacy, data = settings.privacy, settings.data
    if not privacy.enabled or not isinstance(data, ImportedDataConfig):
        return
    catalog, merchants = partitioned(data, settings.seed)
    task = build_task(settings.task, catalog, seed=settings.seed, privacy_unit=privacy.unit)
    sizes = [(len(task.train_dataset(m)), m.merchant_id) for m in merchants]
    smallest, merchant = min((n, mid) for n, mid in sizes if n > 0) if any(n for n, _ in sizes) else (0, "-")
    problem = delta_problem(privacy.delta, smallest, task.privacy_unit, f"merchant {merchant}")
    if problem:
        raise ConfigError(problem)
