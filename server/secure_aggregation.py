"""A federated run under secure aggregation (Flower SecAgg+): the coordinator learns only the sum.

Flower 1.39 offers SecAgg+ only in its legacy workflow API, so this run uses ``LegacyContext`` +
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy strategy, and the same
model, merchants (``storefed.client.client_app:app``), run log, checkpoint and status files as ``_run``.

Who sees what (coordinator honest-but-curious, i.e. it runs this code; fewer than
``reconstruction_threshold`` merchants of a neighbourhood collude with it):
- the coordinator learns, per round, the weighted mean ``sum_i w_i u_i / sum_i w_i`` of the
  merchants' updates (``u_i``: trained shared tensors minus the global ones, ``w_i u_i / max_weight``
  clipped to ``+-secagg_clipping_range`` and stochastically quantized) and the total weight; ``w_i`` is the merchant's ``num-examples`` (capped at
  ``secagg_max_weight``). Each merchant's train metrics (examples, loss, epsilon, refusal) still
  arrive in plaintext, so it also knows every ``w_i``, hence the weighted sum: never one ``x_i``.
- it cannot screen individual updates (names, shapes, NaN: ``server/screening.py``): shapes are
  forced by the protocol, and each merchant refuses to mask a non-finite update (it drops out).
- a sum over one trained merchant is that merchant's update: a round with fewer than two merchants
  that trained is skipped before unmasking (refusals take part with weight zero).
- dropouts up to the threshold are unmasked from the others' shares; beyond it the round is
  skipped with the reason logged; a run in which no round could be aggregated fails.
The record-level DP of every update (local DP-SGD, merchants' ledgers) is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAdam, FedAvg, FedProx
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log as flwr_log

from storefed.atomic_files import atomic_write_text
from storefed.config.schema import FederationConfig, PrivacyConfig, RunConfig
from storefed.models.saved_model import save_global_model
from storefed.server.distributed_secagg import build_distributed_strategy, integer_range
from storefed.server.progress import RoundDisplay
from storefed.server.run_log import RunLog, budget_summary, epsilon_columns
from storefed.server.run_setup import RunFailed, prepare_run, write_status
from storefed.server.strategy import aggregate_train_metrics
from storefed.wire import SHARED_KEYS

LEGACY_STRATEGIES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedprox": FedProx}
MODULUS_RANGE = 2**32  # Flower's mask modulus (its maximum)
MIN_CONTRIBUTORS = 2
SCREENING_NOTE = (
    "secure aggregation: the coordinator sees only the weighted sum of updates and cannot screen individual "
    "updates (names, shapes, NaN); merchants check finiteness before masking"
)


@dataclass(frozen=True)
class SecAggOptions:
    """SecAgg+ parameters (``privacy.secagg_*``); ints count shares, floats in (0, 1] are fractions."""

    num_shares: int | float = 3
    reconstruction_threshold: int | float = 2
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0
    timeout_s: float | None = None


def secagg_options(privacy: PrivacyConfig, federation: FederationConfig) -> SecAggOptions:
    """Options from config (defaults when a key is absent); a clear error for unusable values."""
    opts = SecAggOptions(
        num_shares=privacy.secagg_num_shares,
        reconstruction_threshold=privacy.secagg_reconstruction_threshold,
        clipping_range=float(privacy.secagg_clipping_range),
        quantization_range=int(privacy.secagg_quantization_range),
        max_weight=float(privacy.secagg_max_weight),
        timeout_s=privacy.secagg_timeout_s,
    )
    per_round = int(federation.stores_per_round)
    if str(privacy.central) != "none":
        raise ValueError(
            f"privacy.secure_aggregation=true cannot be combined with privacy.central={privacy.central}: "
            "client-level DP clips each merchant's update on the coordinator, which sees only the sum under "
            "secure aggregation; use one of the two"
        )
    if per_round < MIN_CONTRIBUTORS:
        raise ValueError(
            f"privacy.secure_aggregation=true needs federation.stores_per_round >= {MIN_CONTRIBUTORS} "
            f"(got {per_round}): a sum over one merchant is that merchant's update"
        )
    if privacy.mode == "distributed":
        opts = distributed_options(opts, federation)
    if per_round * opts.quantization_range >= MODULUS_RANGE:
        raise ValueError(
            f"privacy.secagg_quantization_range={opts.quantization_range} with federation.stores_per_round={per_round} "
            f"overflows SecAgg+'s 2**32 modulus: keep stores_per_round * quantization_range below 2**32"
        )
    threshold, shares = opts.reconstruction_threshold, opts.num_shares
    neighbours = min(shares, per_round) if isinstance(shares, int) else per_round
    if isinstance(threshold, int) and threshold > neighbours:
        raise ValueError(
            f"privacy.secagg_reconstruction_threshold={threshold} exceeds the {neighbours} merchants that hold "
            f"shares of each key (secagg_num_shares={shares}, stores_per_round={per_round}): no round could be unmasked"
        )
    build_workflow(opts, lambda server_round, reason: None)  # Flower's own checks, at config time
    return opts


def distributed_options(opts: SecAggOptions, federation: FederationConfig) -> SecAggOptions:
    """privacy.mode=distributed: integer messages in [-R, R], quantization range 2R (exact), weight 1 each."""
    bound = integer_range(federation.stores_per_round)
    return dataclasses.replace(opts, clipping_range=float(bound), quantization_range=2 * bound, max_weight=1.0)


def build_workflow(
    opts: SecAggOptions, on_halt: Callable[[int, str], None], min_shares: int | None = None
) -> LoggedSecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with these options; its errors name the config keys. ``min_shares``
    (distributed mode): a round with fewer collected messages is halted before unmasking."""
    try:
        return LoggedSecAggPlusWorkflow(
            on_halt, min_shares, opts.num_shares, opts.reconstruction_threshold, max_weight=opts.max_weight,
            clipping_range=opts.clipping_range, quantization_range=opts.quantization_range,
            modulus_range=MODULUS_RANGE, timeout=opts.timeout_s,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"privacy.secagg_num_shares / secagg_reconstruction_threshold / secagg_*: {exc}") from exc


class LoggedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit workflow that says why a round halted, and never unmasks a sum of one."""

    def __init__(self, on_halt: Callable[[int, str], None], min_shares: int | None, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_halt = on_halt  # (round, reason) -> None
        self.min_shares = min_shares
        self.dropped: dict[int, int] = {}  # round -> sampled merchants whose masked vector never arrived
        self._asked = 0

    def __call__(self, grid: Grid, context: Context) -> None:
        state = WorkflowState()
        stages = (
            ("setup", self._setup_then_count),
            ("share keys", self.share_keys_stage),
            ("collect masked vectors", self._collect_then_count),
            ("unmask", self.unmask_stage),
        )
        for name, stage in stages:
            if not stage(grid, context, state):
                self.on_halt(_current_round(context), self._halt_reason(name, state))
                return

    def _setup_then_count(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ready = self.setup_stage(grid, context, state)
        self._asked = len(getattr(state, "nid_to_fitins", None) or state.sampled_node_ids)  # sampled this round
        return ready

    def _collect_then_count(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        collected = self.collect_masked_vectors_stage(grid, context, state)
        self.dropped[_current_round(context)] = max(self._asked - len(state.legacy_results), 0)
        if not collected:
            return False
        if self.min_shares is not None:  # distributed: every message carries a noise share
            collected = len(state.legacy_results)
            state.too_few_shares = (collected, self.min_shares) if collected < self.min_shares else None
            return state.too_few_shares is None
        trained = sum(1 for _, res in state.legacy_results if res.num_examples > 0)
        state.too_few_trained = trained if trained < MIN_CONTRIBUTORS else None
        return state.too_few_trained is None

    @staticmethod
    def _halt_reason(stage: str, state: WorkflowState) -> str:
        if getattr(state, "too_few_shares", None) is not None:
            collected, needed = state.too_few_shares
            return (
                f"only {collected} of the {needed} noise shares the round needs arrived (privacy.min_survivors): "
                f"the sum would be under-noised, so the round was not unmasked"
            )
        if getattr(state, "too_few_trained", None) is not None:
            return (
                f"only {state.too_few_trained} merchant(s) trained (the rest refused): the sum would reveal an "
                f"individual update, so the round was not unmasked"
            )
        return (
            f"secure aggregation halted at stage '{stage}': {len(state.active_node_ids)} of "
            f"{len(state.sampled_node_ids)} sampled merchants still active, reconstruction threshold "
            f"{state.threshold} of {state.num_shares} shares ({len(state.failures)} failures: "
            f"{_first_failure(state.failures)})"
        )


def _first_failure(failures: list) -> str:
    return str(failures[0])[:300] if failures else "none reported"


def _current_round(context: Context) -> int:
    return int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])


def build_legacy_strategy(settings: RunConfig, initial: list[np.ndarray], fit_config: dict, on_fit) -> FedAvg:
    """The configured strategy in Flower's legacy API, sampling as ``server/strategy.build_strategy``."""
    cfg = dataclasses.asdict(settings.strategy)
    name = cfg.pop("name")
    if name not in LEGACY_STRATEGIES:
        raise ValueError(f"strategy.name={name!r} is unknown: choose one of {sorted(LEGACY_STRATEGIES)}")
    federation = settings.federation
    num_stores, per_round = int(federation.num_stores), int(federation.stores_per_round)
    if not 1 <= per_round <= num_stores:
        raise ValueError(f"federation.stores_per_round={per_round} must lie in 1..num_stores={num_stores}")
    if name == "fedprox":
        fit_config = fit_config | {"proximal-mu": float(cfg["proximal_mu"])}

    class SecureStrategy(LEGACY_STRATEGIES[name]):  # type: ignore[misc, valid-type]
        current: list[np.ndarray] = []  # the global model sent this round

        def configure_fit(self, server_round: int, parameters, client_manager):
            self.current = parameters_to_ndarrays(parameters)
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list):
            """``results`` all carry the same unmasked weighted mean *update*; refusals (weight 0) set aside.

            global + mean update = the examples-weighted mean of the models, handed to the strategy as
            every trained merchant's model (FedAvg then returns it; FedAdam steps from it).
            """
            trained = [(proxy, res) for proxy, res in results if res.num_examples > 0]
            metrics = on_fit(server_round, results, failures)
            if not trained:
                return None, {}
            mean_update = parameters_to_ndarrays(trained[0][1].parameters)
            model = ndarrays_to_parameters(
                [_as_dtype(g + u, g.dtype) for g, u in zip(self.current, mean_update, strict=True)]
            )
            for _, res in trained:
                res.parameters = model
            parameters, _ = super().aggregate_fit(server_round, trained, [])
            return parameters, metrics

    return SecureStrategy(
        fraction_fit=per_round / num_stores,
        fraction_evaluate=0.0,  # evaluation runs in the Message API (MessageEvaluation), as in plain runs
        min_fit_clients=per_round,
        min_evaluate_clients=0,
        min_available_clients=num_stores,
        on_fit_config_fn=lambda server_round: fit_config | {"server-round": server_round},
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=lambda _: {},  # StoreFed's own, in SecureRoundLog.on_fit
        **cfg,
    )


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The model's own dtype (dequantized sums are float64: float32 models stay float32 on the wire)."""
    return (values if np.issubdtype(dtype, np.floating) else np.rint(values)).astype(dtype)


class SecureRoundLog:
    """Feeds legacy SecAgg+ rounds into ``RunLog``: trained / refused / failed, epsilons, halts."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.train: dict[int, dict] = {}
        self.halted: dict[int, str] = {}
        self.aggregated: list[int] = []
        self.dropped: dict[int, int] = {}  # filled by the SecAgg+ workflow (LoggedSecAggPlusWorkflow.dropped)

    def on_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list) -> dict:
        trained = [(p, r) for p, r in results if r.num_examples > 0 and not r.metrics.get("refused", 0)]
        failures = _distinct(failures)
        dropped = max(self.dropped.get(server_round, 0) - len(failures), 0)
        failures += ["no masked vector within the SecAgg+ stage (dropped out)"] * dropped
        refused = {p.node_id: str(r.metrics.get("privacy.refusal", "no reason given")) for p, r in results
                   if r.num_examples == 0 or r.metrics.get("refused", 0)}
        row = {"round": server_round, "trained": len(trained), "refused": len(refused), "failed": len(failures),
               "rejected": 0, "secure_aggregation": "aggregated"}
        if trained and self.log.dp:
            row.update(epsilon_columns([float(r.metrics["epsilon_total"]) for _, r in trained]))
            row["delta"] = max(float(r.metrics["delta"]) for _, r in trained)
        for proxy, res in trained:
            self.log.merchant_epsilon[str(proxy.node_id)] = float(res.metrics["epsilon_total"])
        for node, reason in refused.items():
            self.log.note(f"  round {server_round}: merchant node {node} refused: {reason}")
        for failure in failures:
            self.log.note(f"  round {server_round}: a merchant failed or dropped out: {str(failure)[:300]}")
        self.log.pending[server_round] = row
        self.aggregated.append(server_round)
        metrics = _train_metrics(trained)
        self.train[server_round] = metrics
        return metrics

    def on_halt(self, server_round: int, reason: str) -> None:
        self.halted[server_round] = reason
        self.log.pending[server_round] = {"round": server_round, "secure_aggregation": f"skipped: {reason}",
                                          "failed": self.dropped.get(server_round, 0)}
        self.log.note(f"  round {server_round}: SKIPPED, global model unchanged: {reason}")
        flwr_log(INFO, "StoreFed: round %s skipped: %s", server_round, reason)

    def on_round_end(self, server_round: int, evaluate: dict | None) -> None:
        self.log.on_round_end(server_round, self.train.pop(server_round, None), evaluate)


def _distinct(failures: list) -> list:
    """One entry per failed node: Flower's masked-vector stage records each failure twice."""
    seen, out = set(), []
    for failure in failures:
        key = id(failure.args[0]) if isinstance(failure, Exception) and failure.args else id(failure)
        if key not in seen:
            seen.add(key)
            out.append(failure)
    return out


def _train_metrics(trained: list[tuple[ClientProxy, FitRes]]) -> dict:
    """As in plain runs (``aggregate_train_metrics``): sums of counts, max epsilon, weighted means."""
    records = [
        RecordDict({"metrics": MetricRecord({k: v for k, v in r.metrics.items() if isinstance(v, (int, float))})})
        for _, r in trained
    ]
    return dict(aggregate_train_metrics(records, "num-examples")) if records else {}


class MessageEvaluation:
    """Evaluate workflow: the plain run's federated evaluation (Message API, same ClientApp handler)."""

    def __init__(self, names: list[str], dtypes: dict[str, torch.dtype], config: ConfigRecord,
                 per_round: int, round_log: SecureRoundLog) -> None:
        self.names, self.dtypes, self.config, self.per_round, self.round_log = names, dtypes, config, per_round, round_log

    def __call__(self, grid: Grid, context: Context) -> None:
        server_round = _current_round(context)
        metrics = None
        if self.per_round > 0:
            state = global_state(context, self.names, self.dtypes)
            nodes = context.client_manager.sample(num_clients=self.per_round, min_num_clients=self.per_round)
            config = ConfigRecord(dict(self.config) | {"server-round": server_round})
            messages = [
                Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), proxy.node_id, "evaluate",
                        group_id=str(server_round))
                for proxy in nodes
            ]
            replies = [m.content for m in grid.send_and_receive(messages) if not m.has_error()]
            metrics = dict(aggregate_metricrecords(replies, "num-examples")) if replies else None
        self.round_log.on_round_end(server_round, metrics)


def global_state(context: Context, names: list[str], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The current global model (named, original dtypes) from the legacy workflow's state."""
    arrays = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    )
    out = {}
    for name, array in zip(names, arrays, strict=True):
        dtype = dtypes[name]
        tensor = torch.from_numpy(np.array(array))
        out[name] = tensor.round().to(dtype) if not dtype.is_floating_point else tensor.to(dtype)
    return out


def run_secure_federation(grid: Grid, context: Context, settings: RunConfig, run_dir: Path,
                          display: RoundDisplay | None = None) -> dict:
    """``run_federation`` under SecAgg+: status.json ``running`` -> ``completed`` | ``failed`` (reason)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, "running")
    try:
        summary = _run_secure(grid, context, settings, run_dir, display)
    except BaseException as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        raise
    write_status(run_dir, "completed")
    return summary


def _run_secure(grid: Grid, context: Context, settings: RunConfig, run_dir: Path,
                display: RoundDisplay | None = None) -> dict:
    setup = prepare_run(settings, run_dir)
    to_clients, catalog, task, state = setup.to_clients, setup.catalog, setup.task, setup.shared
    privacy, federation = to_clients.privacy, settings.federation
    opts = secagg_options(settings.privacy, federation)
    distributed = setup.skellam is not None
    if distributed:
        opts = distributed_options(opts, federation)
    names = list(state)
    dtypes = {k: state[k].dtype for k in names}
    released = getattr(task, "released", False)
    log = RunLog(run_dir, task.name, task.privacy_unit, privacy.accountant, bool(privacy.enabled), distributed,
                 "none (every unit, q = 1)" if released else "Poisson", display, budget_summary(privacy))
    round_log = SecureRoundLog(log)
    log.note(f"[{task.name}] {SCREENING_NOTE}")
    flwr_log(INFO, "StoreFed: %s", SCREENING_NOTE)

    round_record = to_clients.to_record()
    fit_config = round_record | {SHARED_KEYS: json.dumps(names)}
    initial = [state[k].detach().cpu().numpy() for k in names]
    if distributed:
        strategy = build_distributed_strategy(settings, state, setup.skellam, float(privacy.sample_rate), fit_config,
                                              round_log.on_fit, task, setup.prior)
    else:
        strategy = build_legacy_strategy(settings, initial, fit_config, round_log.on_fit)
    rounds = int(federation.rounds)
    eval_per_round = federation.evaluated_per_round()
    fit_workflow = build_workflow(
        opts, round_log.on_halt, (settings.privacy.min_survivors or federation.stores_per_round) if distributed else None,
    )
    round_log.dropped = fit_workflow.dropped
    workflow = DefaultWorkflow(
        fit_workflow=fit_workflow,
        evaluate_workflow=MessageEvaluation(names, dtypes, ConfigRecord(round_record), eval_per_round, round_log),
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    started = time.time()
    log.start(rounds)
    workflow(grid, legacy)
    if not round_log.aggregated:
        last = max(round_log.halted) if round_log.halted else rounds
        raise RunFailed(f"no round could be securely aggregated; round {last}: {round_log.halted.get(last, 'no replies')}")
    final = global_state(legacy, names, dtypes)
    saved = save_global_model(run_dir, final, to_clients.task, catalog.num_items, task)
    summary = {
        "task": task.name,
        "rounds": rounds,
        "rounds_completed": len(round_log.aggregated),
        "rounds_skipped": {str(r): reason for r, reason in sorted(round_log.halted.items())},
        "seconds": round(time.time() - started, 1),
        "final_eval": log.rows[-1] if log.rows else {},
        "privacy": log.privacy_summary() | {"secure_aggregation": secure_summary(opts)},
        **saved,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def secure_summary(opts: SecAggOptions) -> dict:
    return {
        "protocol": "Flower SecAgg+ (legacy workflow API), honest-but-curious coordinator",
        "coordinator_sees": "per round: the examples-weighted mean of the trained merchants' updates (model - global) "
                            "and the total weight; each merchant's train metrics in plaintext; never an individual update",
        "screening": SCREENING_NOTE,
        "num_shares": opts.num_shares,
        "reconstruction_threshold": opts.reconstruction_threshold,
        "clipping_range": opts.clipping_range,
        "quantization_range": opts.quantization_range,
        "max_weight": opts.max_weight,
        "quantization_step": 2 * opts.clipping_range / opts.quantization_range,
        "min_trained_per_round": MIN_CONTRIBUTORS,
    }
