"""StoreFed: privacy-preserving federated learning for e-commerce merchants (Flower + Opacus).

Layers, each importing only those below it (tests/test_layers.py checks this):
``storefed.config`` -> ``storefed.data`` -> ``storefed.models`` -> ``storefed.privacy`` ->
``storefed.wire`` / ``storefed.flower_env`` -> ``storefed.client``, ``storefed.server`` ->
``storefed.simulations`` -> ``storefed.cli``.
"""

__version__ = "0.2.0"
