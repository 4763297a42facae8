"""A merchant's review embeddings, computed once and kept on its own disk.

Embeddings are derived from private review texts, so they get the ledger's care: the directory
is created 0700, files are written 0600 through a temp file and a rename (never half-written),
and nothing here leaves the merchant. A file is named by the merchant (hashed) and a key over
the encoder fingerprint and every text, so a changed text or encoder misses the cache and the
merchant's stale file is removed when the new one is written. Inside one process a second,
per-text memory cache means a text is embedded at most once (evaluations rebuild merchants).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path

import numpy as np

from storefed.atomic_files import atomic_write_bytes
from storefed.models.text_encoder import TextEncoder

log = logging.getLogger("storefed.merchant")  # storefed/console.py: shown at a merchant agent, quiet in simulation
_MEMORY: dict[tuple[str, str], np.ndarray] = {}
MEMORY_LIMIT = 500_000  # texts kept in the per-process cache (about 0.8 GB at 384 float32 dims)


def _text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def clear_memory() -> None:
    """Forget the per-process cache (the disk cache stays): what a fresh process sees."""
    _MEMORY.clear()


def texts_key(fingerprint: str, digests: list[str]) -> str:
    """Key of one merchant's embedding file: the encoder and every text's digest, in order."""
    digest = hashlib.sha256(fingerprint.encode())
    for text_digest in digests:
        digest.update(text_digest.encode())
    return digest.hexdigest()[:32]


def cached_embeddings(
    encoder: TextEncoder, texts: list[str], merchant_id: str, cache_dir: str | None, batch_size: int = 64
) -> np.ndarray:
    """``(len(texts), dim)`` float32 features of ``texts``, from the disk / memory cache when present."""
    digests = [_text_digest(t) for t in texts]
    key = texts_key(encoder.fingerprint, digests)
    owner = hashlib.sha256(merchant_id.encode("utf-8")).hexdigest()[:16]
    path = Path(cache_dir) / f"{owner}.{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        try:
            features = np.load(path, allow_pickle=False)
            if features.shape == (len(texts), encoder.dim) and features.dtype == np.float32:
                return features
        except (OSError, ValueError):
            pass  # unreadable or foreign file: recompute and overwrite
    start = time.perf_counter()
    features = _embed_with_memory(encoder, texts, digests, batch_size)
    seconds = time.perf_counter() - start
    if path is not None:
        _store(path, features, owner)
    log.debug("StoreFed: embedded %d reviews in %.1f s (%.0f reviews/s on %s)%s", len(texts), seconds,
             len(texts) / max(seconds, 1e-9), encoder.device, f"; cached in {path.parent}" if path else "")
    return features


def _embed_with_memory(encoder: TextEncoder, texts: list[str], digests: list[str], batch_size: int) -> np.ndarray:
    rows = {d: _MEMORY[(encoder.fingerprint, d)] for d in digests if (encoder.fingerprint, d) in _MEMORY}
    missing = sorted({d: i for i, d in enumerate(digests) if d not in rows}.values())
    if missing:
        fresh = encoder.embed([texts[i] for i in missing], batch_size)
        if len(_MEMORY) + len(missing) > MEMORY_LIMIT:
            _MEMORY.clear()
        for i, row in zip(missing, fresh):
            rows[digests[i]] = _MEMORY[(encoder.fingerprint, digests[i])] = row
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    for i, d in enumerate(digests):
        out[i] = rows[d]
    return out


def _store(path: Path, features: np.ndarray, owner: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    buffer = io.BytesIO()
    np.save(buffer, features, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)
    for stale in path.parent.glob(f"{owner}.*.npy"):
        if stale != path:
            stale.unlink(missing_ok=True)
