"""Compressed updates (federation.update_encoding): sizes, exact round trips, unbiased int8 rounding."""

from __future__ import annotations

import pytest
import torch

from storefed.update_codec import SCALE_SUFFIX, decode_update, encode_update, encoded_bytes


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    start = {"emb": torch.randn(1000, 32, generator=g), "bias": torch.randn(1000, generator=g)}
    update = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    return start, update


def test_float32_is_untouched_and_float16_halves_the_bytes():
    start, update = _pair()
    assert encode_update(update, start, "float32") is update
    half = encode_update(update, start, "float16")
    assert encoded_bytes(half) * 2 == encoded_bytes(update)
    decoded = decode_update(half, start)
    assert all(decoded[k].dtype == torch.float32 for k in decoded)
    assert max((decoded[k] - update[k]).abs().max().item() for k in update) < 2e-3  # half precision of |x| < 4


def test_int8_is_about_four_times_smaller_and_within_one_step_of_each_value():
    start, update = _pair()
    sent = encode_update(update, start, "int8", torch.Generator().manual_seed(1))
    assert set(sent) == {"emb", "bias", "emb" + SCALE_SUFFIX, "bias" + SCALE_SUFFIX}
    assert encoded_bytes(update) / encoded_bytes(sent) > 3.9
    decoded = decode_update(sent, start)
    for name in update:
        step = sent[name + SCALE_SUFFIX].item()
        delta = (update[name] - start[name]).abs().max().item()
        assert step == pytest.approx(delta / 127, rel=1e-6)
        assert (decoded[name] - update[name]).abs().max().item() <= step * (1 + 1e-4)


def test_int8_stochastic_rounding_is_unbiased():
    start = {"w": torch.zeros(20000)}
    update = {"w": torch.full((20000,), 0.3)}
    update["w"][0] = 1.27  # sets the scale: one step = 0.01, so 0.3 is exactly 30 steps
    update["w"][1:] = 0.3 + 0.004  # 30.4 steps: rounds up 40% of the time
    decoded = decode_update(encode_update(update, start, "int8", torch.Generator().manual_seed(2)), start)["w"][1:]
    assert set(torch.round(decoded / 0.01).unique().tolist()) == {30.0, 31.0}
    assert decoded.mean().item() == pytest.approx(0.304, abs=2e-4)  # E[decoded] = the update (deterministic: 0.30)


def test_unknown_encoding_is_refused_with_the_choices():
    start, update = _pair()
    with pytest.raises(ValueError, match="update_encoding='bf4' is unknown: choose one of"):
        encode_update(update, start, "bf4")


def test_encoded_updates_travel_compressed_and_the_federation_still_learns(tmp_path):
    """Through the real ClientApp and strategy (in-process harness): bytes sent and the aggregated model."""
    from conftest import base_settings
    from storefed.simulations.evaluation.federated import run_federated

    results = {}
    for encoding in ("float32", "float16", "int8"):
        settings = base_settings("recommender", "federation.num_stores=4", "federation.stores_per_round=4",
                                 "federation.rounds=2", "task.epochs=1", f"federation.update_encoding={encoding}",
                                 f"run_dir={tmp_path / encoding}", enabled=False)
        results[encoding] = run_federated(settings, tmp_path / encoding)
    sent = {e: r.train_metrics[-1]["update_bytes"] for e, r in results.items()}
    assert sent["float32"] == 2 * sent["float16"] and sent["float32"] / sent["int8"] > 3.9
    for encoding in ("float16", "int8"):
        result = results[encoding]
        assert result.trained == 8 and all(v.dtype == torch.float32 for v in result.state.values())
        assert set(result.state) == set(results["float32"].state)


def test_over_selection_asks_more_merchants_and_is_refused_with_secure_aggregation():
    import dataclasses

    from conftest import base_settings
    from storefed.config import ConfigError, compose
    from storefed.config.schema import FedAvgConfig
    from storefed.server.strategy import build_strategy
    from storefed.simulations.checks import check_run

    federation = compose("simulate", ["federation.num_stores=10", "federation.stores_per_round=4",
                                      "federation.overselect=1.43"]).federation
    strategy = build_strategy(FedAvgConfig(), federation, {}, lambda *_: None)
    assert federation.sampled_per_round() == 6 and strategy.inner.min_train_nodes == 6
    assert strategy.inner.fraction_train == pytest.approx(0.6)
    with pytest.raises(ConfigError, match=r"federation.overselect=0.5 is not allowed: must lie in \[1, 10\]"):
        compose("simulate", ["federation.overselect=0.5"])
    secure = base_settings("recommender", "privacy.secure_aggregation=true", "federation.overselect=1.5")
    with pytest.raises(ConfigError, match="federation.overselect=1.5 cannot be used with secure aggregation"):
        check_run(secure)
    with pytest.raises(ConfigError, match="update_encoding=int8 cannot be used with secure aggregation"):
        check_run(dataclasses.replace(secure, federation=dataclasses.replace(secure.federation, overselect=1.0,
                                                                             update_encoding="int8")))
