"""The global review model as a standard transformers folder that ``pipeline`` loads offline.

    from transformers import pipeline
    classify = pipeline("text-classification", model="runs/demo-review/review_model")
    classify("The strap broke after a week.", truncation=True)   # [{'label': 'negative', ...}]

``task.encoder=frozen``: the public encoder with its mean-pooling layer plus the federated head
(:mod:`storefed.models.text_encoder`), a plain ``BertForSequenceClassification``.
``task.encoder=lora`` with ``task.pooling=cls``: the adapters merged into the checkpoint. The
folder (config with readable label names, weights, tokenizer) is staged next to its target and
renamed into place, so a reader never sees a half-written export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from storefed.models.review import ReviewTask, ReviewTaskBase
from storefed.models.text_encoder import quiet_transformers

EXPORT_DIR = "review_model"


def exportable(task: ReviewTaskBase) -> str | None:
    """Why ``task``'s model cannot be exported as a pipeline folder, or None when it can."""
    from storefed.models.review_head import FrozenReviewTask

    if isinstance(task, FrozenReviewTask):
        return None
    if isinstance(task, ReviewTask) and task.pretrained_dir and task.cfg.pooling == "cls":
        return None
    return (
        f"task.encoder={task.cfg.encoder} (pooling {task.cfg.pooling}) has no standard transformers architecture "
        "(the scratch model uses StoreFed's hashing tokenizer): export needs task.encoder=frozen, or lora with "
        "task.pooling=cls"
    )


def sequence_classifier(task: ReviewTaskBase, state: dict[str, torch.Tensor]) -> nn.Module:
    """The global model as a ``BertForSequenceClassification`` with ``state`` (the shared tensors) loaded."""
    from transformers import BertForSequenceClassification

    from storefed.models.review_head import FrozenReviewTask
    from storefed.models.text_encoder import pooled_encoder

    problem = exportable(task)
    if problem:
        raise ValueError(problem)
    if isinstance(task, FrozenReviewTask):
        encoder = pooled_encoder(task.encoder_dir)
        config = encoder.config
        config.num_labels = task.num_classes
        model = BertForSequenceClassification(config)
        model.bert.load_state_dict(encoder.state_dict())
        head = {k.removeprefix("classifier."): v.clone() for k, v in state.items() if k.startswith("classifier.")}
        # the decision rule argmax(W x + b - tau * prior), folded into the bias: exact
        head["bias"] = head["bias"] - task.cfg.prior_tau * state["prior.weight"][:, 0]
        model.classifier.load_state_dict(head)
    else:
        peft_model = task.build_model()
        peft_model.load_state_dict(state, strict=False)
        model = peft_model.merge_and_unload()
    model.config.id2label = dict(enumerate(task.label_names))
    model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    model.config.problem_type = "single_label_classification"
    return model.eval()


def export_review_model(task: ReviewTaskBase, state: dict[str, torch.Tensor], target: Path) -> Path:
    """Write ``target`` (a pipeline-loadable folder) atomically; returns it."""
    from transformers import AutoTokenizer

    with quiet_transformers():  # no load report (the pooler is dropped on purpose) and no progress bars
        model = sequence_classifier(task, state)
        source = getattr(task, "encoder_dir", None) or task.pretrained_dir
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.model_max_length = task.cfg.max_length  # the limit the head was trained with
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with quiet_transformers():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / "storefed_export.json").write_text(json.dumps({
            "task": "review", "encoder": task.cfg.encoder, "labels": task.scheme,
            "label_names": list(task.label_names), "max_length": task.cfg.max_length,
            "privacy_unit": task.privacy_unit,
        }, indent=2), encoding="utf-8")
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
