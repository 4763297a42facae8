"""Strategy assembly: a Flower strategy from config, with StoreFed's reply screening in front.

``strategy.name``: ``fedavg`` (default), ``fedadam`` or ``fedprox``; aggregation is weighted by
``num-examples`` (Flower's own implementation). Train metrics are aggregated per key:
examples and steps summed, epsilons reported as the maximum over merchants (the weakest
guarantee in the round), everything else weighted by examples. With ``privacy.central`` the
strategy sits inside Flower's client-level DP wrapper (privacy/central_dp.py) and averages uniformly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from storefed.config.schema import FederationConfig, PrivacyConfig, StrategyConfig
from storefed.privacy.central_dp import WEIGHT_KEY, CentralDP, check_privacy_options
from storefed.server.screening import RoundScreening, screen_train_replies
from storefed.update_codec import decode_update

STRATEGIES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedprox": FedProx, "fedmedian": FedMedian,
              "fedtrimmedavg": FedTrimmedAvg}
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


def real_replies_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Train metrics over real merchant replies only (central DP's stand-ins report num-examples=0)."""
    real = [r for r in records if next(iter(r.metric_records.values())).get("num-examples", 0) > 0]
    return aggregate_train_metrics(real, "num-examples") if real else MetricRecord()


def build_strategy(
    strategy_cfg: StrategyConfig,
    federation_cfg: FederationConfig,
    expected: dict[str, tuple[int, ...]],
    on_screened: Callable[[int, RoundScreening], None],
    on_round_end: Callable[[int, dict | None, dict | None], None] | None = None,
    privacy_cfg: PrivacyConfig | None = None,
    round_offset: int = 0,
) -> "ScreenedStrategy":
    """The configured Flower strategy behind StoreFed's reply screening (and central DP, if configured).

    ``on_screened(round, screening)`` sees every round's replies before aggregation (it may raise
    to stop the run); ``on_round_end(round, train_metrics, eval_metrics)`` gets the aggregated
    metrics once the round's evaluation is done. ``round_offset``: rounds already done (a resumed
    run): Flower counts from 1 again, merchants, metrics and ledgers see ``offset + Flower's round``.
    """
    name = strategy_cfg.name
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name={name!r} is unknown: choose one of {sorted(STRATEGIES)}")
    num_stores = int(federation_cfg.num_stores)
    configured = int(federation_cfg.stores_per_round)
    eval_per_round = federation_cfg.evaluated_per_round()
    if not 1 <= configured <= num_stores or not 0 <= eval_per_round <= num_stores:
        raise ValueError(
            f"federation.stores_per_round={configured} and eval_stores_per_round={eval_per_round} "
            f"must lie in 1..num_stores={num_stores}"
        )
    per_round = federation_cfg.sampled_per_round()  # stores_per_round, over-selected for dropouts
    privacy_cfg = privacy_cfg or PrivacyConfig()
    check_privacy_options(privacy_cfg, name, num_stores)
    central_mode = privacy_cfg.central
    options = {k: v for k, v in dataclasses.asdict(strategy_cfg).items() if k != "name"}
    if central_mode != "none":
        options |= {"weighted_by_key": WEIGHT_KEY, "train_metrics_aggr_fn": real_replies_metrics}
    else:
        options |= {"train_metrics_aggr_fn": aggregate_train_metrics}
    inner = STRATEGIES[name](
        fraction_train=per_round / num_stores,
        fraction_evaluate=eval_per_round / num_stores,
        min_train_nodes=per_round,
        min_evaluate_nodes=eval_per_round,
        min_available_nodes=num_stores,
        **options,
    )
    central = CentralDP(privacy_cfg, inner, per_round, num_stores) if central_mode != "none" else None
    return ScreenedStrategy(inner, expected, on_screened, on_round_end, central, federation_cfg.max_update_norm,
                            round_offset, float(federation_cfg.round_timeout_s),
                            federation_cfg.update_encoding != "float32")


class ScreenedStrategy(Strategy):
    """Screens replies (server/screening.py) before Flower's strategy, or Flower's DP wrapper, aggregates.

    Keeps the latest aggregated model in ``latest_arrays`` so a run stopped early (client-level
    budget exhausted) still saves what it released.
    """

    def __init__(
        self,
        inner: Strategy,
        expected: dict[str, tuple[int, ...]],
        on_screened: Callable[[int, RoundScreening], None],
        on_round_end: Callable[[int, dict | None, dict | None], None] | None,
        central: CentralDP | None,
        max_update_norm: float | None = None,
        round_offset: int = 0,
        round_timeout_s: float | None = None,
        encoded_updates: bool = False,
    ) -> None:
        super().__init__()
        self.encoded_updates = encoded_updates  # federation.update_encoding != float32: decode before screening
        self.round_timeout_s = round_timeout_s
        self._asked: set[int] = set()  # nodes asked to train this round
        self.inner, self.expected, self.central, self.max_update_norm = inner, expected, central, max_update_norm
        self.round_offset = round_offset
        self.on_screened, self.on_round_end = on_screened, on_round_end
        self.aggregator: Strategy = central.wrapper if central else inner
        # Evaluation metrics are not released under central DP: weighted by examples, as without it.
        self.evaluation: Strategy = FedAvg() if central else inner
        self.latest_arrays: ArrayRecord | None = None
        self._current = ArrayRecord()
        self._latest_train: dict[int, dict] = {}  # aggregated train metrics of rounds not yet evaluated

    def start_round(self, arrays: ArrayRecord) -> None:
        """The model this round starts from (set by ``configure_train``; harnesses that skip it call this)."""
        self._current = arrays

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.central:
            self.central.before_round()
        self._current = arrays
        messages = list(self.aggregator.configure_train(server_round + self.round_offset, arrays, config, grid))
        self._asked = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        if self.encoded_updates:
            start = self._current.to_torch_state_dict()
            for msg in replies:
                if not msg.has_error() and "arrays" in msg.content.array_records:
                    decoded = decode_update(msg.content.array_records["arrays"].to_torch_state_dict(), start)
                    msg.content["arrays"] = ArrayRecord(decoded)
        screening = screen_train_replies(replies, self.expected, self._current, self.max_update_norm)
        for node in sorted(self._asked - {m.metadata.src_node_id for m in replies}):
            screening.failed[node] = f"no reply within federation.round_timeout_s={self.round_timeout_s:g}"
        self.on_screened(server_round, screening)
        if not screening.accepted:
            return None, None
        cohort = self.central.cohort(screening.accepted, self._current) if self.central else screening.accepted
        arrays, metrics = self.aggregator.aggregate_train(server_round, cohort)
        metrics = dict(metrics) if metrics else {}
        metrics.pop(WEIGHT_KEY, None)
        if self.central and arrays is not None:
            metrics |= self.central.after_release()
        if arrays is not None:
            self.latest_arrays = arrays
        self._latest_train[server_round] = metrics
        return arrays, MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.aggregator.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = self.evaluation.aggregate_evaluate(server_round, replies)
        if self.on_round_end is not None:
            self.on_round_end(server_round, self._latest_train.pop(server_round, None), dict(metrics) if metrics else None)
        return metrics

    def summary(self) -> None:
        self.aggregator.summary()
