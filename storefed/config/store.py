"""Registers the typed configs (storefed.config.schema) in hydra's ConfigStore, once per process.

Group options that are only a schema's defaults live here; presets that change values are YAML
files under ``conf/`` that name one of the ``*_schema`` entries below in their defaults list.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from storefed.config import schema as s

ROOT_CONFIGS = {
    "simulate": s.RunConfig,
    "server": s.ServerRunConfig,
    "evaluate": s.EvaluateConfig,
    "audit": s.AuditConfig,
    "merchant": s.MerchantConfig,
    "merchant_status": s.MerchantStatusConfig,
    "certs": s.CertsConfig,
    "import": s.ImportConfig,
}

GROUP_OPTIONS = {
    "task": {"recommender": s.RecommenderConfig, "review": s.ReviewConfig},
    "privacy": {"dp": s.PrivacyConfig, "privacy_schema": s.PrivacyConfig},
    "strategy": {"fedavg": s.FedAvgConfig, "fedadam": s.FedAdamConfig, "fedprox": s.FedProxConfig,
                 "fedmedian": s.FedMedianConfig, "fedtrimmedavg": s.FedTrimmedAvgConfig},
    "federation": {"local": s.FederationConfig, "federation_schema": s.FederationConfig},
    "data": {"virtual": s.VirtualDataConfig, "files": s.FilesDataConfig, "imported_schema": s.ImportedDataConfig},
}

_registered = False


def register() -> None:
    """Put every root config and group option into the ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    for name, node in ROOT_CONFIGS.items():
        store.store(name=name, node=node)
    for group, options in GROUP_OPTIONS.items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node)
    _registered = True
