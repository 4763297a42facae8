"""What travels between coordinator and merchants: record names, metric keys and the round config.

Shared by ``storefed.client`` and ``storefed.server`` (neither imports the other). The round
config is typed and minimal: the task, the merchant-side privacy settings, where the data comes
from (simulation) and the run id, flattened into one Flower ConfigRecord of scalars and lists
(``task.lr``, ``privacy.epsilon``, ``data.generator.num_items``, ...) and decoded back into the
same dataclasses by the merchant. Nothing else of the coordinator's configuration is sent.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from storefed.config import schema

# Record names inside a Flower message's RecordDict.
ARRAYS, CONFIG, METRICS, PRIVACY = "arrays", "config", "metrics", "privacy"
SERVER_ROUND, PROXIMAL_MU = "server-round", "proximal-mu"  # set by Flower's strategies
SHARED_KEYS = "shared-keys"  # SecAgg+ fit config: JSON list naming the legacy (unnamed, ordered) arrays
NUM_EXAMPLES = "num-examples"
RELEASE_KEY = "distributed-release"  # distributed fit config: "prior" in the round that releases a DP statistic

# Every train reply's MetricRecord carries exactly these keys (refusals too, zero-filled).
PRIMARY_METRIC = {"recommender": "hr@10", "review": "macro_f1"}  # each task's headline evaluation metric
TRAIN_METRIC_KEYS = (
    NUM_EXAMPLES, "train_loss", "steps", "refused", "dp", "noise_multiplier", "sample_rate",
    "epsilon_round", "epsilon_total", "epsilon_budget", "delta", "epsilon_person", "update_bytes",
)


@dataclass(frozen=True)
class MerchantPrivacy:
    """The privacy settings a merchant trains under (it may override budget, delta and ledger)."""

    enabled: bool = True
    epsilon: float = 8.0  # total budget per task, across all rounds and runs
    person_epsilon: Optional[float] = None  # per-customer budget across tasks (None: reported, not enforced)
    person_tasks: int = 1  # tasks sharing person_epsilon (a merchant's own person budget is split as many ways)
    delta: float = 1e-5
    unit: Optional[str] = None  # None: the task's unit
    max_grad_norm: float = 1.0
    noise_multiplier: Optional[float] = None  # None: planned so planned_rounds fit the budget
    planned_rounds: int = 2
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    ledger_dir: Optional[str] = None  # simulation: the run's ledgers/ dir; deployment: node config
    # privacy.mode=distributed (privacy/skellam.py): the round's public Skellam plan
    mode: str = "local"  # local | distributed
    sample_rate: Optional[float] = None  # distributed: every unit's Poisson rate q
    gamma: Optional[float] = None  # distributed: integer units per model unit
    noise_shares: Optional[int] = None  # distributed: shares the noise is split into (survivors - colluders)
    prior_noise_multiplier: Optional[float] = None  # distributed: the one-shot prior release's plan, if any
    prior_gamma: Optional[float] = None


@dataclass(frozen=True)
class RoundConfig:
    """Everything a merchant needs to train or evaluate one round."""

    task: schema.TaskConfig
    privacy: MerchantPrivacy
    data: schema.DataConfig
    seed: int = 0
    device: str = "auto"
    run_id: str = ""
    failure_rate: float = 0.0  # simulation only: share of merchants' train calls that fail on purpose
    failure_hang_s: float = 0.0  # > 0: an injected failure first hangs this long (past the round timeout)
    update_encoding: str = "float32"  # storefed/update_codec.py: how the update is sent (after the DP noise)

    def to_record(self) -> dict[str, Any]:
        """Flat ``{dotted.key: scalar | list}`` (None omitted), the contents of a Flower ConfigRecord."""
        return _flatten(self, "")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundConfig":
        """Decode :meth:`to_record`'s output (a ConfigRecord or a legacy fit-config dict)."""
        task_cls = {"recommender": schema.RecommenderConfig, "review": schema.ReviewConfig}.get(record.get("task.name"))
        data_cls = {"virtual": schema.VirtualDataConfig, "files": schema.FilesDataConfig}.get(
            record.get("data.source"), schema.ImportedDataConfig
        )
        if task_cls is None:
            raise ValueError(f"round config names no known task (task.name={record.get('task.name')!r})")
        return cls(
            task=_build(task_cls, record, "task."),
            privacy=_build(MerchantPrivacy, record, "privacy."),
            data=_build(data_cls, record, "data."),
            seed=int(record.get("seed", 0)),
            device=str(record.get("device", "auto")),
            run_id=str(record.get("run-id", "")),
            failure_rate=float(record.get("failure_rate", 0.0)),
            failure_hang_s=float(record.get("failure_hang_s", 0.0)),
            update_encoding=str(record.get("update_encoding", "float32")),
        )


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name.replace("_id", "-id") if f.name == "run_id" else prefix + f.name
        if dataclasses.is_dataclass(value):
            out |= _flatten(value, key + ".")
        elif value is not None:
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _build(cls: type, record: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, record, f"{prefix}{f.name}.")
        elif prefix + f.name in record:
            value = record[prefix + f.name]
            kwargs[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"round config lacks {prefix}{f.name}")
        elif f.default is not dataclasses.MISSING and f.default is not None:
            kwargs[f.name] = None if typing.get_origin(hint) is typing.Union else f.default
    return cls(**kwargs)
