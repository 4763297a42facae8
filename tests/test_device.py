"""Where merchants train: CUDA when present. The CUDA tests run wherever a GPU is visible."""

from __future__ import annotations

import pytest
import torch

from conftest import task_from_dict
from storefed.client.device import choose_device
from storefed.client.local_training import DPParams, LocalTrainingConfig, train_local
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
GEN = StoreGeneratorConfig(num_items=300, mean_customers=120, review_probability=0.5)


def test_auto_picks_what_is_there_and_bad_requests_are_refused():
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu' is unknown: choose auto, cpu or cuda"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU is visible: use device=auto or cpu"):
            choose_device("cuda")


@needs_cuda
@pytest.mark.parametrize("task_cfg", [{"name": "recommender", "embedding_dim": 16},
                                      {"name": "review", "encoder": "scratch", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                       "intermediate_size": 64, "max_length": 32, "vocab_size": 1024}])
@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_training_runs_on_the_gpu(task_cfg, mode):
    task = task_from_dict(task_cfg, generate_catalog(GEN))
    dataset = task.train_dataset(generate_store(GEN, 0))
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    device = choose_device("auto")
    result = train_local(task, model, dataset, LocalTrainingConfig(epochs=2, batch_size=32, lr=0.01),
                         DPParams(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode), device)
    assert device.type == "cuda" and all(p.is_cuda for p in model.parameters())
    assert result.steps == result.plan.steps and result.plan.steps > 2
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)  # the noisy steps moved the weights
