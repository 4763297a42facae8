"""`storefed evaluate`: does federating under DP pay off for merchants? One command, one run dir.

    storefed evaluate task=recommender data=amazon evaluate.num_merchants=[10,50] evaluate.seeds=[0,1,2]

For every cell (K merchants x partition x seed) of the grid of ``storefed.config.schema.EvaluateSettings``, every
method (``grid.METHODS``) is trained and scored on the same partition and the same held-out
split; results go to ``<run_dir>/results.{json,csv,md}`` (rewritten after each cell) and
``privacy_utility.png``. Exit status: 0 done, 2 configuration error (one line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from storefed.atomic_files import atomic_write_text
from storefed.client.device import choose_device
from storefed.client.local_training import local_training_config
from storefed.config.schema import EvaluateConfig, resolved_task
from storefed.config.serialize import to_dict
from storefed.data.sources import load_simulated
from storefed.models.task import build_task
from storefed.privacy.dp_sgd import plan_sampling
from storefed.simulations.evaluation import methods
from storefed.simulations.evaluation.federated import global_model, run_distributed, run_federated
from storefed.simulations.evaluation.grid import DP_METHODS, Cell, EvalSpec, build_spec, cell_settings
from storefed.simulations.evaluation.plot import dp_ratio_by_customers, privacy_utility_plot
from storefed.simulations.evaluation.report import summarize, write_results

FEDERATED_PATH = (
    "in-process federation: storefed.client.client_app.train per merchant (train_local, ledger, auto noise planning) "
    "+ server.strategy screening and Flower FedAvg/FedProx.aggregate_train; no Ray"
)
LOCAL_BASELINE_PREFIX = {"recommender": "local_pop_", "review": "local_majority_"}


def run_evaluate_command(settings: EvaluateConfig, overrides: list[str]) -> int:
    """Entry point of `storefed evaluate` (``settings`` composed by the CLI); returns the exit status."""
    try:
        spec = build_spec(settings)
        check_data(settings, spec)
        run_dir = resolve_run_dir(settings, spec)
    except ValueError as exc:
        print("storefed evaluate: " + " ".join(str(exc).split()), file=sys.stderr)  # one line
        return 2
    started = time.time()
    paths = evaluate(settings, spec, run_dir, command=["storefed", "evaluate", *overrides])
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    print(f"storefed evaluate: done in {time.time() - started:.0f} s; results in {run_dir}")
    from storefed.simulations.report import report_after_run

    report_after_run(run_dir)
    return 0


def check_data(settings: EvaluateConfig, spec: EvalSpec) -> None:
    """Refuse a grid the data cannot support (more merchants than customers, unreadable file)."""
    from storefed.data.importers import read_amazon_reviews, read_movielens

    data = settings.data
    if data.source == "virtual":
        return
    reader = read_amazon_reviews if data.source == "amazon" else read_movielens
    _, table = reader(data.path)
    k = max(c.num_merchants for c in spec.cells)
    if k > table.num_users:
        raise ValueError(
            f"evaluate.num_merchants has K={k} but {data.path} has only {table.num_users} customers: "
            f"use K <= {table.num_users} (every merchant needs at least one customer)"
        )
    if spec.task == "review" and not any(t.strip() for t in table.text):
        raise ValueError(f"{data.path} has no review text: use task=recommender")


def resolve_run_dir(settings: EvaluateConfig, spec: EvalSpec) -> Path:
    if settings.run_dir:
        run_dir = Path(settings.run_dir).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"run_dir={run_dir} is not empty (it may hold privacy ledgers of an earlier evaluation): "
                "choose a new run_dir"
            )
        return run_dir
    return (Path.cwd() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-evaluate-{spec.task}").resolve()


def evaluate(settings: EvaluateConfig, spec: EvalSpec, run_dir: Path, command: list[str] | None = None) -> dict[str, Path]:
    """Run the whole grid; returns the written files (results json/csv/md, plot png).

    Uses ``evaluate.threads`` torch threads while it runs and restores the caller's setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, spec.threads))
    try:
        with warnings.catch_warnings():
            for message in (".*Secure RNG turned off.*", ".*Full backward hook is firing.*", ".*Optimal order is the.*"):
                warnings.filterwarnings("ignore", message=message)  # Opacus notes repeated per training session
            return _evaluate(settings, spec, run_dir, command)
    finally:
        torch.set_num_threads(threads)


def _evaluate(settings: EvaluateConfig, spec: EvalSpec, run_dir: Path, command: list[str] | None) -> dict[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(settings), sort_keys=False))
    privacy = settings.privacy
    local = local_training_config(settings.task)
    meta = {
        "task": spec.task,
        "data": data_label(settings),
        "model": getattr(settings.task, "model", None),
        "unit": "customer" if spec.task == "recommender" else "review",
        "delta": float(privacy.delta or 0.0),
        "accountant": privacy.accountant,
        "max_grad_norm": privacy.max_grad_norm,
        "rounds": spec.rounds,
        "participation": "all merchants every round" if spec.stores_per_round is None
        else f"{spec.stores_per_round} merchants per round",
        "local_epochs": local.epochs,
        "local": dataclasses.asdict(local),
        "strategy": dataclasses.asdict(settings.strategy),
        "federated_path": FEDERATED_PATH,
        "command": " ".join(command or []),
        "machine": machine_description(spec.threads),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows: list[dict] = []
    started = time.time()
    paths: dict[str, Path] = {}
    for n, cell in enumerate(spec.cells, 1):
        print(f"[{n}/{len(spec.cells)}] {cell.name} ({time.time() - started:.0f} s)", flush=True)
        rows += evaluate_cell(settings, spec, cell, run_dir / cell.name)
        meta["wall_seconds"] = round(time.time() - started, 1)
        paths = write_results(run_dir, spec.task, meta, rows)
    paths["png"] = privacy_utility_plot(
        run_dir / "privacy_utility.png", spec.task, summarize(rows), meta["unit"], meta["delta"]
    )
    if len({c.num_merchants for c in spec.cells}) > 1:
        scale = dp_ratio_by_customers(run_dir / "dp_ratio_by_customers.png", spec.task, rows, meta["delta"])
        if scale is not None:
            paths["scale_png"] = scale
    return paths


def evaluate_cell(settings: EvaluateConfig, spec: EvalSpec, cell: Cell, cell_dir: Path) -> list[dict]:
    """Every method of one cell, on one partition and one held-out split."""
    base = cell_settings(settings, cell, spec)
    dp_task = resolved_task(base.task, private=True)  # the task config of the DP methods
    base = dataclasses.replace(base, privacy=dataclasses.replace(base.privacy, ledger_dir=None),
                               task=resolved_task(base.task, private=False))
    catalog, first = load_simulated(base.data, base.seed, 0)
    merchants = [first] + [load_simulated(base.data, base.seed, k)[1] for k in range(1, cell.num_merchants)]
    task = build_task(base.task, catalog, seed=base.seed, privacy_unit=base.privacy.unit)
    local_cfg = local_training_config(base.task)
    device = choose_device(settings.device)  # as merchants choose theirs
    privacy = base.privacy
    customers = sum(m.num_users for m in merchants)
    rows: list[dict] = []

    def add(method: str, metrics: dict, seconds: float, epsilon: float | None = None, info: dict | None = None) -> None:
        info = info or {}
        rows.append({
            "task": spec.task,
            "data": settings.data.source,
            "num_merchants": cell.num_merchants,
            "partition": cell.partition,
            "customers": customers,
            "seed": cell.seed,
            "method": method,
            "epsilon": epsilon,
            "epsilon_spent": info.pop("epsilon_spent", None),
            "delta": float(privacy.delta) if epsilon is not None else None,
            "unit": task.privacy_unit,
            "accountant": privacy.accountant if epsilon is not None else None,
            "private": epsilon is not None,
            "seconds": round(seconds, 2),
            "metrics": metrics,
            "details": info,
        })

    def model_metrics(metrics: dict) -> dict:
        return methods.strip_local_baselines(metrics, LOCAL_BASELINE_PREFIX[spec.task])[0]

    dp = {key: getattr(privacy, key) for key in ("delta", "max_grad_norm", "grad_sample_mode", "accountant")}
    for method in spec.methods:
        epsilons = spec.epsilons if method in DP_METHODS else (None,)
        for epsilon in epsilons:
            t0 = time.time()
            if method in ("popularity", "majority"):
                fn = methods.popularity if method == "popularity" else methods.majority
                global_metrics, local_metrics = fn(task, merchants)
                add(method, global_metrics, time.time() - t0)
                add(f"local_{method}", local_metrics, time.time() - t0)
            elif method == "tfidf_logreg":
                add(method, methods.tfidf_logreg(task, merchants, spec.tfidf_max_features, cell.seed), time.time() - t0)
            elif method in ("centralized", "centralized_dp"):
                dp_cfg = None if epsilon is None else dict(dp, epsilon=epsilon)
                metrics, info = methods.centralized(task, merchants, local_cfg, spec.rounds, dp_cfg, device)
                add(method, model_metrics(metrics), time.time() - t0, epsilon, info)
            elif method == "local":
                add(method, model_metrics(methods.local_only(task, merchants, local_cfg, spec.rounds, device)), time.time() - t0)
            elif method in ("federated_dp_distributed", "federated_dp_distributed_prior"):
                dist = distributed_settings(dataclasses.replace(base, task=dp_task), merchants, task, local_cfg,
                                            spec, epsilon, method.endswith("prior"))
                name = f"{method}-eps{epsilon:g}"
                result = run_distributed(dist, cell_dir / name)
                fed_task, model = global_model(dist, cell_dir / name, result.state)
                metrics = model_metrics(methods.evaluate_model(fed_task, model, merchants, device))
                spent = result.epsilon_by_merchant.values()
                info = {"trained_updates": result.trained, "refused": result.refused,
                        "epsilon_spent": max(spent) if spent else 0.0, "rounds": dist.federation.rounds,
                        "sample_rate": dist.privacy.sample_rate, "noise_multiplier": result.noise_multipliers[0],
                        "mode": "distributed (Skellam shares, one DP-SGD step per round over all merchants' units)"}
                add(method, metrics, time.time() - t0, epsilon, info)
                rows[-1]["accountant"] = "skellam-rdp (population-level)"
            else:  # federated, federated_dp
                fed = dataclasses.replace(base, privacy=dataclasses.replace(
                    privacy, enabled=epsilon is not None, epsilon=epsilon or float("inf"), person_epsilon=None))
                name = method if epsilon is None else f"{method}-eps{epsilon:g}"
                result = run_federated(fed, cell_dir / name)
                fed_task, model = global_model(fed, cell_dir / name, result.state)
                metrics = model_metrics(methods.evaluate_model(fed_task, model, merchants, device))
                info = {"trained_updates": result.trained, "refused": result.refused}
                if epsilon is not None:
                    spent = result.epsilon_by_merchant.values()
                    info.update(
                        epsilon_spent=max(spent) if spent else 0.0,
                        planned_rounds=result.planned_rounds,
                        noise_multiplier_min=min(result.noise_multipliers, default=None),
                        noise_multiplier_max=max(result.noise_multipliers, default=None),
                    )
                add(method, metrics, time.time() - t0, epsilon, info)
            print(f"    {rows[-1]['method']:<16} eps={_fmt(epsilon):<5} {_brief(rows[-1]['metrics'])} "
                  f"({rows[-1]['seconds']:.1f} s)", flush=True)
    (cell_dir / "rows.json").parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cell_dir / "rows.json", json.dumps(rows, indent=2, default=str))
    return rows


def distributed_settings(base, merchants, task, local_cfg, spec: EvalSpec, epsilon: float, prior: bool = False):
    """The distributed run of a cell: every merchant each round, the per-unit rate and step count of
    centralized DP-SGD on the pooled units (same model, optimizer, epsilon and delta), noise planned
    over all rounds (after the DP popularity release when ``prior``)."""
    units = sum(len(task.train_dataset(m)) for m in merchants)
    plan = plan_sampling(units, local_cfg.batch_size, local_cfg.epochs * spec.rounds)
    k = base.federation.num_stores
    privacy = dataclasses.replace(
        base.privacy, enabled=True, epsilon=epsilon, person_epsilon=None, mode="distributed", sample_rate=plan.sample_rate,
        noise_multiplier="auto", planned_rounds=plan.steps, min_survivors=None, grad_sample_mode="hooks",
    )
    federation = dataclasses.replace(base.federation, stores_per_round=k, eval_stores_per_round=k, rounds=plan.steps)
    task_cfg = dataclasses.replace(base.task, popularity_prior=True) if prior else base.task
    if task_cfg.model == "item_item":  # two one-shot releases, every customer (q = 1), no DP-SGD steps
        privacy = dataclasses.replace(privacy, sample_rate=None, planned_rounds=None)
        federation = dataclasses.replace(federation, rounds=2)
    return dataclasses.replace(base, privacy=privacy, federation=federation, task=task_cfg)



def data_label(settings: EvaluateConfig) -> str:
    """``amazon:FILE`` for a public data set, ``virtual:...`` with the generator's settings otherwise."""
    data = settings.data
    if data.source == "virtual":
        return "virtual:" + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(data.generator).items())
    return f"{data.source}:{Path(data.path).name}"


def machine_description(threads: int) -> str:
    """CPU count and library versions, for the record."""
    from importlib.metadata import version

    libs = ", ".join(f"{name} {version(name)}" for name in ("torch", "flwr", "opacus"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (training on CPU)"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch threads {threads}; {libs}"


def _fmt(epsilon: float | None) -> str:
    return "-" if epsilon is None else f"{epsilon:g}"


def _brief(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("num-examples", "merchants") and not k.startswith("sampled"))
