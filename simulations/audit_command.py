"""``storefed audit [key=value ...]``: one-run canary audit, printed and written to ``<run_dir>/audit.json``.

Configuration: ``storefed.config.schema.AuditConfig`` (task, privacy and data groups as for
``storefed simulate``, plus the ``audit`` block). Exit status 0 when the audit ran, 2 with one line naming the problem
when the configuration is unusable. What the numbers mean (and do not mean): ``STATEMENT``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

from storefed.atomic_files import atomic_write_text
from storefed.config.schema import AuditConfig
from storefed.simulations.audit_run import AuditConfigError, AuditPlan, AuditRun, real_histories_of_stores, run_audit

STATEMENT = (
    "An audit lower bound can only show leakage, never prove privacy: a small or zero bound does not "
    "mean the run is private, and only the theoretical epsilon is a guarantee. A bound far below the "
    "theoretical epsilon is expected for a one-run black-box audit (Steinke, Nasr & Jagielski 2023 "
    "report the same for DP-SGD); a bound above it would be evidence, at the stated confidence, that "
    "the guarantee does not hold for this run."
)
DEFAULT_GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
METHOD = "one-run canary audit (Steinke, Nasr & Jagielski, NeurIPS 2023, Theorem 5.2 with delta)"


def _int(value, key: str, minimum: int, hint: str = "") -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or int(value) != value or value < minimum:
        raise AuditConfigError(f"{key}={value!r}: expected an integer >= {minimum}{hint}")
    return int(value)


def _float(value, key: str, low: float, high: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AuditConfigError(f"{key}={value!r}: expected a number {what}") from None
    if not (low < number < high):
        raise AuditConfigError(f"{key}={value!r}: must be {what}")
    return number


def _audit_delta(value, default: float) -> float:
    """Delta of the tested hypothesis: ``audit.delta``, or ``default`` when null; 0 tests pure DP."""
    try:
        number = default if value is None else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (0.0 <= number < 1.0):
        raise AuditConfigError(f"audit.delta={value!r}: must be in [0, 1), e.g. 1e-5 (null = privacy.delta)")
    return number


def build_plan(cfg: AuditConfig) -> AuditPlan:
    """Validate the composed configuration and build the audit plan (one clear error per problem)."""
    from storefed.client.local_training import LocalTrainingConfig
    from storefed.data.sources import generator_config
    from storefed.data.virtual_stores import generate_catalog, generate_store
    from storefed.privacy.accounting import check_accountant
    from storefed.privacy.dp_sgd import GRAD_SAMPLE_MODES
    from storefed.privacy.person_budget import task_epsilon

    task, privacy, data = cfg.task, dataclasses.asdict(cfg.privacy), cfg.data
    audit = dataclasses.asdict(cfg.audit)
    if task.name != "recommender":
        raise AuditConfigError(
            f"task={task.name!r}: storefed audit audits the recommender (DP unit = customer, canaries are "
            "random-history customers); use task=recommender"
        )
    if data.source != "virtual":
        raise AuditConfigError(f"data={data.source!r}: storefed audit runs on virtual stores; use data=virtual")
    m = _int(audit["canaries"], "audit.canaries", 2, " (hundreds of canaries give a useful bound, e.g. 1000)")
    guesses = audit["guesses"]
    if guesses is None:  # default: 5%, 10%, 20%, 50% and 100% of the canaries
        guesses = sorted({max(1, round(m * f)) for f in DEFAULT_GUESS_FRACTIONS})
    elif not isinstance(guesses, list):
        guesses = [guesses]
    if not guesses:
        raise AuditConfigError("audit.guesses=[]: give at least one guess count, e.g. audit.guesses=[100]")
    guesses = [_int(r, "audit.guesses", 1, " for every guess count, e.g. audit.guesses=[100,500]") for r in guesses]
    if max(guesses) > m:
        raise AuditConfigError(
            f"audit.guesses={guesses}: {max(guesses)} guesses but only audit.canaries={m} canaries; "
            "each guess count must be at most the number of canaries"
        )
    length = _int(audit["canary_length"], "audit.canary_length", 2)
    gen = generator_config(data, cfg.seed)
    catalog = generate_catalog(gen)
    if length > catalog.num_items:
        raise AuditConfigError(f"audit.canary_length={length}: at most the catalog size {catalog.num_items}")
    confidence = _float(audit["confidence"], "audit.confidence", 0.0, 1.0, "strictly between 0 and 1, e.g. 0.95")
    stores = _int(audit["stores"], "audit.stores", 0)
    epochs = _int(task.epochs if audit["epochs"] is None else audit["epochs"], "audit.epochs", 1)
    batch_size = _int(task.batch_size, "task.batch_size", 1)
    private = bool(privacy["enabled"])
    epsilon, delta = task_epsilon(cfg.privacy), float(privacy["delta"])
    if private:
        epsilon = _float(epsilon, "privacy.epsilon", 0.0, math.inf, "a finite number > 0, e.g. 8")
        delta = _float(privacy["delta"], "privacy.delta", 0.0, 1.0, "strictly between 0 and 1, e.g. 1e-5")
        try:
            check_accountant(str(privacy["accountant"]))
        except ValueError as exc:
            raise AuditConfigError(str(exc)) from None
        if privacy["noise_multiplier"] != "auto":
            _float(privacy["noise_multiplier"], "privacy.noise_multiplier", 0.0, math.inf, "> 0 or auto")
        _float(privacy["max_grad_norm"], "privacy.max_grad_norm", 0.0, math.inf, "> 0")
        if privacy["grad_sample_mode"] not in GRAD_SAMPLE_MODES:
            mode = privacy["grad_sample_mode"]
            raise AuditConfigError(f"privacy.grad_sample_mode={mode!r}: choose one of {GRAD_SAMPLE_MODES}")
    audit_delta = _audit_delta(audit["delta"], delta if private else 1e-5)
    real = real_histories_of_stores([generate_store(gen, s) for s in range(stores)], task.max_history)
    return AuditPlan(
        task_cfg=task,
        seed=cfg.seed,
        catalog=catalog,
        real_histories=real,
        canaries=m,
        canary_length=length,
        canary_seed=_int(audit["seed"], "audit.seed", 0),
        guesses=guesses,
        confidence=confidence,
        audit_delta=audit_delta,
        local=LocalTrainingConfig(epochs, batch_size, task.lr, task.optimizer),
        private=private,
        epsilon_target=epsilon,
        delta=delta,
        accountant=str(privacy["accountant"]),
        noise_multiplier=privacy["noise_multiplier"] if privacy["noise_multiplier"] == "auto" else float(privacy["noise_multiplier"]),
        max_grad_norm=float(privacy["max_grad_norm"]),
        grad_sample_mode=str(privacy["grad_sample_mode"]),
        mode=str(privacy["mode"]),
        noise_shares=max(1, stores),
    )


def _finite(x: float) -> float | None:
    """JSON has no NaN: a threshold of an empty guess side is null."""
    return None if math.isnan(x) else x


def audit_record(plan: AuditPlan, run: AuditRun) -> dict:
    """The contents of ``audit.json`` (numbers, units and the plain-English statement)."""
    b = run.bound
    guess = b.best
    return {
        "method": METHOD,
        "task": "recommender",
        "unit": "customer",
        "theoretical": {
            "private": plan.private,
            "epsilon": run.epsilon_theory,  # null without DP: no guarantee at all
            "epsilon_target": plan.epsilon_target if plan.private else None,
            "delta": plan.delta if plan.private else None,
            "accountant": plan.accountant if plan.private else None,
            "sampling": "Poisson" if plan.private else "shuffled batches (no DP)",
            "sample_rate": run.sample_rate,
            "noise_multiplier": run.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm if plan.private else None,
            "steps": run.steps,
            "epochs": plan.local.epochs,
            "batch_size": plan.local.batch_size,
            "mode": plan.mode if plan.private else None,
            "guarantee": (
                f"({run.epsilon_theory:.4g}, {plan.delta:g})-DP per customer, population-level, Skellam RDP "
                f"accountant, Poisson sampling, distributed mode ({plan.noise_shares} noise shares)"
                if plan.private and plan.mode == "distributed"
                else f"({run.epsilon_theory:.4g}, {plan.delta:g})-DP per customer, {plan.accountant.upper()} accountant, "
                "Poisson sampling"
                if plan.private
                else "NONE: privacy=none, this training run carries no differential-privacy guarantee"
            ),
        },
        "empirical": {
            "epsilon_lower_bound": b.epsilon_lower,
            "confidence": b.confidence,
            "delta": b.delta,
            "canaries": b.canaries,
            "canaries_included": int(run.canaries.included.sum()),
            "guesses": guess.guesses,
            "guesses_in": guess.k_in,
            "guesses_out": guess.k_out,
            "correct": guess.correct,
            "correct_in": guess.correct_in,
            "correct_out": guess.correct_out,
            "score": "minus the canary's mean next-item cross-entropy (nats); higher = guessed in",
            "threshold_in": _finite(guess.threshold_in),
            "threshold_out": _finite(guess.threshold_out),
            "loss_threshold_in": _finite(-guess.threshold_in),  # guessed "in": mean canary loss <= this (nats)
            "loss_threshold_out": _finite(-guess.threshold_out),  # guessed "out": mean canary loss >= this (nats)
            "guess_counts_tried": [g.guesses for g, _ in b.tested],
            "bounds_per_guess_count": [
                {"guesses": g.guesses, "correct": g.correct, "epsilon_lower_bound": eps} for g, eps in b.tested
            ],
            "multiple_testing": (
                f"Bonferroni over {len(b.tested)} guess count(s): each tested at level {b.level_per_test:.4g}"
            ),
        },
        "data": {
            "dp_units": run.num_units,
            "real_customers": run.real_units,
            "canary_length": plan.canary_length,
            "canary_seed": plan.canary_seed,
            "train_loss": run.train_loss,
        },
        "statement": STATEMENT,
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_report(record: dict) -> str:
    """The printed report: theoretical guarantee next to the empirical lower bound."""
    t, e, d = record["theoretical"], record["empirical"], record["data"]
    if t["private"]:
        kind = "distributed DP-SGD (Skellam noise shares, summed)" if t.get("mode") == "distributed" else "DP-SGD (Opacus)"
        training = (
            f"{kind}, Poisson sampling rate {t['sample_rate']:.4g}, "
            f"noise multiplier {t['noise_multiplier']:.4g}, max_grad_norm {t['max_grad_norm']:g}, {t['steps']} steps"
        )
        accountant = "Skellam RDP, population-level" if t.get("mode") == "distributed" else t["accountant"].upper()
        theory = (
            f"{t['epsilon']:.3f} (per customer, delta={t['delta']:g}, {accountant} accountant, Poisson sampling)"
        )
    else:
        training = f"NO differential privacy (privacy=none), {t['steps']} steps"
        theory = "none: privacy=none carries no guarantee (epsilon = infinity)"
    lines = [
        f"StoreFed audit: {record['method']}",
        f"  training        : {training}; {d['dp_units']} customers "
        f"({d['real_customers']} real + {e['canaries_included']} canaries)",
        f"  theoretical eps : {theory}",
        f"  canaries        : m={e['canaries']} random-history customers ({d['canary_length']} items), "
        "each included with probability 1/2",
        f"  guesses         : {e['guesses']} ({e['guesses_in']} in, {e['guesses_out']} out, the rest abstained), "
        f"correct {e['correct']} ({e['correct_in']} in + {e['correct_out']} out)",
        f"  score threshold : in if loss <= {_fmt(e['loss_threshold_in'])} nats, "
        f"out if loss >= {_fmt(e['loss_threshold_out'])} nats",
        f"  empirical eps   : >= {e['epsilon_lower_bound']:.3f} at {e['confidence']:.0%} confidence "
        f"(delta={e['delta']:g}; {e['multiple_testing']}; tried {e['guess_counts_tried']})",
        f"  note            : {record['statement']}",
    ]
    return "\n".join(lines)


def _run_dir(cfg: AuditConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).resolve()
    mode = "dp" if cfg.privacy.enabled else "none"
    return Path.cwd() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-audit-{mode}"


def run_audit_command(cfg: AuditConfig) -> int:
    """Run the audit of the composed ``cfg``, print it and write ``audit.json``."""
    from storefed.client.device import choose_device

    try:
        plan = build_plan(cfg)
        try:
            device = choose_device(cfg.device)
        except (ValueError, RuntimeError) as exc:
            raise AuditConfigError(str(exc)) from None
        with warnings.catch_warnings():
            # secure_mode is off on purpose: dp_sgd seeds its noise generator from OS entropy (see there)
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")  # ghost clipping, benign
            run = run_audit(plan, device)
    except AuditConfigError as exc:
        print("storefed audit: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    record = audit_record(plan, run)
    out = _run_dir(cfg) / "audit.json"
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(format_report(record))
    print(f"  written         : {out}")
    return 0
