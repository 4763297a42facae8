"""Coordinator-side screening of merchant replies before aggregation.

- A refusal (``refused=1``, no tensors) is a normal non-participation: logged with its reason.
- An update is accepted only if it carries exactly the expected tensor names and shapes, every
  tensor is float32 (the global model's dtype) with finite values, and it reports a finite,
  whole, positive number of examples of at most ``MAX_EXAMPLES``. Anything else is dropped and
  logged; it never reaches aggregation. With ``federation.max_update_norm`` an update farther than
  that (L2, over all tensors) from the global model it started from is rejected too. (Not checked: a
  weight that is plausible but inflated; robust strategies, fedmedian / fedtrimmedavg, bound its effect.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

MAX_EXAMPLES = 10**8  # DP units one merchant may claim (a weight of 1e12 would make its update the aggregate)


@dataclass
class RoundScreening:
    accepted: list[Message] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # node id -> reason
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> why the update was dropped
    failed: dict[int, str] = field(default_factory=dict)  # node id -> error reported by Flower


def screen_train_replies(
    replies: list[Message], expected: dict[str, tuple[int, ...]], current=None, max_update_norm: float | None = None,
) -> RoundScreening:
    """Split replies into accepted updates, refusals, invalid updates and failures; ``current`` (the
    global ArrayRecord the round started from) and ``max_update_norm`` bound each update's L2 norm."""
    out = RoundScreening()
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            out.failed[node] = msg.error.reason
            continue
        metrics = msg.content.metric_records.get("metrics", {})
        if metrics.get("refused", 0):
            out.refused[node] = str(msg.content.config_records.get("privacy", {}).get("refusal", "no reason given"))
            continue
        problem = _update_problem(msg, expected)
        if not problem and max_update_norm is not None and current is not None and len(current):
            norm = update_norm(msg.content.array_records["arrays"], current)
            if norm > max_update_norm:
                problem = f"update norm {norm:.4g} exceeds federation.max_update_norm={max_update_norm:g}"
        if problem:
            out.rejected[node] = problem
        else:
            out.accepted.append(msg)
    return out


def update_norm(arrays, current) -> float:
    """L2 norm of ``arrays - current`` over every tensor (float64)."""
    total = 0.0
    for name, array in arrays.items():
        diff = array.numpy().astype(np.float64) - current[name].numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def _update_problem(msg: Message, expected: dict[str, tuple[int, ...]]) -> str | None:
    arrays = msg.content.array_records.get("arrays")
    if arrays is None or len(msg.content.array_records) != 1:
        return "reply must carry exactly one ArrayRecord named 'arrays'"
    names = set(arrays.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        return f"tensor names differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, array in arrays.items():
        values = array.numpy()
        if tuple(values.shape) != expected[name]:
            return f"tensor {name} has shape {tuple(values.shape)}, expected {expected[name]}"
        if values.dtype != np.float32:
            return f"tensor {name} has dtype {values.dtype}, expected float32 (the global model's)"
        if not np.all(np.isfinite(values)):
            return f"tensor {name} has non-finite values"
    examples = msg.content.metric_records["metrics"].get("num-examples", 0)
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples != int(examples):
        return f"num-examples={examples!r} must be a whole number"
    if not 0 < examples <= MAX_EXAMPLES:
        return f"num-examples={examples:g} must lie in 1..{MAX_EXAMPLES:g}"
    return None
