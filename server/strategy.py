"""Strategy assembly: a Flower strategy from config, with StoreFed's reply screening in front.

``strategy.name``: ``fedavg`` (default), ``fedadam`` or ``fedprox``; aggregation is weighted by
``num-examples`` (Flower's own implementation). Train metrics are aggregated per key:
examples and steps summed, epsilons reported as the maximum over merchants (the weakest
guarantee in the round), everything else weighted by examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from server.screening import RoundScreening, screen_train_replies

STRATEGIES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedprox": FedProx}
_SUMMED = ("num-examples", "steps", "refused")


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means, except sums for counts and maxima for epsilon (the weakest guarantee)."""
    out = aggregate_metricrecords(records, weight_key)
    metrics = [next(iter(r.metric_records.values())) for r in records]
    for key in metrics[0].keys():
        if key in _SUMMED:
            out[key] = sum(m[key] for m in metrics)
        elif key.startswith("epsilon") or key == "delta":
            out[key] = max(m[key] for m in metrics)
    return out


def build_strategy(
    strategy_cfg: dict,
    federation_cfg: dict,
    expected: dict[str, tuple[int, ...]],
    on_screened: Callable[[int, RoundScreening], None],
    on_round_end: Callable[[int, dict | None, dict | None], None] | None = None,
):
    """The configured Flower strategy, screening replies before Flower aggregates them.

    ``on_screened(round, screening)`` sees every round's replies before aggregation (it may raise
    to stop the run); ``on_round_end(round, train_metrics, eval_metrics)`` gets the aggregated
    metrics once the round's evaluation is done.
    """
    name = strategy_cfg.get("name", "fedavg")
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r} is unknown: choose one of {sorted(STRATEGIES)}")
    base = STRATEGIES[name]

    latest_train: dict[int, dict] = {}  # aggregated train metrics of rounds not yet evaluated

    class ScreenedStrategy(base):  # type: ignore[misc, valid-type]
        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            screening = screen_train_replies(list(replies), expected)
            on_screened(server_round, screening)
            if not screening.accepted:
                return None, None
            arrays, metrics = super().aggregate_train(server_round, screening.accepted)
            latest_train[server_round] = dict(metrics) if metrics else {}
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            metrics = super().aggregate_evaluate(server_round, replies)
            if on_round_end is not None:
                on_round_end(server_round, latest_train.pop(server_round, None), dict(metrics) if metrics else None)
            return metrics

    num_stores = int(federation_cfg["num_stores"])
    per_round = int(federation_cfg["stores_per_round"])
    eval_per_round = int(federation_cfg.get("eval_stores_per_round", per_round))
    if not 1 <= per_round <= num_stores or not 0 <= eval_per_round <= num_stores:
        raise ValueError(
            f"federation.stores_per_round={per_round} and eval_stores_per_round={eval_per_round} "
            f"must lie in 1..num_stores={num_stores}"
        )
    options = {k: v for k, v in strategy_cfg.items() if k != "name"}
    return ScreenedStrategy(
        fraction_train=per_round / num_stores,
        fraction_evaluate=eval_per_round / num_stores,
        min_train_nodes=per_round,
        min_evaluate_nodes=eval_per_round,
        min_available_nodes=num_stores,
        train_metrics_aggr_fn=aggregate_train_metrics,
        **options,
    )
