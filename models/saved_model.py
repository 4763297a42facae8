"""The global model on disk: safetensors weights plus the config needed to rebuild it.

Both files are written atomically; the config is written last, so a ``model_config.json``
always describes a complete weights file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from storefed.atomic_files import atomic_write_bytes, atomic_write_text
from storefed.config.schema import TaskConfig
from storefed.models.task import Task

WEIGHTS_FILE = "global_model.safetensors"
CONFIG_FILE = "model_config.json"


def save_global_model(
    run_dir: Path, state: dict[str, torch.Tensor], task_cfg: TaskConfig, num_items: int, task: Task | None = None,
    catalog_file: str | None = None, seed: int = 0,
) -> dict[str, str | None]:
    """Weights + config; for a review model with a standard architecture also ``review_model/``, a
    folder ``transformers.pipeline("text-classification", model=...)`` loads offline.

    Returns what was written, as the run summary lists it: ``model`` and ``review_model`` (None when
    the task has no such export). ``catalog_file``: the catalog the model scores, recorded so the
    folder is usable without a run config (a merchant's copy of the global model)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(run_dir) / WEIGHTS_FILE
    atomic_write_bytes(path, save_safetensors(tensors, metadata={"task": task_cfg.name}))
    config = {"task": dataclasses.asdict(task_cfg), "num_items": num_items}
    if catalog_file is not None:
        config |= {"catalog_file": str(catalog_file), "seed": int(seed)}
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(config, indent=2))
    written: dict[str, str | None] = {"model": str(path), "review_model": None}
    if task is not None and task.name == "review":
        from storefed.models.review_export import EXPORT_DIR, export_review_model, exportable

        if exportable(task) is None:
            written["review_model"] = str(export_review_model(task, tensors, Path(run_dir) / EXPORT_DIR))
    return written


def load_global_model(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and config of a saved global model; clear error when the files are missing."""
    run_dir = Path(run_dir)
    weights, config = run_dir / WEIGHTS_FILE, run_dir / CONFIG_FILE
    if not weights.exists() or not config.exists():
        raise FileNotFoundError(f"{run_dir} has no saved global model ({WEIGHTS_FILE} and {CONFIG_FILE} expected)")
    return load_safetensors(weights.read_bytes()), json.loads(config.read_text(encoding="utf-8"))
