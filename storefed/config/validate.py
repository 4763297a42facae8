"""Range checks of a composed configuration: one line naming key, value and the allowed range.

Types are enforced by OmegaConf against the dataclasses (``task.lr=abc`` fails there); this module
checks what types cannot say: epsilon finite and > 0, delta in (0, 1), counts >= 1, choices. It also
re-checks types (and refuses NaN) for a config built without OmegaConf, e.g. by serialize.from_dict.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from storefed.config import schema as s

DEVICES = "auto | cpu | cuda | cuda:N"
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "book", "ghost", "hooks")  # privacy/dp_sgd.py (the config layer cannot import it)
CENTRAL_MODES = ("none", "fixed", "adaptive")
OPTIMIZERS = ("adam", "sgd")


TASKS = ("recommender", "review")


class ConfigError(ValueError):
    """A configuration value is out of range; the message is one line naming key, value and range."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive(key: str, value: float, finite: bool = True) -> None:
    if not (value > 0 and (math.isfinite(value) or not finite)):
        _fail(key, value, "must be a finite number > 0" if finite else "must be > 0")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        _fail(key, value, f"must be an integer >= {low}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, f"choose one of {list(choices)}")


def _open_unit(key: str, value: float) -> None:
    if not 0 < value < 1:
        _fail(key, value, "must lie strictly between 0 and 1")


def noise_multiplier_value(text: str) -> float | None:
    """``privacy.noise_multiplier`` as a number, or None for ``auto`` (raises ConfigError otherwise)."""
    if str(text).strip() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"privacy.noise_multiplier={text!r} is not allowed: use auto or a number > 0") from None
    return value


def validate(cfg: Any) -> None:
    """Check every section present in ``cfg`` (a root config of storefed.config.schema)."""
    if is_dataclass(cfg):
        _types(cfg)
    checks = {
        "task": _task, "privacy": _privacy, "federation": _federation, "data": _data,
        "strategy": _strategy, "evaluate": _evaluate, "audit": _audit,
    }
    for name, check in checks.items():
        if hasattr(cfg, name):
            check(getattr(cfg, name), cfg)
    if hasattr(cfg, "device"):
        _device(cfg.device)
    if hasattr(cfg, "seed"):
        _at_least("seed", cfg.seed, 0)
    if isinstance(cfg, s.EvaluateConfig) and cfg.resume:
        _fail("resume", cfg.resume, "is for storefed simulate and server runs: an evaluation grid reruns from the start")
    if isinstance(cfg, s.MerchantConfig):
        _merchant(cfg)
    if isinstance(cfg, s.CertsConfig):
        _at_least("days", cfg.days, 1)


def _types(node: Any, prefix: str = "") -> None:
    """Every value has its field's type and no number is NaN (every range check is false for NaN).

    OmegaConf enforces types on the command line; a hand-edited file (serialize.from_dict) is not, so a
    wrong type would otherwise surface as a TypeError or AttributeError from a range check below."""
    hints = typing.get_type_hints(type(node))
    for f in fields(node):
        key, value, hint = f"{prefix}{f.name}", getattr(node, f.name), hints[f.name]
        if f.name == "defaults":
            continue
        if is_dataclass(value) and not isinstance(value, type):
            _types(value, f"{key}.")
        elif hint is Any or is_dataclass(hint):
            _fail(key, value, "must be a section (key: value pairs)")
        elif not _fits(value, hint):
            _fail(key, value, f"must be {_type_name(hint)}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a float (not NaN)", str: "a string",
               type(None): "null"}


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return not math.isnan(float(value))
        except OverflowError:  # an integer beyond any float
            return False
    if hint in (int, str, bool, type(None)):
        return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    return hint is Any


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"a list (each {_type_name(args[0])})" if args else "a list"
    return _TYPE_NAMES.get(hint, "a value")


def _device(device: str) -> None:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    _fail("device", device, f"choose {DEVICES}")


def _task(task: s.TaskConfig, cfg: Any) -> None:
    _at_least("task.epochs", task.epochs, 1)
    _at_least("task.batch_size", task.batch_size, 1)
    _positive("task.lr", task.lr)
    _choice("task.optimizer", task.optimizer, OPTIMIZERS)
    if isinstance(task, s.RecommenderConfig):
        for key in ("embedding_dim", "max_history", "top_k", "sampled_candidates"):
            _at_least(f"task.{key}", getattr(task, key), 1)
        _item_buckets(task)
        if task.prior_noise_multiplier is not None:
            _positive("task.prior_noise_multiplier", task.prior_noise_multiplier)
        if task.prior_budget_fraction is not None:
            _open_unit("task.prior_budget_fraction", task.prior_budget_fraction)
        privacy = getattr(cfg, "privacy", None)
        if task.popularity_prior and (privacy is None or privacy.mode != "distributed"):
            _fail("task.popularity_prior", True, "needs privacy.mode=distributed (the release goes through its "
                  "integer noise shares and secure sum)")
        _item_item(task, cfg)
    else:
        _choice("task.labels", task.labels, ("polarity", "three_class"))
        _choice("task.encoder", task.encoder, ("frozen", "lora", "scratch"))
        _choice("task.holdout", task.holdout, ("test", "validation"))
        if not (isinstance(task.prior_tau, (int, float)) and 0 <= task.prior_tau <= 2):
            _fail("task.prior_tau", task.prior_tau, "must lie in [0, 2] (0: plain argmax, 1: balanced-error rule)")
        _open_unit("task.validation_fraction", task.validation_fraction)
        _choice("task.pooling", task.pooling, ("mean", "cls"))
        for key in ("vocab_size", "max_length", "embed_batch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_reviews_per_user", "lora_r", "lora_alpha"):
            _at_least(f"task.{key}", getattr(task, key), 1)
        if task.hidden_size % task.num_heads:
            _fail("task.hidden_size", task.hidden_size, f"must be a multiple of task.num_heads={task.num_heads}")
        _open_unit("task.test_fraction", task.test_fraction)
        _positive("task.initializer_range", task.initializer_range)
        if task.class_weights is not None and (not task.class_weights or min(task.class_weights) <= 0):
            _fail("task.class_weights", task.class_weights, "null or a list of numbers > 0, one per class")
        if task.pretrained_dir is not None and not Path(task.pretrained_dir).is_dir():
            _fail("task.pretrained_dir", task.pretrained_dir, "must be an existing local checkpoint directory")


def _item_buckets(task: s.RecommenderConfig) -> None:
    """Hashed item tables (``task.item_buckets > 0``, models/hashed_items.py)."""
    for key in ("item_buckets", "item_hashes", "sampled_negatives"):
        if not isinstance(getattr(task, key), int) or isinstance(getattr(task, key), bool):
            _fail(f"task.{key}", getattr(task, key), "must be an integer")
    if task.item_buckets < 0:
        _fail("task.item_buckets", task.item_buckets, "must be 0 (one row per catalog item) or an integer >= 2 "
              "(the rows of each hashed item table, e.g. 4096)")
    if task.item_buckets == 1:
        _fail("task.item_buckets", 1, "one bucket would give every item the same score: use 0 (one row per "
              "catalog item) or an integer >= 2")
    _at_least("task.item_hashes", task.item_hashes, 1)
    _at_least("task.sampled_negatives", task.sampled_negatives, 1)
    if task.item_buckets > 0 and task.model != "history":
        _fail("task.item_buckets", task.item_buckets, f"hashed item tables are for task.model=history, not "
              f"{task.model!r}: use task.item_buckets=0")
    if task.item_buckets > 0 and task.popularity_prior:
        _fail("task.popularity_prior", True, "sets one output bias per catalog item: it needs task.item_buckets=0 "
              f"(now {task.item_buckets})")


def _item_item(task: s.RecommenderConfig, cfg: Any) -> None:
    _choice("task.model", task.model, ("history", "item_item"))
    _choice("task.objective", task.objective, ("next_item", "multinomial"))
    if not (isinstance(task.input_dropout, (int, float)) and 0 <= task.input_dropout < 1):
        _fail("task.input_dropout", task.input_dropout, "must lie in [0, 1)")
    _choice("task.holdout", task.holdout, ("test", "validation"))
    if task.candidate_items is not None:
        _at_least("task.candidate_items", task.candidate_items, 0)
    if task.ease_lambda is not None:
        _positive("task.ease_lambda", task.ease_lambda)
    if task.popularity_weight is not None and not (task.popularity_weight >= 0 and math.isfinite(task.popularity_weight)):
        _fail("task.popularity_weight", task.popularity_weight, "must be a finite number >= 0")
    privacy, federation = getattr(cfg, "privacy", None), getattr(cfg, "federation", None)
    if task.model != "item_item" or privacy is None or isinstance(cfg, s.EvaluateConfig):
        return
    if privacy.enabled and privacy.mode != "distributed":
        _fail("privacy.mode", privacy.mode, "must be distributed for task.model=item_item under DP: its statistics are "
              "released once through secure aggregation (local mode would add every merchant's full noise); "
              "or use privacy=none")
    if privacy.enabled and privacy.sample_rate not in (None, 1, 1.0):
        _fail("privacy.sample_rate", privacy.sample_rate, "must be null for task.model=item_item (its releases "
              "include every customer)")
    if federation is not None and privacy.enabled and federation.rounds != 2:
        _fail("federation.rounds", federation.rounds, "must be 2 for task.model=item_item under DP (round 1 "
              "releases popularity, round 2 the co-occurrence)")
    if federation is not None and federation.rounds < 2:
        _fail("federation.rounds", federation.rounds, "must be >= 2 for task.model=item_item (popularity first, "
              "then the co-occurrence of the most popular items)")


def _privacy(privacy: s.PrivacyConfig, cfg: Any) -> None:
    _choice("privacy.unit", privacy.unit, (None, "user", "customer", "review", "reviewer"))
    _choice("privacy.central", privacy.central, CENTRAL_MODES)
    _choice("privacy.mode", privacy.mode, ("local", "distributed"))
    if privacy.mode == "distributed":
        _distributed(privacy, cfg)
    if privacy.enabled:
        _budgets(privacy, cfg)
        _open_unit("privacy.delta", privacy.delta)
        _positive("privacy.max_grad_norm", privacy.max_grad_norm)
        noise = noise_multiplier_value(privacy.noise_multiplier)
        if noise is not None and not (noise > 0 and math.isfinite(noise)):
            _fail("privacy.noise_multiplier", privacy.noise_multiplier, "use auto or a finite number > 0")
        if privacy.planned_rounds is not None:
            _at_least("privacy.planned_rounds", privacy.planned_rounds, 1)
        _choice("privacy.accountant", privacy.accountant, ACCOUNTANTS)
        _choice("privacy.grad_sample_mode", privacy.grad_sample_mode, GRAD_SAMPLE_MODES)
    if privacy.central != "none":
        _positive("privacy.central_noise_multiplier", privacy.central_noise_multiplier)
        _positive("privacy.central_clipping_norm", privacy.central_clipping_norm)
        _open_unit("privacy.central_target_quantile", privacy.central_target_quantile)
        _positive("privacy.central_clip_norm_lr", privacy.central_clip_norm_lr)
        _positive("privacy.central_epsilon", privacy.central_epsilon)
        _open_unit("privacy.central_delta", privacy.central_delta)
    if privacy.secure_aggregation:
        _at_least("privacy.secagg_num_shares", privacy.secagg_num_shares, 3)
        _at_least("privacy.secagg_reconstruction_threshold", privacy.secagg_reconstruction_threshold, 2)
        _positive("privacy.secagg_clipping_range", privacy.secagg_clipping_range)
        _at_least("privacy.secagg_quantization_range", privacy.secagg_quantization_range, 2)
        _positive("privacy.secagg_max_weight", privacy.secagg_max_weight)
        if privacy.secagg_timeout_s is not None:
            _positive("privacy.secagg_timeout_s", privacy.secagg_timeout_s)


def _budgets(privacy: s.PrivacyConfig, cfg: Any) -> None:
    """Per-task and per-customer budgets: at least one set, the task's within the customer's."""
    if not privacy.person_tasks or len(set(privacy.person_tasks)) != len(privacy.person_tasks):
        _fail("privacy.person_tasks", list(privacy.person_tasks), f"list each task once, from {list(TASKS)}")
    for name in privacy.person_tasks:
        _choice("privacy.person_tasks", name, TASKS)
    if privacy.person_epsilon is not None:
        _positive("privacy.person_epsilon", privacy.person_epsilon)
    if privacy.epsilon is None and privacy.person_epsilon is None:
        _fail("privacy.epsilon", None, "set privacy.epsilon (this task's budget) or privacy.person_epsilon "
              "(one budget per customer, split between privacy.person_tasks)")
    if privacy.epsilon is not None:
        _positive("privacy.epsilon", privacy.epsilon)
    if privacy.person_epsilon is None:
        return
    if privacy.epsilon is not None and privacy.epsilon > privacy.person_epsilon:
        _fail("privacy.epsilon", privacy.epsilon, f"exceeds privacy.person_epsilon={privacy.person_epsilon:g}, "
              "the per-customer budget across tasks: lower it, raise privacy.person_epsilon, or set "
              "privacy.person_epsilon=null (per-task budget only, the per-customer value is then not enforced)")
    task = getattr(getattr(cfg, "task", None), "name", None)
    if task in TASKS and task not in privacy.person_tasks:
        _fail("privacy.person_tasks", list(privacy.person_tasks), f"must include the task this run trains ({task}) "
              "while privacy.person_epsilon is set")
    if getattr(cfg.task, "encoder", None) == "lora" and privacy.unit in (None, "review"):
        _fail("privacy.person_epsilon", privacy.person_epsilon, "task.encoder=lora trains one review per DP unit "
              "(no reviewer unit), so a customer's k reviews are covered only by group privacy, which a per-customer "
              "budget refuses: set privacy.person_epsilon=null (per-review budget, per-customer value reported) "
              "or use task.encoder=frozen")


def _distributed(privacy: s.PrivacyConfig, cfg: Any) -> None:
    if not privacy.enabled:
        _fail("privacy.mode", "distributed", "needs privacy=dp (distributed DP is a DP mechanism)")
    if privacy.central != "none":
        _fail("privacy.central", privacy.central, "must be none with privacy.mode=distributed (the noise is added "
              "by the merchants; client-level central DP needs individual updates)")
    if privacy.accountant != "rdp":
        _fail("privacy.accountant", privacy.accountant, "must be rdp with privacy.mode=distributed (Skellam RDP)")
    if privacy.sample_rate is not None and not 0 < privacy.sample_rate <= 1:
        _fail("privacy.sample_rate", privacy.sample_rate, "must lie in (0, 1]")
    if not 0 < privacy.rounding_overhead <= 0.5:
        _fail("privacy.rounding_overhead", privacy.rounding_overhead, "must lie in (0, 0.5]")
    if privacy.colluders < 0:
        _fail("privacy.colluders", privacy.colluders, "must be an integer >= 0")
    federation = getattr(cfg, "federation", None)
    if federation is not None:
        survivors = privacy.min_survivors or federation.stores_per_round
        if not 1 <= survivors <= federation.stores_per_round:
            _fail("privacy.min_survivors", privacy.min_survivors,
                  f"must lie in 1..federation.stores_per_round={federation.stores_per_round}")
        if survivors - privacy.colluders < 1:
            _fail("privacy.colluders", privacy.colluders, f"must be below privacy.min_survivors={survivors}")


def _federation(federation: s.FederationConfig, cfg: Any) -> None:
    _at_least("federation.num_stores", federation.num_stores, 1)
    _at_least("federation.rounds", federation.rounds, 1)
    _at_least("federation.client_cpus", federation.client_cpus, 1)
    if not 1 <= federation.stores_per_round <= federation.num_stores:
        _fail("federation.stores_per_round", federation.stores_per_round,
              f"must lie in 1..federation.num_stores={federation.num_stores}")
    if not 0 <= federation.evaluated_per_round() <= federation.num_stores:
        _fail("federation.eval_stores_per_round", federation.eval_stores_per_round,
              f"must lie in 0..federation.num_stores={federation.num_stores}")
    if not (isinstance(federation.failure_rate, (int, float)) and 0 <= federation.failure_rate < 1):
        _fail("federation.failure_rate", federation.failure_rate, "must lie in [0, 1)")
    if federation.failure_mode not in ("error", "hang"):
        _fail("federation.failure_mode", federation.failure_mode, "choose error or hang")
    _positive("federation.round_timeout_s", federation.round_timeout_s)
    if not (isinstance(federation.overselect, (int, float)) and 1 <= federation.overselect <= 10):
        _fail("federation.overselect", federation.overselect, "must lie in [1, 10] (1: no over-selection)")
    from storefed.update_codec import ENCODINGS

    if federation.update_encoding not in ENCODINGS:
        _fail("federation.update_encoding", federation.update_encoding, f"choose one of {' | '.join(ENCODINGS)}")
    if federation.failure_rate and isinstance(cfg, s.ServerRunConfig):
        _fail("federation.failure_rate", federation.failure_rate, "is for simulations: real merchants fail on their own")
    if federation.max_update_norm is not None:
        _positive("federation.max_update_norm", federation.max_update_norm)
    if not federation.client_gpus >= 0:
        _fail("federation.client_gpus", federation.client_gpus, "must be >= 0 (a fraction of a GPU per client)")
    if federation.ray_address is not None:
        problem = ray_address_problem(federation.ray_address)
        if problem:
            _fail("federation.ray_address", federation.ray_address, problem)
        if isinstance(cfg, s.ServerRunConfig):
            _fail("federation.ray_address", federation.ray_address, "is for storefed simulate: deployed merchants "
                  "connect over TLS gRPC, not through Ray")


def ray_address_problem(address: str) -> str | None:
    """Why ``address`` is not a Ray head's GCS address (``host:port`` or ``auto``), or None."""
    if address == "auto":
        return None
    if address.startswith("ray://"):
        return ("is a Ray Client address; give the head's GCS address host:port (`ray start --head` prints it, "
                "default port 6379)")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "must be host:port of the Ray head (e.g. 10.0.0.5:6379), or auto for the cluster on this machine"
    return None


def _data(data: s.DataConfig, cfg: Any) -> None:
    if isinstance(data, s.VirtualDataConfig):
        _choice("data.source", data.source, ("virtual",))
        gen = data.generator
        for key in ("num_items", "num_categories", "latent_dim", "min_customers", "max_customers"):
            _at_least(f"data.generator.{key}", getattr(gen, key), 1)
        for key in ("mean_customers", "mean_interactions", "category_alpha"):
            _positive(f"data.generator.{key}", getattr(gen, key))
        if gen.max_customers < gen.min_customers:
            _fail("data.generator.max_customers", gen.max_customers,
                  f"must be >= data.generator.min_customers={gen.min_customers}")
        if not 0 <= gen.review_probability <= 1:
            _fail("data.generator.review_probability", gen.review_probability, "must lie in [0, 1]")
        if gen.taste_strength < 0 or gen.review_noise < 0 or gen.sigma_customers < 0:
            _fail("data.generator", "negative value", "taste_strength, review_noise, sigma_customers must be >= 0")
    elif isinstance(data, s.ImportedDataConfig):
        _choice("data.source", data.source, ("amazon", "movielens"))
        _at_least("data.num_merchants", data.num_merchants, 1)
        _choice("data.partition", data.partition, ("iid", "dirichlet"))
        _positive("data.alpha", data.alpha)
        _choice("data.label", data.label, ("category", "item"))
        if not Path(data.path).is_file():
            _fail("data.path", data.path, f"no such file (from {Path.cwd()}): give the data set's path")
    else:
        _choice("data.source", data.source, ("files",))


def _strategy(strategy: s.StrategyConfig, cfg: Any) -> None:
    if isinstance(strategy, s.FedTrimmedAvgConfig) and not (isinstance(strategy.beta, (int, float))
                                                           and 0 <= strategy.beta < 0.5):
        _fail("strategy.beta", strategy.beta, "must lie in [0, 0.5) (the share trimmed at each end)")
    if isinstance(strategy, s.FedAdamConfig):
        for key in ("eta", "eta_l", "tau"):
            _positive(f"strategy.{key}", getattr(strategy, key))
        for key in ("beta_1", "beta_2"):
            if not 0 <= getattr(strategy, key) < 1:
                _fail(f"strategy.{key}", getattr(strategy, key), "must lie in [0, 1)")
    if isinstance(strategy, s.FedProxConfig) and strategy.proximal_mu < 0:
        _fail("strategy.proximal_mu", strategy.proximal_mu, "must be >= 0")


def _evaluate(evaluate: s.EvaluateSettings, cfg: Any) -> None:
    for key in ("num_merchants", "partitions", "seeds", "epsilons"):
        if not getattr(evaluate, key):
            _fail(f"evaluate.{key}", getattr(evaluate, key), "must list at least one value")
    for k in evaluate.num_merchants:
        _at_least("evaluate.num_merchants", k, 1)
    for eps in evaluate.epsilons:
        _positive("evaluate.epsilons", eps)
    for part in evaluate.partitions:
        _choice("evaluate.partitions", part, ("iid", "dirichlet"))
    _at_least("evaluate.rounds", evaluate.rounds, 1)
    _at_least("evaluate.threads", evaluate.threads, 1)
    if evaluate.stores_per_round is not None:
        _at_least("evaluate.stores_per_round", evaluate.stores_per_round, 1)


def _audit(audit: s.AuditSettings, cfg: Any) -> None:
    _at_least("audit.stores", audit.stores, 0)
    _at_least("audit.canaries", audit.canaries, 2)
    _at_least("audit.canary_length", audit.canary_length, 2)
    _open_unit("audit.confidence", audit.confidence)
    if audit.delta is not None and not 0 <= audit.delta < 1:
        _fail("audit.delta", audit.delta, "must lie in [0, 1) (0 tests pure DP; null = privacy.delta)")
    if audit.epochs is not None:
        _at_least("audit.epochs", audit.epochs, 1)
    for r in audit.guesses or []:
        if not 1 <= r <= audit.canaries:
            _fail("audit.guesses", r, f"each guess count must lie in 1..audit.canaries={audit.canaries}")


def _merchant(cfg: s.MerchantConfig) -> None:
    if cfg.epsilon_budget is not None:
        _positive("epsilon_budget", cfg.epsilon_budget)
    if cfg.person_epsilon_budget is not None:
        _positive("person_epsilon_budget", cfg.person_epsilon_budget)
    if cfg.delta is not None:
        _open_unit("delta", cfg.delta)
    if not 1 <= cfg.port <= 65535:
        _fail("port", cfg.port, "must lie in 1..65535")


def config_keys(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf key of a (dataclass) config with its value, for ``--help``."""
    rows: list[tuple[str, Any]] = []
    for f in fields(node):
        if f.name == "defaults":
            continue
        value = getattr(node, f.name)
        if is_dataclass(value):
            rows += config_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value))
    return rows
