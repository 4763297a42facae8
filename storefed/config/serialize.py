"""A typed config to plain data and back (the run dir's ``config.yaml``; the deployment's settings file).

``to_dict`` is ``dataclasses.asdict``; ``from_dict`` rebuilds the dataclasses, choosing each
group's option by its discriminator (``task.name``, ``strategy.name``, ``data.source``), and
re-validates, so a hand-edited file is checked like the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from storefed.config import schema as s
from storefed.config.validate import validate

VARIANTS: dict[str, tuple[str, dict[str, type]]] = {
    "task": ("name", {"recommender": s.RecommenderConfig, "review": s.ReviewConfig}),
    "strategy": ("name", {"fedavg": s.FedAvgConfig, "fedadam": s.FedAdamConfig, "fedprox": s.FedProxConfig,
                          "fedmedian": s.FedMedianConfig, "fedtrimmedavg": s.FedTrimmedAvgConfig}),
    "data": ("source", {"virtual": s.VirtualDataConfig, "files": s.FilesDataConfig,
                        "amazon": s.ImportedDataConfig, "movielens": s.ImportedDataConfig}),
}


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML/JSON-safe), without hydra's defaults list."""
    out = dataclasses.asdict(cfg)
    out.pop("defaults", None)
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass ``cls`` rebuilt from :func:`to_dict`'s output, validated."""
    cfg = _build(cls, data)
    validate(cfg)
    return cfg


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no keys {unknown}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if name in VARIANTS and isinstance(value, dict):
            key, options = VARIANTS[name]
            if not isinstance(value.get(key), str) or value.get(key) not in options:
                raise ValueError(f"{name}.{key}={value.get(key)!r} is unknown: choose one of {sorted(options)}")
            kwargs[name] = _build(options[value[key]], value)
        elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = _build(hint, value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
