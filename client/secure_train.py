"""The merchant's side of secure aggregation (Flower SecAgg+): same training, only a masked update leaves.

Routing: ``secure_aggregation_router`` is a mod on the ClientApp's train handler. A train message
that carries the SecAgg+ stage record (``secaggplus_configs``) goes through Flower's
``secaggplus_mod``; every other message reaches the normal handler untouched, so one ClientApp
(``storefed.client.client_app:app``) serves plain and secure runs.

The training is the plain round's code (``training_round.train_round``: DP-SGD, ledger, refusals).
What leaves the merchant in a SecAgg+ round, all relayed by the coordinator:
- stage 0/1: two public keys; Shamir shares of its mask seed and key, each encrypted to one
  neighbour (the coordinator cannot read them);
- stage 2: its update (trained shared tensors minus the global ones) times its weight, clipped to ``+-clipping_range``, quantized and
  masked (pairwise masks + a private mask): on its own, uniformly random to the coordinator.
  In plaintext, the same train metrics as a plain round (num-examples, loss, epsilon, refusal);
- stage 3: shares that let the coordinator remove the masks of the *sum* (and of dropped
  neighbours' pairwise masks), never one merchant's private mask together with its pairwise masks.

A refusal (budget exhausted, no data) still completes the protocol with an all-zero update of
weight zero: it changes neither the sum nor the total weight and does not count as a dropout.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common import recorddict_compat as compat

from storefed.client.distributed_round import distributed_share, prior_share, skellam_plan
from storefed.client.fault_injection import fail_if_injected
from storefed.client.training_round import train_round
from storefed.privacy.skellam import noise_bound
from storefed.wire import NUM_EXAMPLES, PROXIMAL_MU, RELEASE_KEY, SERVER_ROUND, SHARED_KEYS, RoundConfig

log = logging.getLogger("storefed.merchant")  # storefed/console.py: shown at a merchant agent, quiet in simulation


def is_secure_aggregation_message(msg: Message) -> bool:
    """A train message of a SecAgg+ round (it carries the protocol's stage record)."""
    return msg.metadata.message_type.split(".")[0] == "train" and RECORD_KEY_CONFIGS in msg.content.config_records


def secure_aggregation_router(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mod: SecAgg+ messages to Flower's ``secaggplus_mod`` (training in ``secure_fit``); others pass through."""
    if msg.has_content() and is_secure_aggregation_message(msg):
        return secaggplus_mod(msg, context, secure_fit)
    return call_next(msg, context)


def secure_fit(msg: Message, context: Context) -> Message:
    """Stage 2 of SecAgg+: train as in a plain round; reply the update (model - global) as a legacy FitRes.

    The mod masks the FitRes parameters and clears them; only the masked vector and the metrics leave.
    A non-finite update is never masked: the merchant fails this round (a dropout) instead.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    round_config = RoundConfig.from_record(config)
    names = json.loads(str(config[SHARED_KEYS]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(arrays):
        raise ValueError(f"SecAgg+ fit: {len(arrays)} arrays but {len(names)} names in '{SHARED_KEYS}'")
    global_state = {name: torch.from_numpy(np.array(a)) for name, a in zip(names, arrays)}
    fail_if_injected(round_config, int(config[SERVER_ROUND]), dict(context.node_config))  # a dropout, in simulation
    if round_config.privacy.mode == "distributed":
        return _distributed_fit(msg, context, round_config, global_state, arrays, int(config[SERVER_ROUND]),
                                str(config.get(RELEASE_KEY, "")))
    proximal_mu = float(config.get(PROXIMAL_MU, 0.0))
    outcome = train_round(round_config, global_state, int(config[SERVER_ROUND]), proximal_mu, dict(context.node_config))

    if outcome.arrays is None:  # refusal: take part with a zero update of weight zero
        update, weight = [np.zeros_like(a) for a in arrays], 0
    else:
        state = {k: v.numpy() for k, v in outcome.arrays.items()}
        if set(state) != set(names):
            raise ValueError("SecAgg+ fit: trained tensor names differ from the coordinator's shared keys")
        update = [state[name] - global_array for name, global_array in zip(names, arrays)]
        if not all(np.isfinite(a).all() for a in update):  # the coordinator cannot screen a masked update
            raise ValueError("SecAgg+ fit: the update has non-finite values: not masked, dropping out of this round")
        weight = _capped_weight(int(outcome.metrics[NUM_EXAMPLES]), context)
        _warn_if_clipped(update, context)
    metrics = dict(outcome.metrics) | {f"privacy.{k}": v for k, v in outcome.privacy.items()}
    fitres = FitRes(Status(Code.OK, "refused" if outcome.arrays is None else "trained"),
                    ndarrays_to_parameters(update), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _distributed_fit(msg: Message, context: Context, round_config: RoundConfig, global_state: dict,
                     arrays: list[np.ndarray], server_round: int, release: str) -> Message:
    """privacy.mode=distributed: the integer message (signal + noise share) as float64 arrays of weight 1;
    SecAgg+'s quantization (range 2R) carries it exactly. A message outside [-R, R] is never sent."""
    bound = int(_protocol_value(context, Key.CLIPPING_RANGE))
    if release == "prior":  # the one-shot popularity release
        share = prior_share(round_config, server_round, dict(context.node_config))
        pieces = [share.message.astype(np.float64)]
    else:
        plan = skellam_plan(round_config, sum(int(a.size) for a in arrays))
        signal_bound = bound - noise_bound(plan)
        if signal_bound < bound // 2:
            raise ValueError(f"distributed round: noise shares need {noise_bound(plan)} of the range {bound}: "
                             "fewer merchants per round or a larger privacy.rounding_overhead")
        share = distributed_share(round_config, global_state, server_round, dict(context.node_config), signal_bound)
        pieces, offset = [], 0
        for a in arrays:
            pieces.append(share.message[offset: offset + a.size].reshape(a.shape).astype(np.float64))
            offset += a.size
    if np.abs(share.message).max() > bound:  # noise tail (probability accounted in delta): drop out
        raise ValueError("distributed round: the message left the secure-aggregation range: dropping out")
    metrics = dict(share.metrics) | {f"privacy.{k}": v for k, v in share.privacy.items()}
    fitres = FitRes(Status(Code.OK, "refused" if share.metrics["refused"] else "trained"),
                    ndarrays_to_parameters(pieces), 1, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _protocol_value(context: Context, key: str) -> float:
    return float(context.state.config_records[RECORD_KEY_STATE][key])


def _capped_weight(weight: int, context: Context) -> int:
    """The weight SecAgg+ can carry without overflow: at most the protocol's ``max_weight``."""
    max_weight = int(_protocol_value(context, Key.MAX_WEIGHT))
    if weight > max_weight:
        log.warning(
            "StoreFed merchant: %d examples exceed SecAgg+ max_weight=%d: weighted as %d in the secure sum "
            "(raise privacy.secagg_max_weight to weight by all examples)", weight, max_weight, max_weight,
        )
    return min(weight, max_weight)


def _warn_if_clipped(update: list[np.ndarray], context: Context) -> None:
    limit = _protocol_value(context, Key.CLIPPING_RANGE)
    largest = max((float(np.abs(a).max()) for a in update if a.size), default=0.0)
    if largest > limit:
        log.warning(
            "StoreFed merchant: an update value of magnitude %.3g exceeds privacy.secagg_clipping_range=%g and "
            "may be clipped before masking (the secure aggregate is then biased): raise the range", largest, limit,
        )
