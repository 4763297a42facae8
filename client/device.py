"""Where a merchant trains: CUDA when present (unless configured otherwise), else CPU."""

from __future__ import annotations

import torch


def choose_device(preference: str = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when available; ``cuda`` without a GPU is a clear error."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={preference} was requested but no CUDA GPU is visible: use device=auto or cpu")
    if preference.startswith("cuda") or preference == "cpu":
        return torch.device(preference)
    raise ValueError(f"device={preference!r} is unknown: choose auto, cpu or cuda[:N]")
