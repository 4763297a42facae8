"""Where a merchant's data comes from: its own files (deployment) or a simulated store.

Deployment: node config ``data-dir`` (and optionally ``catalog``, default
``<data-dir>/catalog.csv``) points at files validated by :mod:`client.merchant_files`.
Simulation: node config ``partition-id`` selects a virtual store (generated on demand) or a
merchant of a partitioned public data set (``data.source=amazon|movielens``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from client.dataset import Catalog, MerchantData


def load_for_node(data_cfg: dict, node_config: dict) -> tuple[Catalog, MerchantData]:
    """The catalog and this node's merchant data."""
    if "data-dir" in node_config:
        from client.merchant_files import load_catalog, load_merchant_dir

        data_dir = Path(str(node_config["data-dir"]))
        catalog = load_catalog(Path(str(node_config.get("catalog", data_dir / "catalog.csv"))))
        return catalog, load_merchant_dir(data_dir, catalog)
    if "partition-id" not in node_config:
        raise ValueError("node config needs data-dir=<merchant directory> (deployment) or partition-id (simulation)")
    return load_simulated(data_cfg, int(node_config["partition-id"]))


def load_simulated(cfg: dict, partition_id: int) -> tuple[Catalog, MerchantData]:
    """Merchant ``partition_id`` of the simulated world described by ``data`` config."""
    source = cfg.get("source", "virtual")
    if source == "virtual":
        from simulations.virtual_stores import generate_catalog, generate_store

        gen = generator_config(cfg)
        return generate_catalog(gen), generate_store(gen, partition_id)
    catalog, merchants = _partitioned(json.dumps(cfg, sort_keys=True))
    if partition_id >= len(merchants):
        raise ValueError(f"partition-id {partition_id} is out of range: data has {len(merchants)} merchants")
    return catalog, merchants[partition_id]


def generator_config(cfg: dict):
    from simulations.virtual_stores import StoreGeneratorConfig

    fields = StoreGeneratorConfig.__dataclass_fields__
    unknown = sorted(set(cfg.get("generator", {})) - set(fields))
    if unknown:
        raise ValueError(f"data.generator has unknown keys {unknown}; known: {sorted(fields)}")
    return StoreGeneratorConfig(seed=int(cfg.get("seed", 0)), **cfg.get("generator", {}))


@lru_cache(maxsize=2)
def _partitioned(cfg_json: str) -> tuple[Catalog, list[MerchantData]]:
    """Read and partition a public data set once per process (keyed by its config)."""
    from simulations.importers import read_amazon_reviews, read_movielens, split_into_merchants

    cfg = json.loads(cfg_json)
    readers = {"amazon": read_amazon_reviews, "movielens": read_movielens}
    if cfg["source"] not in readers:
        raise ValueError(f"data.source={cfg['source']!r} is unknown: choose virtual, amazon or movielens")
    catalog, table = readers[cfg["source"]](cfg["path"])
    merchants = split_into_merchants(
        catalog,
        table,
        int(cfg["num_merchants"]),
        scheme=cfg.get("partition", "iid"),
        alpha=float(cfg.get("alpha", 0.3)),
        label=cfg.get("label", "category"),
        seed=int(cfg.get("seed", 0)),
    )
    return catalog, merchants



def coordinator_catalog(data_cfg: dict) -> Catalog:
    """The shared catalog the coordinator publishes for this data configuration."""
    source = data_cfg.get("source", "virtual")
    if source == "virtual":
        from simulations.virtual_stores import generate_catalog

        return generate_catalog(generator_config(data_cfg))
    if source == "files":
        from client.merchant_files import load_catalog

        return load_catalog(data_cfg["catalog"])
    return _partitioned(json.dumps(data_cfg, sort_keys=True))[0]
