"""How a merchant's update travels: float32 as trained, or compressed after the DP noise.

``federation.update_encoding``:

- ``float32``: the shared tensors as they are (the default);
- ``float16``: each tensor rounded to half precision (2x smaller);
- ``int8``: each tensor's *difference from the global model it started from*, scaled per tensor to
  [-127, 127] by its largest magnitude and rounded **stochastically** (unbiased: E[decoded] = the
  update), sent as int8 plus one float32 scale per tensor (about 4x smaller).

Compression happens after DP-SGD added its noise, on the released update only: it is
post-processing, so every privacy guarantee is unchanged. The coordinator decodes each reply back
to float32 before screening and aggregation. Under secure aggregation the update already travels as
integers of ``privacy.secagg_bits`` and this option is refused.
"""

from __future__ import annotations

import torch

ENCODINGS = ("float32", "float16", "int8")
SCALE_SUFFIX = "::int8_scale"  # the extra tensor carrying one int8-encoded tensor's scale


def encode_update(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor], encoding: str,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The tensors to send for ``update`` (trained from ``start``, the global model received)."""
    if encoding == "float32":
        return update
    if encoding == "float16":
        return {name: value.to(torch.float16) for name, value in update.items()}
    if encoding != "int8":
        raise ValueError(f"federation.update_encoding={encoding!r} is unknown: choose one of {ENCODINGS}")
    out: dict[str, torch.Tensor] = {}
    for name, value in update.items():
        delta = value.detach().to(torch.float32) - start[name].detach().to(torch.float32)
        scale = delta.abs().max().clamp_min(1e-30) / 127.0
        scaled = delta / scale
        floor = scaled.floor()
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
        out[name] = (floor + (noise < (scaled - floor)).to(floor.dtype)).clamp(-127, 127).to(torch.int8)
        out[name + SCALE_SUFFIX] = scale.reshape(1).to(torch.float32)
    return out


def decode_update(received: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 tensors with the global model's names, from any encoding ``encode_update`` writes."""
    out: dict[str, torch.Tensor] = {}
    for name, value in received.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = received.get(name + SCALE_SUFFIX)
        if scale is not None and value.dtype == torch.int8 and name in start:
            out[name] = start[name].to(torch.float32) + value.to(torch.float32) * scale.to(torch.float32)
        else:
            out[name] = value.to(torch.float32)
    return out


def encoded_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload bytes of the tensors (what an ArrayRecord carries, without framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
