"""Coordinator-side screening of merchant replies before aggregation.

- A refusal (``refused=1``, no tensors) is a normal non-participation: logged with its reason.
- An update is accepted only if it carries exactly the expected tensor names and shapes, all
  values are finite, and it reports a positive number of examples. Anything else is dropped
  and logged; it never reaches aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message


@dataclass
class RoundScreening:
    accepted: list[Message] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # node id -> reason
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> why the update was dropped
    failed: dict[int, str] = field(default_factory=dict)  # node id -> error reported by Flower


def screen_train_replies(replies: list[Message], expected: dict[str, tuple[int, ...]]) -> RoundScreening:
    """Split replies into accepted updates, refusals, invalid updates and failures."""
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
        if problem:
            out.rejected[node] = problem
        else:
            out.accepted.append(msg)
    return out


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
        if not np.all(np.isfinite(values)):
            return f"tensor {name} has non-finite values"
    examples = msg.content.metric_records["metrics"].get("num-examples", 0)
    if not examples or examples <= 0:
        return "num-examples must be > 0"
    return None
