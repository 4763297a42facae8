"""Client-level central DP at the coordinator: Flower's DP strategy wrappers, made to survive dropouts.

``privacy.central``:

- ``fixed``: Flower's ``DifferentialPrivacyServerSideFixedClipping`` with Flower's ``RdpAccountant``.
  Each round's release is ``(sum of the n sampled merchants' updates, each clipped by the coordinator
  to L2 norm C) + N(0, (z*C)^2)``, divided by n. Guarantee: (epsilon, delta) **client-level** DP —
  neighbouring = one merchant's whole contribution added or removed — composed over the releases by
  RDP (Flower's accountant over dp-accounting), **without** amplification by sampling (Flower's
  node sampling is not Poisson). The run stops before a release would exceed ``central_epsilon``.
- ``adaptive``: Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` (Andrew et al. 2021): the
  clipping bound follows a noisy quantile of update norms. Flower provides no accountant for it;
  StoreFed accounts each round as two Gaussian releases — the update sum (Flower's update noise
  multiplier) and the clipped count (sensitivity 1, Flower adds noise to the raw count) — composed
  by RDP with Flower's accountant, which is conservative.

Who is protected from whom: the release protects every merchant against everyone who sees the
global model (other merchants, model users). The coordinator itself sees individual updates
before clipping (a trusted aggregator); with secure aggregation it would not, but server-side
clipping needs individual updates, so the two options are refused together (see check_privacy_options).

Dropouts: Flower's wrappers need exactly the sampled number of replies and equal weights. StoreFed
samples n merchants; any sampled merchant that fails, refuses (its record-level budget) or sends
an invalid update is replaced by a **zero update** (the current global model) with the same weight,
so every release divides by n and carries noise calibrated to C/n: a fixed-denominator average
(McMahan et al. 2018). The guarantee above holds unchanged; utility drops with the dropout rate.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod
from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from storefed.config.schema import PrivacyConfig

CENTRAL_MODES = ("none", "fixed", "adaptive")
WEIGHT_KEY = "central-dp-weight"  # every merchant's update counts equally under central DP
CENTRAL_STRATEGIES = ("fedavg", "fedprox")



def check_privacy_options(privacy: PrivacyConfig, strategy_name: str, num_stores: int) -> None:
    """Refuse central-DP settings that would not give the stated guarantee (clear messages)."""
    mode = privacy.central
    if mode not in CENTRAL_MODES:
        raise ValueError(f"privacy.central={mode!r} is unknown: choose one of {list(CENTRAL_MODES)}")
    if mode == "none":
        return
    if strategy_name not in CENTRAL_STRATEGIES:
        raise ValueError(
            f"privacy.central={mode} needs strategy=fedavg or fedprox (got strategy={strategy_name}): "
            "Flower's client-level DP wrappers and accountant assume a uniform average of clipped updates"
        )
    if privacy.secure_aggregation:
        raise ValueError(
            f"privacy.central={mode} cannot be combined with privacy.secure_aggregation=true: "
            "the coordinator clips each merchant's update, and secure aggregation hides individual updates. "
            "Choose one of them"
        )
    z, clip = float(privacy.central_noise_multiplier), float(privacy.central_clipping_norm)
    if not z > 0 or not clip > 0:
        raise ValueError(
            f"privacy.central_noise_multiplier={z} and privacy.central_clipping_norm={clip} must both be > 0"
        )
    delta, budget = float(privacy.central_delta), float(privacy.central_epsilon)
    if not 0 < delta < 1 / num_stores:
        raise ValueError(
            f"privacy.central_delta={delta:g} must lie in (0, 1/federation.num_stores={1 / num_stores:g}): "
            "a client-level delta of 1/n or more allows releasing one merchant's update outright"
        )
    if not 0 < budget < math.inf:
        raise ValueError(f"privacy.central_epsilon={budget} must be a finite positive client-level budget")


def client_level_accountant(privacy: PrivacyConfig, num_stores: int):
    """Flower's RDP accountant for client-level releases: add/remove one merchant, no amplification."""
    from flwr.serverapp import RdpAccountant

    config = FlowerPrivacyConfig(
        target_delta=float(privacy.central_delta),
        population_size=num_stores,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=float(privacy.central_epsilon),
    )
    return RdpAccountant(config)


class AndrewAdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the bound moving in the paper's direction.

    Flower 1.39 feeds the noisy fraction of *clipped* updates into Andrew et al.'s rule
    ``C <- C * exp(-lr * (b - target))``, where ``b`` must be the fraction left *unclipped*: when
    every update is clipped its bound shrinks further, towards 0. Here ``b = 1 - clipped``
    (the same noisy count, so the privacy cost is unchanged).
    """

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)


class CentralDP:
    """The configured Flower DP wrapper around ``inner``, plus the bookkeeping Flower leaves out.

    Call ``before_round`` before sampling (raises Flower's ``PrivacyBudgetExhausted`` when the next
    release would exceed the client-level budget), ``cohort`` on the screened replies, and
    ``after_release`` once a noisy aggregate was produced.
    """

    def __init__(self, privacy: PrivacyConfig, inner: Strategy, num_sampled: int, num_stores: int) -> None:
        self.mode = privacy.central
        self.num_sampled = num_sampled
        self.delta = float(privacy.central_delta)
        self.accountant = client_level_accountant(privacy, num_stores)
        self.standins_total = 0
        np.random.seed()  # Flower's wrappers draw noise from numpy's global RNG: fresh OS entropy, never the run seed
        z = float(privacy.central_noise_multiplier)
        if self.mode == "fixed":
            self.wrapper: Strategy = DifferentialPrivacyServerSideFixedClipping(
                inner, z, float(privacy.central_clipping_norm), num_sampled, accountant=self.accountant
            )
        else:
            self.wrapper = AndrewAdaptiveClipping(
                inner, z, num_sampled,
                initial_clipping_norm=float(privacy.central_clipping_norm),
                target_clipped_quantile=float(privacy.central_target_quantile),
                clip_norm_lr=float(privacy.central_clip_norm_lr),
                clipped_count_stddev=max(num_sampled / 20, z),  # Flower needs z < 2*stddev
            )

    @property
    def round_noise_multiplier(self) -> float:
        """Noise std / sensitivity of one round's releases, composed (update sum and, if adaptive, count)."""
        if self.mode == "fixed":
            return self.wrapper.noise_multiplier
        update_z, count_z = self.wrapper.noise_multiplier, self.wrapper.clipped_count_stddev
        return (update_z**-2 + count_z**-2) ** -0.5

    def _event(self) -> GaussianPrivacyEvent:
        cfg = self.accountant.config
        return GaussianPrivacyEvent(self.round_noise_multiplier, self.num_sampled, cfg.population_size)

    def before_round(self) -> None:
        """Adaptive mode checks the budget itself (the fixed wrapper does it in configure_train)."""
        if self.mode == "adaptive" and self.accountant.would_exceed(self._event()):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(
                f"the next release would exceed privacy.central_epsilon (client-level epsilon so far "
                f"{spent.epsilon:.3f} at delta={spent.delta:g})"
            )

    def cohort(self, accepted: list[Message], current: ArrayRecord) -> list[Message]:
        """Exactly ``num_sampled`` equally weighted replies: real updates, then zero-update stand-ins."""
        real = accepted[: self.num_sampled]
        for msg in real:
            msg.content["metrics"][WEIGHT_KEY] = 1.0
            if _unchanged(msg.content["arrays"], current):
                msg.content["arrays"] = _nudged(current)
        template = real[0].content["metrics"]
        standins = [_zero_update(current, template) for _ in range(self.num_sampled - len(real))]
        self.standins_total += len(standins)
        return real + standins

    def after_release(self) -> dict[str, float]:
        """Client-level epsilon so far (per merchant, per run) and the round's clipping bound."""
        if self.mode == "adaptive":
            self.accountant.compose(self._event())
        spent = self.accountant.get_privacy_spent()
        return {
            "client_epsilon": float(spent.epsilon),
            "client_delta": float(spent.delta),
            "client_releases": int(spent.num_releases),
            "central_clipping_norm": float(self.wrapper.clipping_norm),
            "central_noise_multiplier": float(self.round_noise_multiplier),
        }

    def state(self) -> dict:
        """What a checkpoint keeps: releases composed so far and the current clipping norm."""
        return {"releases": int(self.accountant.get_privacy_spent().num_releases),
                "clipping_norm": float(self.wrapper.clipping_norm), "standins_total": self.standins_total}

    def restore(self, state: dict) -> None:
        """Replay a checkpoint: the same release composed ``releases`` times (every round's event is equal)."""
        for _ in range(int(state["releases"])):
            self.accountant.compose(self._event())
        self.wrapper.clipping_norm = float(state["clipping_norm"])
        self.standins_total = int(state.get("standins_total", 0))

    def summary(self) -> dict:
        spent = self.accountant.get_privacy_spent()
        return {
            "mode": self.mode,
            "unit": "merchant (one merchant's whole update per round)",
            "epsilon": float(spent.epsilon) if spent.num_releases else 0.0,
            "delta": float(spent.delta),
            "releases": int(spent.num_releases),
            "accountant": "RDP (Flower RdpAccountant over dp-accounting), no amplification by sampling",
            "noise_multiplier_per_round": float(self.round_noise_multiplier),
            "zero_update_standins": self.standins_total,
            "trust": "the coordinator sees individual updates before clipping (trusted aggregator)",
        }


def _zero_update(current: ArrayRecord, template: MetricRecord) -> Message:
    """A stand-in reply equal to the current global model: contributes a (numerically) zero update.

    Flower's clipping divides by the update's norm, so one value is moved by max(1 ulp, 1e-6) (as is a
    merchant's update that left the model unchanged): data-independent, so it costs no privacy.
    """
    metrics = MetricRecord({key: 0 for key in template.keys()})
    metrics[WEIGHT_KEY] = 1.0
    content = RecordDict({"arrays": _nudged(current), "metrics": metrics})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def _nudged(current: ArrayRecord) -> ArrayRecord:
    """The current model with its first value moved by max(1 ulp, 1e-6) (Flower cannot clip a zero update)."""
    arrays = dict(current.items())
    first = next(iter(arrays))
    values = arrays[first].numpy().copy()
    values.flat[0] += max(np.spacing(np.abs(values.flat[0])), values.dtype.type(1e-6))
    arrays[first] = Array(values)
    return ArrayRecord(arrays)


def _unchanged(arrays: ArrayRecord, current: ArrayRecord) -> bool:
    return all(np.array_equal(arrays[name].numpy(), current[name].numpy()) for name in current.keys())
