"""A merchant's last released update, kept so a resumed coordinator never makes it spend privacy twice.

When a coordinator dies mid-round and resumes (``resume=true``), it asks again for the round it was
in. The merchant may already have trained that round and recorded it in its ledger. Training again
would spend epsilon a second time and write a second ledger entry for the same round. Instead:

- same run, same round, same global model (SHA-256 of its tensors): the cached reply is sent again.
  It is the same released DP output, so resending it costs no privacy;
- the ledger already has that (run, round) but no matching cached reply (a crash between the ledger
  write and the cache write, or another global model): the round is refused, with the reason.

The cache is ``<ledger dir>/replies/<merchant>.<task>.reply.safetensors``, one file per merchant and
task (the latest round only), written atomically after the ledger entry. It holds only what already
left, or was about to leave, the merchant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storefed.atomic_files import atomic_write_bytes
from storefed.privacy.ledger import PrivacyLedger

REPLIES_DIR = "replies"


def input_digest(global_state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the received global model (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(global_state):
        tensor = global_state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _path(ledger: PrivacyLedger) -> Path:
    return Path(ledger.path).parent / REPLIES_DIR / Path(ledger.path).name.replace(".ledger.json", ".reply.safetensors")


def save_reply(ledger: PrivacyLedger, run_id: str, server_round: int, digest: str, metrics: dict,
               arrays: ArrayRecord, privacy: dict) -> None:
    path = _path(ledger)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = {"run_id": run_id, "server_round": server_round, "digest": digest}
    meta = {"key": json.dumps(key), "metrics": json.dumps(metrics), "privacy": json.dumps(privacy)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.to_torch_state_dict().items()}
    atomic_write_bytes(path, save_safetensors(tensors, metadata=meta), mode=0o600)


def replay(ledger: PrivacyLedger, run_id: str, server_round: int, digest: str
           ) -> tuple[tuple[dict, ArrayRecord, dict] | None, str | None]:
    """``(cached reply, None)`` to resend, ``(None, reason)`` to refuse, ``(None, None)`` to train."""
    recorded = any(r.run_id == run_id and int(r.server_round) == int(server_round) for r in ledger.rounds)
    if not recorded:
        return None, None
    path = _path(ledger)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if json.loads(meta.get("key", "{}")) == {"run_id": run_id, "server_round": server_round, "digest": digest}:
            tensors = load_safetensors(path.read_bytes())
            return (json.loads(meta["metrics"]), ArrayRecord(tensors), json.loads(meta["privacy"])), None
    return None, (f"round {server_round} of run {run_id!r} was already trained and recorded in the ledger, but its "
                  "reply is not cached for this global model (the coordinator or this merchant stopped mid-round); "
                  "training it again would spend the privacy budget twice")
