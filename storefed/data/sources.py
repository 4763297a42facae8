"""Where a merchant's data comes from: its own files (deployment) or a simulated store.

Deployment: node config ``data-dir`` (and optionally ``catalog``, default
``<data-dir>/catalog.csv``) points at files validated by :mod:`storefed.data.merchant_files`.
Simulation: node config ``partition-id`` selects a virtual store (generated on demand) or a
merchant of a partitioned public data set (``data=amazon|movielens``).
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from storefed.config.schema import DataConfig, ImportedDataConfig, VirtualDataConfig
from storefed.data.schema import Catalog, MerchantData


def load_for_node(data_cfg: DataConfig, seed: int, node_config: dict[str, Any]) -> tuple[Catalog, MerchantData]:
    """The catalog and this node's merchant data."""
    if "data-dir" in node_config:
        from storefed.data.merchant_files import load_catalog, load_merchant_dir

        data_dir = Path(str(node_config["data-dir"]))
        catalog = load_catalog(Path(str(node_config.get("catalog", data_dir / "catalog.csv"))))
        return catalog, load_merchant_dir(data_dir, catalog)
    if "partition-id" not in node_config:
        raise ValueError("node config needs data-dir=<merchant directory> (deployment) or partition-id (simulation)")
    return load_simulated(data_cfg, seed, int(node_config["partition-id"]))


def load_simulated(cfg: DataConfig, seed: int, partition_id: int) -> tuple[Catalog, MerchantData]:
    """Merchant ``partition_id`` of the simulated world described by the ``data`` config."""
    if isinstance(cfg, VirtualDataConfig):
        from storefed.data.virtual_stores import generate_catalog, generate_store

        gen = generator_config(cfg, seed)
        return generate_catalog(gen), generate_store(gen, partition_id)
    catalog, merchants = partitioned(cfg, seed)
    if partition_id >= len(merchants):
        raise ValueError(f"partition-id {partition_id} is out of range: data has {len(merchants)} merchants")
    return catalog, merchants[partition_id]


def generator_config(cfg: VirtualDataConfig, seed: int):
    """The virtual-store generator's settings for ``data.generator`` and the run's seed."""
    from storefed.data.virtual_stores import StoreGeneratorConfig

    return StoreGeneratorConfig(seed=int(seed), **dataclasses.asdict(cfg.generator))


def partitioned(cfg: DataConfig, seed: int) -> tuple[Catalog, list[MerchantData]]:
    """A public data set read and split into ``data.num_merchants`` merchants (cached per process)."""
    if not isinstance(cfg, ImportedDataConfig):
        raise ValueError(f"data.source={cfg.source!r} is not a partitioned public data set: use data=amazon|movielens")
    return _partitioned(json.dumps(dataclasses.asdict(cfg) | {"seed": int(seed)}, sort_keys=True))


@lru_cache(maxsize=2)
def _partitioned(cfg_json: str) -> tuple[Catalog, list[MerchantData]]:
    """Read and partition a public data set once per process (keyed by its config)."""
    from storefed.data.importers import read_amazon_reviews, read_movielens, split_into_merchants

    cfg = json.loads(cfg_json)
    readers = {"amazon": read_amazon_reviews, "movielens": read_movielens}
    if cfg["source"] not in readers:
        raise ValueError(f"data.source={cfg['source']!r} is unknown: choose virtual, amazon or movielens")
    catalog, table = readers[cfg["source"]](cfg["path"])
    merchants = split_into_merchants(
        catalog, table, int(cfg["num_merchants"]), scheme=cfg["partition"], alpha=float(cfg["alpha"]),
        label=cfg["label"], seed=int(cfg["seed"]),
    )
    return catalog, merchants


def coordinator_catalog(cfg: DataConfig, seed: int) -> Catalog:
    """The shared catalog the coordinator publishes for this data configuration."""
    if isinstance(cfg, VirtualDataConfig):
        from storefed.data.virtual_stores import generate_catalog

        return generate_catalog(generator_config(cfg, seed))
    if isinstance(cfg, ImportedDataConfig):
        return partitioned(cfg, seed)[0]
    from storefed.data.merchant_files import load_catalog

    return load_catalog(cfg.catalog)
