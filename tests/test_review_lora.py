"""LoRA fine-tuning of a local pretrained checkpoint under DP-SGD (review task, ``pretrained_dir``).

Nothing is downloaded: a tiny BERT checkpoint is built in a temporary directory and plays the
role of a public pretrained model. Its encoder is pre-trained (non-private) on reviews of a
*different* virtual world (generator seed 1, 3-class labels, mean-pooled head), then saved as a
``BertForSequenceClassification`` whose CLS pooler and 3-way head were never trained. Loaded for
the 2-class polarity task, the head is re-initialised and the encoder frozen, so the merchant's
DP fine-tune has to route the encoder's sentiment features into the CLS token through the LoRA
adapters: the adapter test below shows they do, with the head frozen and zeroing the adapters
restoring the starting predictions exactly.

Why the adapter test: with peft under Opacus a fine-tune can run, report a falling loss and
still produce adapters that carry nothing (DP noise alone moves every adapter weight, so
"the weights changed" proves nothing). Accuracy has to move because of the adapters.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("opacus")
pytest.importorskip("transformers")

from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local  # noqa: E402
from storefed.config.schema import ReviewConfig
from storefed.data.virtual_stores import (  # noqa: E402
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    POSITIVE_WORDS,
    StoreGeneratorConfig,
    generate_catalog,
    generate_store,
)
from storefed.models.review import ReviewTask, review_labels  # noqa: E402
from storefed.privacy.dp_sgd import unwrap  # noqa: E402

WORLD = StoreGeneratorConfig(seed=0, review_probability=1.0, mean_customers=200)
PUBLIC_WORLD = dataclasses.replace(WORLD, seed=1)  # the "public" pre-training corpus: another world
STORE_ID = 4  # about 5,600 reviews, 3,900 polarity training examples
MAX_LENGTH = 32
LOCAL = LocalTrainingConfig(epochs=5, batch_size=256, lr=0.03, optimizer="adam")
NOISE, CLIP = 1.0, 1.0
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These ops are tiny: one thread is fastest, and two on a busy 2-core box run ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny local BERT checkpoint (tokenizer + weights), pre-trained on public reviews."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    words = sorted(set(POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"cat{c}" for c in range(WORLD.num_categories))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5: the vocabulary is passed as `vocab=` (a `vocab_file=` keyword is ignored
    # and silently yields a 5-token tokenizer that maps every word to [UNK]).
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"))
    assert len(tokenizer) == len(vocab)
    tokenizer.save_pretrained(path)

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    texts, ratings = [], []
    for store_id in range(3):
        reviews = generate_store(PUBLIC_WORLD, store_id).reviews
        texts += reviews.text
        ratings += reviews.rating.tolist()
    labels = torch.as_tensor(review_labels(np.asarray(ratings), "three_class"))
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")

    torch.manual_seed(123)
    encoder = BertModel(config)
    head = torch.nn.Linear(config.hidden_size, config.num_labels)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(labels), (64,), generator=rng)
        mask = enc["attention_mask"][idx]
        hidden = encoder(input_ids=enc["input_ids"][idx], attention_mask=mask).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.8, f"public pre-training did not learn (loss {float(loss):.3f})"

    model = BertForSequenceClassification(config)  # CLS pooler and 3-way head: never trained
    model.bert.load_state_dict(encoder.state_dict())
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def store():
    return generate_store(WORLD, STORE_ID)


def make_task(checkpoint) -> ReviewTask:
    cfg = {
        "name": "review",
        "labels": "polarity",
        "encoder": "lora",
        "pretrained_dir": str(checkpoint),
        "pooling": "cls",  # the adapters must route sentiment into the CLS token (see module docstring)
        "max_length": MAX_LENGTH,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_targets": ["query", "value"],
    }
    return ReviewTask(ReviewConfig(**cfg), generate_catalog(WORLD))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_adapters_and_head_are_shared(checkpoint):
    task = make_task(checkpoint)
    model = task.build_model()
    state = model.state_dict()
    shared = task.shared_keys(model)

    lora = [k for k in shared if ".lora_A." in k or ".lora_B." in k]
    head = [k for k in shared if k not in lora]
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    assert all(".query." in k or ".value." in k for k in lora)
    assert len(head) == 2 and all("classifier" in k and "modules_to_save" in k for k in head)
    assert not any(k.startswith("_module.") for k in shared)
    assert sum(state[k].numel() for k in shared) < 0.15 * sum(v.numel() for v in state.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(shared)
    assert all(float(state[k].norm()) == 0.0 for k in lora if ".lora_B." in k)  # LoRA starts as a no-op
    assert task.shared_keys(task.build_model()) == shared  # the server's fresh model names the same tensors


@dataclasses.dataclass
class FineTune:
    task: ReviewTask
    before: dict
    initial: dict
    model: torch.nn.Module
    steps: tuple[int, int]


@pytest.fixture(scope="module")
def finetune(checkpoint, store):
    """``finetune(mode)``: one DP LoRA fine-tune per grad_sample_mode, cached."""
    runs: dict[str, FineTune] = {}

    def run(grad_sample_mode: str) -> FineTune:
        if grad_sample_mode not in runs:
            task = make_task(checkpoint)
            model = task.build_model()
            before, initial = task.evaluate(model, store, CPU), snapshot(model)
            dataset = task.train_dataset(store)
            assert len(dataset) > 3000
            torch.manual_seed(1)
            result = train_local(task, model, dataset, LOCAL, DPParams(NOISE, CLIP, grad_sample_mode), CPU)
            runs[grad_sample_mode] = FineTune(task, before, initial, model, (result.steps, result.plan.steps))
        return runs[grad_sample_mode]

    return run


@pytest.mark.parametrize("grad_sample_mode", ["ghost", "hooks"])
def test_dp_lora_finetune_changes_only_shared_tensors_and_beats_baselines(finetune, store, grad_sample_mode):
    run = finetune(grad_sample_mode)
    task, before, initial = run.task, run.before, run.initial
    assert run.steps[0] == run.steps[1] > 0

    trained = unwrap(run.model)  # weights come from the user's module, never the Opacus wrapper
    state = trained.state_dict()
    assert not any(k.startswith("_module.") for k in state)
    shared = task.shared_keys(trained)
    assert shared == task.shared_keys(task.build_model())
    # (a) every shared tensor moved; lora_B started at exactly zero
    for key in shared:
        assert not torch.equal(state[key], initial[key]), f"{key} did not change"
        if ".lora_B." in key:
            assert float(state[key].norm()) > 0.1, key
    # (b) nothing outside the shared tensors moved (frozen encoder, pooler, original head)
    for key, value in state.items():
        if key not in shared:
            assert torch.equal(value, initial[key]), f"frozen {key} changed"
    # (c) the fine-tune beats the model's own start and the majority baseline by a clear margin
    after = task.evaluate(trained, store, CPU)
    assert after["accuracy"] >= before["accuracy"] + 0.05, (before, after)
    assert after["macro_f1"] >= before["macro_f1"] + 0.05, (before, after)
    assert after["accuracy"] >= after["local_majority_accuracy"] + 0.1, after
    assert after["macro_f1"] >= after["local_majority_macro_f1"] + 0.3, after

    # What is federated is enough: the shared tensors alone reproduce the fine-tuned model.
    fresh = task.build_model()
    load = fresh.load_state_dict({k: state[k] for k in shared}, strict=False)
    assert not load.unexpected_keys and not set(shared) & set(load.missing_keys)
    replay = task.evaluate(fresh, store, CPU)
    assert (replay["accuracy"], replay["macro_f1"]) == (after["accuracy"], after["macro_f1"])


def test_dp_trained_adapters_alone_carry_the_learning(checkpoint, store):
    """Head frozen at its random init: only the LoRA adapters train (ghost clipping, the default)."""
    task = make_task(checkpoint)
    model = task.build_model()
    for name, param in model.named_parameters():
        if "classifier" in name:
            param.requires_grad_(False)
    before = task.evaluate(model, store, CPU)

    torch.manual_seed(2)
    train_local(task, model, task.train_dataset(store), LOCAL, DPParams(NOISE, CLIP, "ghost"), CPU)
    after = task.evaluate(model, store, CPU)
    assert after["accuracy"] >= before["accuracy"] + 0.05, (before, after)
    assert after["macro_f1"] >= before["macro_f1"] + 0.05, (before, after)
    assert after["accuracy"] >= after["local_majority_accuracy"] + 0.1, after

    with torch.no_grad():  # remove the adapters' contribution: back to the starting predictions
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.zero_()
    ablated = task.evaluate(model, store, CPU)
    assert (ablated["accuracy"], ablated["macro_f1"]) == (before["accuracy"], before["macro_f1"])


def test_mean_pooling_loads_the_checkpoints_encoder_and_learns_under_dp(checkpoint, store):
    """``task.pooling=mean`` (the default): the checkpoint's encoder, frozen, mean-pooled into a new head."""
    from transformers import BertModel

    task = ReviewTask(dataclasses.replace(make_task(checkpoint).cfg, pooling="mean"), generate_catalog(WORLD))
    model = task.build_model()
    reference = BertModel.from_pretrained(checkpoint, add_pooling_layer=False).state_dict()
    encoder = {k.split("bert.", 1)[1].replace("base_layer.", ""): v for k, v in model.state_dict().items()
               if ".bert." in k and "lora_" not in k}
    assert set(encoder) == set(reference) and all(torch.equal(encoder[k], reference[k]) for k in reference)
    shared = task.shared_keys(model)
    assert all(".lora_" in k or "classifier" in k for k in shared)
    torch.manual_seed(3)
    train_local(task, model, task.train_dataset(store), dataclasses.replace(LOCAL, epochs=2),
                DPParams(NOISE, CLIP, "ghost"), CPU)
    after = task.evaluate(model, store, CPU)
    assert after["macro_f1"] >= after["local_majority_macro_f1"] + 0.3, after


def test_fixed_class_weights_shift_predictions_towards_the_weighted_class(store):
    """A public per-class loss weight (``task.class_weights``) changes what the model predicts."""
    cfg = ReviewConfig(encoder="scratch", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=16, vocab_size=512)
    negatives = {}
    for weights in (None, [20.0, 1.0]):
        task = ReviewTask(dataclasses.replace(cfg, class_weights=weights), generate_catalog(WORLD))
        model = task.build_model()
        torch.manual_seed(0)
        train_local(task, model, task.train_dataset(store), LocalTrainingConfig(epochs=2, batch_size=256, lr=0.01),
                    None, CPU)
        ids, mask, _ = task.train_dataset(store).tensors
        with torch.no_grad():
            logits, _ = task.forward(model, (ids[:1000], mask[:1000], torch.zeros(1000, dtype=torch.long)), CPU)
        negatives[str(weights)] = float((logits.argmax(-1) == 0).float().mean())
    assert negatives["[20.0, 1.0]"] > negatives["None"] + 0.2, negatives
    with pytest.raises(ValueError, match=r"task.class_weights=\[1.0\] needs 2 positive numbers"):
        ReviewTask(dataclasses.replace(cfg, class_weights=[1.0]), generate_catalog(WORLD))
