"""Compose a command's typed, validated configuration from ``conf/`` presets and ``key=value`` overrides.

``compose(command, overrides)`` returns the command's root dataclass (storefed.config.schema),
already range-checked: anything wrong raises :class:`ConfigError` with one line naming the key,
the value and what is allowed, before any expensive work (Ray, a SuperLink, data loading) starts.
The presets are package data (``storefed.conf``), read through importlib.resources by hydra.
"""

from __future__ import annotations

import re
from typing import Any

from storefed.config.validate import ConfigError, validate


def compose(command: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The typed configuration of ``command`` (a key of ``ROOT_CONFIGS``) with ``overrides`` applied."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from storefed.config.store import ROOT_CONFIGS, register

    if command not in ROOT_CONFIGS:
        raise ConfigError(f"unknown command {command!r}: choose one of {sorted(ROOT_CONFIGS)}")
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="storefed.conf", version_base="1.3"):
            cfg = hydra_compose(config_name=command, overrides=list(overrides))
        _refuse_unknown_keys(cfg)
        settings = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(one_line(exc)) from None
    except Exception as exc:  # hydra's own errors (unknown group option, bad override syntax)
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            raise ConfigError(one_line(exc)) from None
        raise
    finally:
        GlobalHydra.instance().clear()
    validate(settings)
    return resolve_for_privacy(settings)


def resolve_for_privacy(settings: Any) -> Any:
    """A run's task with the defaults for its privacy setting filled in (`storefed evaluate` resolves
    per method instead: it runs private and non-private methods from one config)."""
    from storefed.config.schema import EvaluateConfig, resolved_task

    if isinstance(settings, EvaluateConfig) or not hasattr(settings, "task") or not hasattr(settings, "privacy"):
        return settings
    settings.task = resolved_task(settings.task, bool(settings.privacy.enabled))
    return settings


def describe(command: str) -> str:
    """``--help`` text: the command's config groups with their options, then every key with its default."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from storefed.config.store import register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="storefed.conf", version_base="1.3"):
            cfg = hydra_compose(config_name=command)
            groups = {g: _options(g) for g in cfg if g in ("task", "privacy", "strategy", "federation", "data")}
    finally:
        GlobalHydra.instance().clear()
    lines = ["config groups (choose with group=option):"] if groups else []
    lines += [f"  {group:<11} {' | '.join(options)}" for group, options in groups.items()]
    lines.append("config keys (override with key=value; defaults shown):")
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)):
        lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def _options(group: str) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    names = GlobalHydra.instance().config_loader().get_group_options(group)
    return [n for n in names if not n.endswith("_schema")]


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        rows: list[tuple[str, Any]] = []
        for key, value in node.items():
            rows += _leaves(value, f"{prefix}{key}.")
        return rows
    return [(prefix.rstrip("."), "null" if node is None else node)]


def _refuse_unknown_keys(node: Any, prefix: str = "") -> None:
    """``+section.key=value`` can add a key no dataclass declares (hydra force-adds it): refuse it."""
    from dataclasses import fields, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if schema is not None and is_dataclass(schema) else None
    for key in node.keys():
        if known is not None and key not in known:
            raise ConfigError(
                f"{prefix}{key} is not a configuration key: known keys of {prefix.rstrip('.') or 'the config'} "
                f"are {sorted(known - {'defaults'})}"
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors as one line that names the key (they span several lines and chain causes)."""
    messages = [str(exc)]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(messages) < 4:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(" ".join(m.split()) for m in messages if m and "$VALUE" not in m)
    text = text.split(" Config search path:")[0]
    key = re.search(r"full_key: ([\w.\[\]]+)", text)
    text = re.sub(r"\s*(full_key|reference_type|object_type|object type)=?:?\s*\S+", "", text)
    if key and key.group(1) not in text.split("full_key")[0]:
        text = f"{key.group(1)}: {text}"
    return text[:400]
