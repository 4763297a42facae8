"""Simulated merchant failures (``federation.failure_rate``, ``federation.failure_mode``), one place for
both the plain ClientApp and the SecAgg+ path (``client/secure_train.py``).

A failure is drawn reproducibly from (run, seed, round, partition): the same run fails the same
merchants in the same rounds. Simulation only: ``storefed server`` refuses a failure rate.
"""

from __future__ import annotations

import hashlib
import time

from storefed.wire import RoundConfig


def injected_failure(config: RoundConfig, server_round: int, node_config: dict) -> bool:
    """Whether this simulated merchant fails this round, reproducibly."""
    if config.failure_rate <= 0:
        return False
    digest = hashlib.sha256(f"{config.run_id}|{config.seed}|{server_round}|{node_config.get('partition-id')}".encode())
    return int.from_bytes(digest.digest()[:8], "big") / 2**64 < config.failure_rate


def fail_if_injected(config: RoundConfig, server_round: int, node_config: dict) -> None:
    """Raise (after hanging past the round timeout, for ``failure_mode=hang``) when this call is to fail."""
    if injected_failure(config, server_round, node_config):
        if config.failure_hang_s > 0:
            time.sleep(config.failure_hang_s)
        raise RuntimeError(f"injected failure (federation.failure_rate={config.failure_rate:g})")
