"""`storefed recommend`: a saved global recommender (history and item_item) on its run's catalog.

Run dirs are written the way a run writes them (config.yaml as simulations/runner.py does, the model
with save_global_model as the ServerApp does), from freshly initialised models: nothing is trained.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from conftest import base_settings
from storefed.config import compose
from storefed.config.schema import ReviewConfig
from storefed.config.serialize import to_dict
from storefed.models.matrix_layout import upper_triangle
from storefed.models.saved_model import save_global_model
from storefed.server.run_setup import prepare_run
from storefed.simulations.recommend import Recommendation, Recommender, recommend, run_recommend_command


def write_run(run_dir, settings, fill=None):
    """A completed run's files: config.yaml and the global model (``fill(model)`` sets its tensors)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(settings), sort_keys=False), encoding="utf-8")
    setup = prepare_run(settings, run_dir)
    model = setup.task.build_model()
    if fill is not None:
        fill(model)
    save_global_model(run_dir, model.state_dict(), setup.to_clients.task, setup.catalog.num_items, setup.task)
    return setup.catalog, model.eval()


def model_scores(model, catalog, history, max_history=50):
    """The model's own scores for ``history``: indices + 1, left-padded with 0 (built here, by hand)."""
    shifted = [catalog.index[item] + 1 for item in history][-max_history:]
    batch = torch.tensor([[0] * (max_history - len(shifted)) + shifted], dtype=torch.long)
    with torch.no_grad():
        return model(batch)[0]


HISTORY = (3, 17, 42, 99)  # catalog indices of the test history: the models score them highest


def favour_history(model):
    """History model: a large output bias on the history items, so only their exclusion keeps them out."""
    with torch.no_grad():
        model.output.bias[list(HISTORY)] += 100.0


def random_item_item(model):
    """Released statistics with distinct scores: a popularity vector and a real co-occurrence matrix in
    which the history items co-occur most (each scores highest given the others)."""
    rng = np.random.default_rng(3)
    rows = rng.random((40, model.candidates)) * (rng.random((40, model.candidates)) < 0.2)
    together = np.zeros((20, model.candidates))
    together[:, list(HISTORY)] = 1.0
    rows = np.vstack([rows, together])
    model.popularity.copy_(torch.linspace(10.0, 1.0, model.num_items))  # candidate position = item index
    model.cooccurrence.copy_(torch.from_numpy(upper_triangle(rows.T @ rows)))


@pytest.fixture(scope="module")
def history_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("history-run")
    catalog, model = write_run(run_dir, base_settings("recommender", f"run_dir={run_dir}"), favour_history)
    return run_dir, catalog, model


@pytest.fixture(scope="module")
def item_item_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("item-item-run")
    settings = base_settings("recommender", "task.model=item_item", "privacy=none", f"run_dir={run_dir}")
    catalog, model = write_run(run_dir, settings, random_item_item)
    return run_dir, catalog, model


@pytest.mark.parametrize("run", ["history_run", "item_item_run"])
def test_recommend_top_k_matches_the_models_own_scores(run, request):
    run_dir, catalog, model = request.getfixturevalue(run)
    history = [catalog.item_ids[i] for i in HISTORY]
    recs = recommend(run_dir, history, k=10)
    assert len(recs) == 10 and all(isinstance(r, Recommendation) for r in recs)
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    assert not {r.item_id for r in recs} & set(history)
    for r in recs:
        index = catalog.index[r.item_id]
        assert r.title == catalog.titles[index] and r.title
        assert r.category == catalog.categories[index]
    own = model_scores(model, catalog, history)
    assert set(torch.argsort(own, descending=True)[:2].tolist()) <= set(HISTORY)  # what exclusion must drop
    assert torch.allclose(torch.tensor(scores), own[[catalog.index[r.item_id] for r in recs]], atol=1e-6)
    own[[catalog.index[i] for i in history]] = -torch.inf  # the top 10 of the rest, by the model itself
    assert torch.allclose(torch.tensor(scores), torch.sort(own, descending=True).values[:10], atol=1e-6)


def test_loader_serves_many_histories_and_edge_cases(history_run):
    run_dir, catalog, model = history_run
    recommender = Recommender.from_run_dir(str(run_dir))
    one = recommender.recommend([catalog.item_ids[5]], k=3)
    assert [r.item_id for r in one] == [r.item_id for r in recommend(run_dir, [catalog.item_ids[5]], k=3)]
    cold = recommender.recommend([], k=5)  # empty history: the ranking for a customer with no history
    expected = torch.sort(model_scores(model, catalog, []), descending=True).values[:5]
    assert torch.allclose(torch.tensor([r.score for r in cold]), expected, atol=1e-6)
    everything = recommender.recommend(list(catalog.item_ids[:2]), k=10_000)  # k beyond the catalog: all the rest
    assert len(everything) == catalog.num_items - 2
    for k in (0, -1):
        with pytest.raises(ValueError, match="k=.*>= 1"):
            recommender.recommend([], k=k)


def test_files_catalog_public_ids_and_titles(tmp_path):
    csv = tmp_path / "catalog.csv"
    rows = [("sku-a", "shoes", "Red shoe"), ("sku-b", "shoes", "Blue shoe"), ("sku-c", "hats", "Green hat"),
            ("sku-d", "hats", "Straw hat"), ("sku-e", "bags", "Tote")]
    csv.write_text("item_id,category,title\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows), encoding="utf-8")
    settings = compose("simulate", ["task=recommender", "data=files", f"data.catalog={csv}",
                                    f"run_dir={tmp_path / 'run'}"])
    catalog, model = write_run(tmp_path / "run", settings)
    recs = recommend(tmp_path / "run", ["sku-c", "sku-a"], k=2)
    assert len(recs) == 2 and not {r.item_id for r in recs} & {"sku-a", "sku-c"}
    titles = {a: c for a, _, c in rows}
    assert all(r.title == titles[r.item_id] for r in recs)
    own = model_scores(model, catalog, ["sku-c", "sku-a"])
    assert torch.allclose(torch.tensor([r.score for r in recs]), own[[catalog.index[r.item_id] for r in recs]])


def test_command_prints_an_aligned_table(history_run, capsys):
    run_dir, catalog, _ = history_run
    history = [catalog.item_ids[1], catalog.item_ids[2]]
    assert run_recommend_command([str(run_dir), "--history", ",".join(history), "--k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "item_id", "score", "category", "title"]
    expected = recommend(run_dir, history, k=4)
    assert len(lines) == 5
    for n, (line, rec) in enumerate(zip(lines[1:], expected), 1):
        rank, item, score, category, title = line.split(maxsplit=4)
        assert (int(rank), item, category, title) == (n, rec.item_id, rec.category, rec.title)
        assert float(score) == pytest.approx(rec.score, rel=1e-4)
    assert len({line.index(" " + e.item_id) for line, e in zip(lines[1:], expected)}) == 1  # one column

    assert run_recommend_command([str(run_dir), "--list-items", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f"{catalog.item_ids[i]}" in out and catalog.titles[i] in out for i in range(3))
    assert catalog.item_ids[3] not in out


def test_command_refuses_unknown_ids_and_bad_k(history_run, capsys):
    run_dir, catalog, _ = history_run
    rc = run_recommend_command([str(run_dir), "--history", f"{catalog.item_ids[0]},no-such-item,other-bad"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("storefed recommend: ")
    assert "'no-such-item'" in err and "'other-bad'" in err and "--list-items" in err and "Traceback" not in err
    assert run_recommend_command([str(run_dir), "--k", "0"]) == 2
    assert "--k 0" in capsys.readouterr().err


def test_refuses_run_dirs_without_a_usable_recommender(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_recommend_command([str(empty), "--history", "x"]) == 2
    assert "no saved global model" in capsys.readouterr().err
    assert run_recommend_command([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err

    review = tmp_path / "review"
    review.mkdir()
    save_global_model(review, {"head.weight": torch.zeros(2, 4)}, ReviewConfig(), num_items=10)
    assert run_recommend_command([str(review), "--history", "x"]) == 2
    err = capsys.readouterr().err
    assert "task=review" in err and "not the recommender" in err
    with pytest.raises(ValueError, match="not the recommender"):
        recommend(review, ["x"])


def test_refuses_a_model_that_does_not_fit_the_catalog(history_run, tmp_path):
    run_dir, _, _ = history_run
    settings = base_settings("recommender", f"run_dir={tmp_path}")
    bigger = dataclasses.replace(settings.data, generator=dataclasses.replace(settings.data.generator, num_items=300))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(dataclasses.replace(settings, data=bigger))))
    for name in ("global_model.safetensors", "model_config.json"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(ValueError, match="catalog changed"):
        Recommender.from_run_dir(tmp_path)
