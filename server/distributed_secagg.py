"""Distributed DP over Flower's SecAgg+: the integer messages travel exactly, the coordinator steps once.

SecAgg+ maps each value ``v`` in ``[-R, R]`` to ``(v + R) * Q / (2R)`` before masking; with the
quantization range ``Q = 2R`` that map is the identity shift on integers, so an int64 message goes
through masking, unmasking and dequantization **exactly** (tests/test_distributed_dp.py). ``R`` is
sized so that the sum of ``n`` shifted messages stays below the 2**32 mask modulus (no wrap-around):
``2 R n < 2**32`` and, for Flower's int32 rounding, ``2 R < 2**31``. Each merchant clips its integer
*signal* to ``R - noise_bound`` per coordinate (1-Lipschitz: the sensitivity is unchanged); a message
whose noise would still leave ``[-R, R]`` (probability <= d * 2 exp(-48) per merchant and round, which
is added to delta in docs/privacy.md) is not sent: that merchant drops out of the round.

A round whose collected shares are fewer than ``privacy.min_survivors`` is halted **before unmasking**,
so no under-noised sum is ever released.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from storefed.config.schema import RunConfig
from storefed.privacy.skellam import SkellamPlan, decode
from storefed.server.distributed_dp import DistributedUpdate
from storefed.wire import RELEASE_KEY

MAX_RANGE = 2**30 - 1


def integer_range(stores_per_round: int) -> int:
    """R: messages in [-R, R] sum without wrap-around over ``stores_per_round`` merchants."""
    return min(MAX_RANGE, (2**32 - 1) // (2 * stores_per_round + 2))




def build_distributed_strategy(
    settings: RunConfig, shared: dict, plan: SkellamPlan, q: float, fit_config: dict, on_fit,
    task=None, prior: SkellamPlan | None = None,
) -> FedAvg:
    """A legacy strategy whose aggregate_fit applies ``DistributedUpdate`` to the unmasked integer sum.
    With a ``prior`` plan, round 1 is the one-shot popularity release: its sum sets the output bias."""
    names = list(shared)
    update = DistributedUpdate(shared, plan, q, settings.task.optimizer, settings.task.lr)
    federation = settings.federation

    def round_config(server_round: int) -> dict:
        release = {RELEASE_KEY: "prior"} if prior is not None and server_round == 1 else {}
        return fit_config | {"server-round": server_round} | release

    class DistributedStrategy(FedAvg):
        def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list):
            """Every result carries the unmasked mean of the ``n`` integer messages (weight 1 each)."""
            metrics = on_fit(server_round, results, failures)
            if not results:
                return None, {}
            mean = parameters_to_ndarrays(results[0][1].parameters)
            integer_sum = np.rint(np.concatenate([a.ravel() for a in mean]) * len(results)).astype(np.int64)
            if prior is not None and server_round == 1:
                state = update.reset(task.apply_prior(update.state(), decode(integer_sum, prior)))
            elif getattr(task, "released", False):  # the item-item co-occurrence release
                state = update.reset(task.apply_release(update.state(), decode(integer_sum, plan)))
            else:
                population = sum(int(res.metrics.get("num-examples", 0)) for _, res in results)
                state = update.step(integer_sum, population)
            return ndarrays_to_parameters([state[n].numpy() for n in names]), metrics

    return DistributedStrategy(
        fraction_fit=federation.stores_per_round / federation.num_stores,
        fraction_evaluate=0.0,
        min_fit_clients=federation.stores_per_round,
        min_evaluate_clients=0,
        min_available_clients=federation.num_stores,
        on_fit_config_fn=round_config,
        initial_parameters=ndarrays_to_parameters([shared[n].detach().cpu().numpy() for n in names]),
        fit_metrics_aggregation_fn=lambda _: {},
    )
