"""The coordinator's checkpoint after every round, and resuming a run from it (``resume=true``).

``<run dir>/checkpoint/`` holds, for the last complete round R: the global model
(``model-R.safetensors``), the strategy's state (``strategy-R.safetensors``: FedAdam/FedYogi/FedAdagrad
moments; empty for stateless strategies) and ``state.json`` (R, the client-level accountant's
releases and clipping norm, each merchant's epsilon so far, how many merchants trained). The tensor
files are written first; ``state.json`` is written last, atomically, and names them: it is the
commit point, so a crash at any moment leaves the previous complete checkpoint in force.

A run directory whose ``status.json`` says ``running`` records the process id and host that own it:
``run_owner_alive`` tells a live run from one left behind by a dead process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storefed.atomic_files import atomic_write_bytes, atomic_write_text

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
OPTIMIZER_STATE = ("m_t", "v_t")  # Flower's FedOpt family keeps its moments here


@dataclasses.dataclass
class Checkpoint:
    server_round: int  # the last complete round
    model: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]  # "<attribute>/<array name>" -> tensor
    central: dict | None  # client-level DP: {"releases": n, "clipping_norm": c}
    merchant_epsilon: dict[str, float]
    trained: int  # merchant updates accepted so far


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    model_file, strategy_file = f"model-{ckpt.server_round}.safetensors", f"strategy-{ckpt.server_round}.safetensors"
    atomic_write_bytes(folder / model_file, save_safetensors(_contiguous(ckpt.model)))
    atomic_write_bytes(folder / strategy_file, save_safetensors(_contiguous(ckpt.strategy_state)))
    state = {"round": ckpt.server_round, "model": model_file, "strategy": strategy_file, "central": ckpt.central,
             "merchant_epsilon": ckpt.merchant_epsilon, "trained": ckpt.trained}
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=2))
    for old in folder.glob("*.safetensors"):  # only the committed round's files are kept
        if old.name not in (model_file, strategy_file):
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete round's checkpoint, or None when the run has none; ValueError when it is damaged."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        model = load_safetensors((folder / state["model"]).read_bytes())
        strategy = load_safetensors((folder / state["strategy"]).read_bytes())
        return Checkpoint(int(state["round"]), model, strategy, state.get("central"),
                          {str(k): float(v) for k, v in state["merchant_epsilon"].items()}, int(state["trained"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"the checkpoint in {folder} is damaged ({exc}): resume is impossible; start a new run_dir")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def strategy_state(strategy: object) -> dict[str, torch.Tensor]:
    """The optimizer moments of a FedOpt-family strategy (nothing for stateless ones)."""
    out = {}
    for attribute in OPTIMIZER_STATE:
        for name, array in (getattr(strategy, attribute, None) or {}).items():
            out[f"{attribute}/{name}"] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def restore_strategy_state(strategy: object, state: dict[str, torch.Tensor]) -> None:
    for attribute in OPTIMIZER_STATE:
        moments = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(f"{attribute}/")}
        if moments:
            setattr(strategy, attribute, moments)


def owner() -> dict:
    """Who runs this run: written into ``status.json`` while it is running."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def run_owner_alive(status: dict) -> bool | None:
    """True/False for a ``running`` status owned by a process on this host; None when it cannot be told."""
    pid, host = status.get("pid"), status.get("host")
    if status.get("status") != "running" or not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
