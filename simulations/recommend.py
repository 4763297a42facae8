"""``storefed recommend RUN_DIR --history ITEM,ITEM,... --k 10``: a trained recommender's top-k items.

The run dir's saved global model (``models/saved_model.py``) is rebuilt on the run's own catalog:
``config.yaml`` (``storefed simulate``) or ``settings.json`` (``storefed server``) names the data
source, and ``coordinator_catalog`` rebuilds the catalog exactly as the coordinator published it
(``server/run_setup.py``). Items are named by their public catalog ids (``item_id`` of
``catalog.csv``, the ids merchants' files use), never by internal indices.

Both recommenders are supported (``task.model=history`` and ``item_item``); they share one contract:
``model(histories)`` scores every catalog item. A history is given oldest first (most recent last);
like in training, only the ``task.max_history`` most recent items are read, but every history item
is excluded from the results. An *empty* history is allowed: it returns the model's ranking for a
customer with no history (its cold-start ranking, e.g. popularity for ``item_item``). Scores are the
model's raw scores (higher ranks first; logits for the history model), ties broken by catalog order.

    recommender = Recommender.from_run_dir("runs/my-run")   # load once
    recommender.recommend(["item-00001", "item-00042"], k=10)  # -> list[Recommendation]
    recommend("runs/my-run", ["item-00001"], k=5)            # one-shot wrapper
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from storefed.config.schema import RecommenderConfig, RunConfig
from storefed.config.serialize import from_dict
from storefed.data.merchant_files import load_catalog
from storefed.data.schema import Catalog
from storefed.data.sources import coordinator_catalog
from storefed.models.recommender import pad_history
from storefed.models.saved_model import CONFIG_FILE, WEIGHTS_FILE, load_global_model
from storefed.models.task import build_task

RUN_CONFIG_FILES = ("config.yaml", "settings.json")  # storefed simulate | storefed server
SHOWN_UNKNOWN = 5  # unknown ids named in an error message


@dataclass(frozen=True)
class Recommendation:
    """One recommended catalog item: its public id, title and category ("" when the catalog has none)."""

    item_id: str
    title: str
    score: float
    category: str = ""


def _run_settings(run_dir: Path) -> RunConfig:
    """The run's config (data source, seed), rebuilt and validated as ``storefed simulate`` would."""
    for name in RUN_CONFIG_FILES:
        path = run_dir / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
            break
    else:
        raise ValueError(f"{run_dir} has no run config ({' or '.join(RUN_CONFIG_FILES)}): "
                         "give a run directory written by `storefed simulate` or `storefed server`")
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"defaults"}
    try:  # evaluate / server configs extend RunConfig: only its keys describe the run
        return from_dict(RunConfig, {k: v for k, v in data.items() if k in fields})
    except (AttributeError, TypeError, ValueError) as exc:  # AttributeError: not a mapping
        raise ValueError(f"{path} could not be read as a run config: {exc}") from exc


def _recommender_config(run_dir: Path, saved: dict) -> RecommenderConfig:
    task = saved.get("task") if isinstance(saved, dict) else None
    name = task.get("name") if isinstance(task, dict) else None
    if name != "recommender":
        hint = " (review models: `storefed classify RUN_DIR TEXT ...`)" if name == "review" else ""
        raise ValueError(f"{run_dir} holds a task={name} model, not the recommender: "
                         f"give a run of `storefed simulate task=recommender`{hint}")
    try:
        return RecommenderConfig(**task)
    except TypeError as exc:
        raise ValueError(f"{run_dir / CONFIG_FILE} has an unreadable task config: {exc}") from exc


class Recommender:
    """A run's global recommender on its catalog: load once (:meth:`from_run_dir`), recommend many times."""

    def __init__(self, model: nn.Module, catalog: Catalog, task_cfg: RecommenderConfig, run_dir: Path | None = None):
        self.model = model.eval()
        self.catalog = catalog
        self.task_cfg = task_cfg
        self.run_dir = run_dir

    @classmethod
    def from_run_dir(cls, run_dir: Path | str) -> Recommender:
        """The saved global model of ``run_dir``; ValueError naming the problem when there is none to use."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir} is not a directory: give a run directory (run_dir=... of `storefed simulate`)")
        try:
            state, saved = load_global_model(run_dir)
        except FileNotFoundError:
            status = run_dir / "status.json"
            detail = ""
            if status.is_file():
                try:
                    payload = json.loads(status.read_text(encoding="utf-8"))
                    error = f": {payload['error']}" if payload.get("error") else ""
                    detail = f" (run status: {payload.get('status')}{error})"
                except (ValueError, AttributeError):
                    pass
            raise ValueError(f"{run_dir} has no saved global model ({WEIGHTS_FILE} and {CONFIG_FILE}){detail}: "
                             "they are written when a `storefed simulate task=recommender` or "
                             "`storefed server` run completes") from None
        task_cfg = _recommender_config(run_dir, saved)
        try:
            if saved.get("catalog_file") and not any((run_dir / n).is_file() for n in RUN_CONFIG_FILES):
                seed = int(saved.get("seed", 0))  # a merchant's copy of the global model (client/global_copy.py)
                catalog = load_catalog(Path(saved["catalog_file"]))
            else:
                settings = _run_settings(run_dir)
                seed, catalog = settings.seed, coordinator_catalog(settings.data, settings.seed)
        except FileNotFoundError as exc:
            raise ValueError(f"the run's catalog could not be read ({exc}); relative data.catalog paths are "
                             f"read from the current directory ({Path.cwd()})") from exc
        if catalog.num_items != saved.get("num_items"):
            raise ValueError(f"{run_dir}'s model scores {saved.get('num_items')} items but the run's catalog now has "
                             f"{catalog.num_items}: the catalog changed since the run")
        model = build_task(task_cfg, catalog, seed=seed).build_model()
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{run_dir / WEIGHTS_FILE} does not fit the run's task config: "
                             f"{' '.join(str(exc).split())}") from exc
        return cls(model, catalog, task_cfg, run_dir)

    def indices(self, history: Sequence[str]) -> list[int]:
        """Catalog indices of the public item ids in ``history``; ValueError naming every unknown id."""
        if isinstance(history, str):
            raise TypeError(f"history must be a sequence of item ids, not the string {history!r}")
        unknown = [item for item in dict.fromkeys(history) if item not in self.catalog.index]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:SHOWN_UNKNOWN])
            more = f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
            where = self.run_dir if self.run_dir is not None else "RUN_DIR"
            raise ValueError(f"unknown item id(s) {shown}{more}: not in the run's catalog of {self.catalog.num_items} "
                             f"items; list valid ids with `storefed recommend {where} --list-items 20`")
        return [self.catalog.index[item] for item in history]

    @torch.no_grad()
    def scores(self, history: Sequence[str]) -> torch.Tensor:
        """The model's score for every catalog item (``(num_items,)``) after ``history`` (oldest first)."""
        items = np.asarray(self.indices(history), dtype=np.int64)
        batch = pad_history(items, self.task_cfg.max_history).unsqueeze(0)
        return self.model(batch)[0].float()

    def recommend(self, history: Sequence[str], k: int = 10) -> list[Recommendation]:
        """The ``k`` best-scored catalog items not in ``history``, best first (fewer when the catalog runs out)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: expected an integer >= 1 (how many items to recommend)")
        scores = self.scores(history)
        allowed = torch.ones(self.catalog.num_items, dtype=torch.bool)
        allowed[self.indices(history)] = False
        candidates = torch.nonzero(allowed).squeeze(1)
        order = torch.argsort(-scores[candidates], stable=True)[:k]
        return [self._item(int(i), float(scores[i])) for i in candidates[order]]

    def items(self, n: int | None = None) -> list[Recommendation]:
        """The first ``n`` catalog items (all when None), score 0: a look at the ids the catalog knows."""
        count = self.catalog.num_items if n is None else max(0, min(n, self.catalog.num_items))
        return [self._item(i, 0.0) for i in range(count)]

    def _item(self, index: int, score: float) -> Recommendation:
        titles = self.catalog.titles
        return Recommendation(self.catalog.item_ids[index], titles[index] if titles else "", score,
                              self.catalog.categories[index])


def recommend(run_dir: Path | str, history: Sequence[str], k: int = 10) -> list[Recommendation]:
    """The top-``k`` items of ``run_dir``'s recommender after ``history`` (public item ids, oldest first).

    History items are excluded; an empty history gives the model's cold-start ranking. ValueError with
    the problem named for: no saved model, a non-recommender run, unknown item ids, ``k < 1``."""
    return Recommender.from_run_dir(run_dir).recommend(history, k)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...], right: set[int]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_recommendations(recs: list[Recommendation]) -> str:
    """An aligned table: rank, item id, score, category (when the catalog has any), title."""
    with_category = any(r.category for r in recs)
    header = ("rank", "item_id", "score", *(("category",) if with_category else ()), "title")
    rows = [(str(n), r.item_id, f"{r.score:.5g}", *((r.category,) if with_category else ()), r.title)
            for n, r in enumerate(recs, 1)]
    return _table(rows, header, right={0, 2})


def format_items(items: list[Recommendation]) -> str:
    with_category = any(r.category for r in items)
    header = ("item_id", *(("category",) if with_category else ()), "title")
    rows = [(r.item_id, *((r.category,) if with_category else ()), r.title) for r in items]
    return _table(rows, header, right=set())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storefed recommend",
        description="The top-k catalog items of a run's trained recommender for a customer history "
                    "(history items excluded; no --history: the ranking for a customer with no history).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a completed run directory (storefed simulate task=recommender)")
    parser.add_argument("--history", action="append", default=None, metavar="ITEM,ITEM,...",
                        help="the customer's catalog item ids, oldest first, comma-separated (may be repeated)")
    parser.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    parser.add_argument("--list-items", type=int, default=None, metavar="N",
                        help="print the first N catalog item ids and titles "
                             "(then recommend only if --history is given)")
    return parser


def run_recommend_command(argv: list[str]) -> int:
    """``storefed recommend``: 0 after printing; 2 with ``storefed recommend: <message>`` on bad input."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    history = [item.strip() for value in args.history or [] for item in value.split(",") if item.strip()]
    try:
        if args.list_items is not None and args.list_items < 1:
            raise ValueError(f"--list-items {args.list_items}: expected an integer >= 1")
        if args.k < 1:
            raise ValueError(f"--k {args.k}: expected an integer >= 1 (how many items to recommend)")
        recommender = Recommender.from_run_dir(args.run_dir)
        if args.list_items is not None:
            listed = recommender.items(args.list_items)
            print(f"{recommender.catalog.num_items} catalog items; the first {len(listed)}:")
            print(format_items(listed))
            if args.history is None:
                return 0
            print()
        recs = recommender.recommend(history, args.k)
    except ValueError as exc:
        print(f"storefed recommend: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if not history:
        print("no history given: the model's ranking for a customer with no history")
    print(format_recommendations(recs))
    return 0


if __name__ == "__main__":
    sys.exit(run_recommend_command(sys.argv[1:]))
