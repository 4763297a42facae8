"""What every coordinator run path starts from: the merchants' round config, the catalog, the task
and its initial shared tensors; and the run's ``status.json``.

Shared by the plain federation (server_app.py), the SecAgg+ federation (secure_aggregation.py)
and the in-process evaluation, so all three send merchants the same thing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from storefed.atomic_files import atomic_write_text
from storefed.config.schema import FederationConfig, PrivacyConfig, RunConfig
from storefed.config.validate import ConfigError, noise_multiplier_value
from storefed.data.schema import Catalog
from storefed.data.sources import coordinator_catalog
from storefed.models.task import Task, build_task
from storefed.privacy.person_budget import task_epsilon
from storefed.privacy.skellam import SkellamPlan
from storefed.server.checkpoint import load_checkpoint, owner, run_owner_alive
from storefed.wire import MerchantPrivacy, RoundConfig


class RunFailed(RuntimeError):
    """The federated run could not produce a trustworthy model."""


def default_planned_rounds(federation: FederationConfig) -> int:
    """Rounds a merchant plans its noise for: twice its expected participations, at least 2.

    A merchant sampled more often than planned still never exceeds its budget: later rounds
    get the remaining budget or are refused (client/training_round.py).
    """
    rounds, per_round, stores = federation.rounds, federation.stores_per_round, federation.num_stores
    return min(rounds, max(2, math.ceil(2 * rounds * per_round / stores)))


def merchant_privacy(privacy: PrivacyConfig, federation: FederationConfig, run_dir: Path) -> MerchantPrivacy:
    """The merchant-side privacy settings proposed for this run (a merchant may lower budget or delta)."""
    return MerchantPrivacy(
        enabled=privacy.enabled,
        epsilon=task_epsilon(privacy),
        person_epsilon=privacy.person_epsilon,
        person_tasks=len(privacy.person_tasks),
        delta=privacy.delta,
        unit=privacy.unit,
        max_grad_norm=privacy.max_grad_norm,
        noise_multiplier=noise_multiplier_value(privacy.noise_multiplier) if privacy.enabled else None,
        planned_rounds=privacy.planned_rounds or default_planned_rounds(federation),
        accountant=privacy.accountant,
        grad_sample_mode=privacy.grad_sample_mode,
        ledger_dir=privacy.ledger_dir or str(run_dir / "ledgers"),
    )


def round_config(settings: RunConfig, run_dir: Path) -> RoundConfig:
    """What every merchant receives each round: task, merchant-side privacy, data source, seed, run id."""
    return RoundConfig(
        task=settings.task,
        privacy=merchant_privacy(settings.privacy, settings.federation, run_dir),
        data=settings.data,
        seed=settings.seed,
        device=settings.device,
        run_id=run_dir.name,
        failure_rate=float(settings.federation.failure_rate),
        update_encoding=settings.federation.update_encoding,
        failure_hang_s=(float(settings.federation.round_timeout_s) + 2.0
                        if settings.federation.failure_mode == "hang" else 0.0),
    )


@dataclass(frozen=True)
class RunSetup:
    """The merchants' round config, the catalog, the task and its freshly initialised shared tensors."""

    to_clients: RoundConfig
    catalog: Catalog
    task: Task
    shared: dict[str, torch.Tensor]  # in task order
    skellam: SkellamPlan | None = None  # privacy.mode=distributed: the public plan of every round
    prior: SkellamPlan | None = None  # distributed + task.popularity_prior: the one-shot release's plan

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes every merchant update must carry."""
        return {k: tuple(v.shape) for k, v in self.shared.items()}


def prepare_run(settings: RunConfig, run_dir: Path) -> RunSetup:
    """Round config, catalog, task and initial model for a run (plain, secure or in-process)."""
    to_clients = round_config(settings, run_dir)
    catalog = coordinator_catalog(settings.data, settings.seed)
    task = build_task(settings.task, catalog, seed=settings.seed, privacy_unit=settings.privacy.unit)
    model = task.build_model()
    state = model.state_dict()
    shared = {k: state[k] for k in task.shared_keys(model)}
    if settings.privacy.mode != "distributed":
        return RunSetup(to_clients, catalog, task, shared)
    from storefed.server.distributed_dp import distributed_plan, prior_plan, sample_rate, with_plan

    prior = prior_plan(settings, catalog.num_items)
    plan = distributed_plan(settings, sum(v.numel() for v in shared.values()), prior)
    return RunSetup(with_plan(to_clients, plan, sample_rate(settings), prior), catalog, task, shared, plan, prior)


def write_status(run_dir: Path, status: str, error: str | None = None, detail: str | None = None) -> None:
    """``status.json``: ``running`` | ``completed`` | ``failed`` with the reason (written atomically)."""
    payload = {"status": status, "time": time.time(), "error": error, "traceback": detail}
    if status == "running":  # who owns it: a run left `running` by a dead process can be told apart
        payload |= owner()
    atomic_write_text(run_dir / "status.json", json.dumps(payload, indent=2))


def check_run_dir(settings: RunConfig, run_dir: Path) -> None:
    """Before anything starts: a new run needs a fresh run dir; ``resume=true`` needs a resumable one.

    Raises ConfigError naming what is wrong and what to do."""
    from storefed.config.serialize import to_dict

    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text(encoding="utf-8")) if status_file.is_file() else None
    if not settings.resume:
        if status is not None:
            raise ConfigError(f"run_dir={run_dir} already holds a run (status {status.get('status')}): choose a new "
                              "run_dir, or pass resume=true to continue it from its last complete round")
        return
    if settings.privacy.secure_aggregation or settings.privacy.mode == "distributed":
        raise ConfigError("resume=true is not supported under secure aggregation (privacy.secure_aggregation=true or "
                          "privacy.mode=distributed): the SecAgg+ workflow keeps its round state inside Flower; "
                          "start a new run_dir")
    if status is None:
        raise ConfigError(f"resume=true but run_dir={run_dir} holds no run (no status.json): give the run_dir of the "
                          "run to continue")
    if status.get("status") == "completed":
        raise ConfigError(f"run_dir={run_dir} already completed: nothing to resume")
    if run_owner_alive(status):
        raise ConfigError(f"run_dir={run_dir} is still running (pid {status.get('pid')} on {status.get('host')}): "
                          "stop it before resuming")
    saved = next((run_dir / n for n in ("config.yaml", "settings.json") if (run_dir / n).is_file()), None)
    if saved is not None:
        import yaml

        text = saved.read_text(encoding="utf-8")
        before = _flat((json.loads(text) if saved.suffix == ".json" else yaml.safe_load(text)) or {})
        now = _flat(to_dict(settings))
        changed = sorted(k for k in before.keys() | now.keys() if k not in ("resume", "run_dir")
                         and before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k}={_value(now.get(k))} (was {_value(before.get(k))})" for k in changed[:5])
            raise ConfigError(f"resume=true must keep the run's settings, but {shown} changed: resume with the "
                              "original settings, or start a new run_dir")
    load_checkpoint(run_dir)  # a damaged checkpoint is refused here, before anything starts


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_someone_trained(rounds: int, trained: int, refusals: list[str]) -> None:
    """A run in which no merchant trained in any round has no model to offer: it fails, with the reason."""
    if trained == 0:
        reason = refusals[0] if refusals else "no merchant replied with an update"
        raise RunFailed(f"no merchant trained in any of the {rounds} round(s); e.g. {reason}")


def _value(value: object) -> str:
    """A config value as the user writes it in an override (null, not None)."""
    return "null" if value is None else repr(value)
