"""Ray worker start-up hook for simulations: import the merchant stack once per worker process.

Flower's Ray backend starts its ClientApp actors with the simulation, but an actor imports the
ClientApp (torch, opacus, flwr, transformers' configs, StoreFed's models) only when its first message
arrives, so round 1 used to pay for every actor's imports. Ray runs this hook as each worker process
starts (``runtime_env["worker_process_setup_hook"]``, simulations/ray_cluster.py), while the coordinator
is still setting up.
"""

from __future__ import annotations


def import_merchant_stack() -> None:
    import storefed.client.client_app  # noqa: F401  (the ClientApp and everything it trains with)
