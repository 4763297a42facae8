"""``$STOREFED_CACHE`` (default ``~/.cache/storefed``): public, recomputable data only (extracted
pretrained encoders, RDP curves of public (sample rate, noise) pairs). Never customer data: a
merchant's derived data (review embeddings) lives next to its ledger."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("STOREFED_CACHE") or Path.home() / ".cache" / "storefed")
