"""What `storefed evaluate` runs: the validated grid of cells and methods, from the composed config.

A *cell* is one (merchant count K, partition scheme, seed). Every method of a cell sees the
same partition of customers into K merchants and the same held-out split (leave-last-out per
customer for the recommender, a seeded per-merchant review split for the review model).
Every problem with the configuration is a ``ValueError`` naming the key and what to do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from storefed.config.schema import EvaluateConfig
from storefed.data.partition import SCHEMES

# Methods per task, in report order. "*_dp" methods run once per epsilon.
RECOMMENDER_METHODS = (
    "popularity", "centralized", "centralized_dp", "local", "federated", "federated_dp", "federated_dp_distributed",
    "federated_dp_distributed_prior",
)
REVIEW_METHODS = (
    "majority", "tfidf_logreg", "centralized", "centralized_dp", "local", "federated", "federated_dp",
    "federated_dp_distributed",
)
# the item-item model is released through secure aggregation: exact (centralized, local, federated) or with
# distributed DP; it has no DP-SGD, so no centralized_dp / local-mode federated_dp rows
ITEM_ITEM_METHODS = ("popularity", "centralized", "local", "federated", "federated_dp_distributed")
METHODS = {"recommender": RECOMMENDER_METHODS, "review": REVIEW_METHODS, "item_item": ITEM_ITEM_METHODS}
OPTIONAL_METHODS = ("federated_dp_distributed_prior",)  # run only when named in evaluate.methods
DP_METHODS = ("centralized_dp", "federated_dp", "federated_dp_distributed", "federated_dp_distributed_prior")
STRATEGIES = ("fedavg", "fedprox")
GENERATED = "generated"  # the "partition" of data=virtual cells: K virtual stores, generated on demand  # strategies whose aggregation needs no server-side state


@dataclass(frozen=True)
class Cell:
    """One data configuration: ``num_merchants`` merchants, ``partition`` scheme, ``seed``."""

    num_merchants: int
    partition: str
    seed: int

    @property
    def name(self) -> str:
        return f"K{self.num_merchants}-{self.partition}-seed{self.seed}"


@dataclass(frozen=True)
class EvalSpec:
    """The validated evaluation grid."""

    task: str
    cells: tuple[Cell, ...]
    methods: tuple[str, ...]
    epsilons: tuple[float, ...]
    rounds: int
    stores_per_round: int | None
    threads: int
    tfidf_max_features: int


def _int_list(value, key: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{key} is empty: give at least one value, e.g. {key}=[10]")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{key} must hold integers, got {v!r}")
        out.append(v)
    return out


def build_spec(settings: EvaluateConfig) -> EvalSpec:
    """Validate ``settings`` (the composed `storefed evaluate` config) into an :class:`EvalSpec`."""
    ev = dataclasses.asdict(settings.evaluate)
    task = settings.task.name
    if task not in METHODS:
        raise ValueError(f"task.name={task!r} is unknown: choose task=recommender or task=review")
    data = settings.data
    source = data.source
    if source not in ("amazon", "movielens", "virtual"):
        raise ValueError(
            f"data.source={source!r}: storefed evaluate needs data=amazon, data=movielens or data=virtual"
        )
    if task == "review" and source == "movielens":
        raise ValueError("MovieLens u.data has no review text: use task=recommender with data=movielens")
    path = Path(str(getattr(data, "path", "")))
    if source != "virtual" and not path.is_file():
        raise ValueError(
            f"data.path={str(path)!r} does not exist (resolved: {path.resolve()}): "
            f"point data.path at the {source} file"
        )
    ks = _int_list(ev.get("num_merchants", [10]), "evaluate.num_merchants")
    if min(ks) < 1:
        raise ValueError(f"evaluate.num_merchants={ks}: every K must be >= 1")
    partitions = ev.get("partitions", ["iid"])
    partitions = partitions if isinstance(partitions, list) else [partitions]
    if source == "virtual":  # each virtual store generates its own customers: nothing to partition
        partitions = [GENERATED]
    bad = [p for p in partitions if p not in (*SCHEMES, GENERATED)]
    if bad or not partitions:
        raise ValueError(f"evaluate.partitions={partitions} is invalid: choose from {list(SCHEMES)}")
    seeds = _int_list(ev.get("seeds", [0]), "evaluate.seeds")
    raw = ev.get("epsilons") or []
    try:
        epsilons = [float(e) for e in (raw if isinstance(raw, list) else [raw])]
    except (TypeError, ValueError):
        raise ValueError(f"evaluate.epsilons={raw} must be numbers, e.g. evaluate.epsilons=[1,3,8]") from None
    if any(not (e > 0 and math.isfinite(e)) for e in epsilons):
        raise ValueError(f"evaluate.epsilons={epsilons}: every epsilon must be a finite number > 0")
    family = "item_item" if getattr(settings.task, "model", None) == "item_item" else task
    methods = ev.get("methods") or [m for m in METHODS[family] if m not in OPTIONAL_METHODS]
    methods = methods if isinstance(methods, list) else [methods]
    unknown = [m for m in methods if m not in METHODS[family]]
    if unknown:
        which = f"task={task}" + (" task.model=item_item" if family == "item_item" else "")
        raise ValueError(f"evaluate.methods has unknown method(s) {unknown} for {which}: choose from {list(METHODS[family])}")
    if any(m in DP_METHODS for m in methods):
        if not epsilons:
            raise ValueError("evaluate.epsilons is empty but DP methods were asked for: give e.g. evaluate.epsilons=[1,3,8]")
        privacy = settings.privacy
        delta = float(privacy.delta or 0.0)
        if not 0 < delta < 1 or float(privacy.max_grad_norm or 0) <= 0:
            raise ValueError(
                "DP methods need privacy=dp (privacy.delta in (0, 1) and privacy.max_grad_norm > 0); "
                "with privacy=none drop centralized_dp and federated_dp from evaluate.methods"
            )
    strategy = settings.strategy.name
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not supported by storefed evaluate: choose one of {list(STRATEGIES)}")
    rounds = int(ev.get("rounds", 10))
    if rounds < 1:
        raise ValueError(f"evaluate.rounds={rounds} must be >= 1")
    per_round = ev.get("stores_per_round")
    if per_round is not None and (int(per_round) < 1 or int(per_round) > min(ks)):
        raise ValueError(
            f"evaluate.stores_per_round={per_round} must lie in 1..min(evaluate.num_merchants)={min(ks)} (or null = all)"
        )
    cells = tuple(Cell(k, p, s) for k in ks for p in partitions for s in seeds)
    return EvalSpec(
        task=task,
        cells=cells,
        methods=tuple(m for m in METHODS[family] if m in methods),
        epsilons=tuple(sorted(set(epsilons))),
        rounds=rounds,
        stores_per_round=None if per_round is None else int(per_round),
        threads=int(ev.get("threads", 1)),
        tfidf_max_features=int(ev.get("tfidf_max_features", 20000)),
    )


def cell_settings(settings: EvaluateConfig, cell: Cell, spec: EvalSpec) -> EvaluateConfig:
    """The settings a `storefed simulate` run of this cell would use (data, federation, seed)."""
    per_round = spec.stores_per_round or cell.num_merchants
    data = settings.data if cell.partition == GENERATED else dataclasses.replace(
        settings.data, num_merchants=cell.num_merchants, partition=cell.partition)
    return dataclasses.replace(
        settings,
        seed=cell.seed,
        data=data,
        federation=dataclasses.replace(
            settings.federation, num_stores=cell.num_merchants, stores_per_round=per_round,
            eval_stores_per_round=cell.num_merchants, rounds=spec.rounds,
        ),
    )
