"""One typed configuration: bad overrides are refused at composition, fast, with one line naming the key.

All refusals run in one child process (as a user runs the CLI), which reports per case its exit
status, stderr and seconds, and at the end whether Ray or Flower's simulation was ever imported:
a refusal must come before anything expensive starts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from storefed.config import ConfigError, compose
from storefed.config.schema import ImportedDataConfig, RecommenderConfig, ReviewConfig, RunConfig
from storefed.config.serialize import from_dict, to_dict

# (command, override, text the one error line must contain: the key, and the value or the allowed range)
BAD = [
    ("simulate", "privacy.epsilon=-1", "privacy.epsilon=-1.0 is not allowed: must be a finite number > 0"),
    ("simulate", "privacy.epsilon=0", "privacy.epsilon=0.0 is not allowed"),
    ("simulate", "privacy.epsilon=1e400", "privacy.epsilon=inf is not allowed: must be a finite number > 0"),
    ("simulate", "privacy.epsilon=abc", "privacy.epsilon=abc"),
    ("simulate", "privacy.delta=0", "privacy.delta=0.0 is not allowed: must lie strictly between 0 and 1"),
    ("simulate", "privacy.delta=1.5", "privacy.delta=1.5 is not allowed"),
    ("simulate", "federation.rounds=0", "federation.rounds=0 is not allowed: must be an integer >= 1"),
    ("simulate", "task.epochs=0", "task.epochs=0 is not allowed: must be an integer >= 1"),
    ("simulate", "task.batch_size=0", "task.batch_size=0 is not allowed: must be an integer >= 1"),
    ("simulate", "task.lr=abc", "task.lr=abc"),
    ("simulate", "task.lr=-0.1", "task.lr=-0.1 is not allowed"),
    ("simulate", "privacy.max_grad_norm=-1", "privacy.max_grad_norm=-1.0 is not allowed"),
    ("simulate", "privacy.noise_multiplier=-2", "privacy.noise_multiplier='-2' is not allowed"),
    ("simulate", "privacy.noise_multiplier=lots", "privacy.noise_multiplier='lots' is not allowed: use auto"),
    ("simulate", "privacy.planned_rounds=-3", "privacy.planned_rounds=-3 is not allowed: must be an integer >= 1"),
    ("simulate", "privacy.accountant=gdp", "privacy.accountant='gdp' is not allowed: choose one of ['rdp', 'prv']"),
    ("simulate", "privacy.grad_sample_mode=magic", "privacy.grad_sample_mode='magic' is not allowed"),
    ("simulate", "federation.num_stores=0", "federation.num_stores=0 is not allowed: must be an integer >= 1"),
    ("simulate", "federation.stores_per_round=0", "federation.stores_per_round=0 is not allowed: must lie in 1..federation.num_stores=100"),
    ("simulate", "federation.stores_per_round=101", "federation.stores_per_round=101 is not allowed"),
    ("simulate", "device=tpu", "device='tpu' is not allowed: choose auto | cpu | cuda | cuda:N"),
    ("simulate", "+federation.foo=1", "federation.foo is not a configuration key"),
    ("simulate", "federation.foo=1", "federation.foo"),
    ("simulate", "++privacy.bogus=1", "privacy.bogus is not a configuration key"),
    ("simulate", "strategy=fedmagic", "Could not find 'strategy/fedmagic'"),
    ("simulate", "task=review task.max_length=0", "task.max_length=0 is not allowed"),
    ("simulate", "task=review task.encoder=bert", "task.encoder='bert' is not allowed: choose one of ['frozen', 'lora', 'scratch']"),
    ("simulate", "task=review task.prior_tau=3", "task.prior_tau=3"),
    ("simulate", "task=review task.holdout=train", "task.holdout='train' is not allowed"),
    ("simulate", "task=review task.embed_batch_size=0", "task.embed_batch_size=0 is not allowed"),
    ("simulate", "task=review task.hidden_size=33", "task.hidden_size=33 is not allowed: must be a multiple of task.num_heads=2"),
    ("simulate", "privacy.central=sometimes", "privacy.central='sometimes' is not allowed"),
    ("simulate", "data=amazon data.path=/no/such/file.json.gz", "data.path='/no/such/file.json.gz' is not allowed: no such file"),
    ("simulate", "data.generator.num_items=0", "data.generator.num_items=0 is not allowed"),
    ("simulate", "seed=-1", "seed=-1 is not allowed"),
    ("simulate", "strategy=fedtrimmedavg strategy.beta=0.6", "strategy.beta=0.6 is not allowed: must lie in [0, 0.5)"),
    ("simulate", "federation.max_update_norm=0", "federation.max_update_norm=0"),
    ("simulate", "task.objective=bag", "task.objective='bag' is not allowed"),
    ("simulate", "task.input_dropout=1", "task.input_dropout=1"),
    ("server", "privacy.epsilon=-1", "privacy.epsilon=-1.0 is not allowed"),
    ("server", "federation.failure_rate=0.3", "federation.failure_rate=0.3 is not allowed: is for simulations"),
    ("simulate", "federation.failure_rate=1", "federation.failure_rate=1.0 is not allowed: must lie in [0, 1)"),
    ("server", "server.control_port=abc", "server.control_port=abc"),
    ("evaluate", f"data.path={__file__} evaluate.epsilons=[abc]", "evaluate.epsilons"),
    ("evaluate", f"data.path={__file__} evaluate.rounds=0", "evaluate.rounds=0 is not allowed"),
    ("evaluate", "data.path=/no/such/reviews.json.gz", "data.path='/no/such/reviews.json.gz' is not allowed"),
    ("audit", "audit.canaries=1", "audit.canaries=1 is not allowed: must be an integer >= 2"),
    ("merchant", "data_dir=x port=0", "port=0 is not allowed: must lie in 1..65535"),
    ("merchant", "data_dir=x epsilon_budget=-1", "epsilon_budget=-1.0 is not allowed"),
    ("certs", "days=0", "days=0 is not allowed"),
]

CHILD = r"""
import contextlib, io, json, sys
from storefed.cli import main
results = []
for command, override in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run_dir = ["run_dir=" + sys.argv[2]] if command in ("simulate", "server", "evaluate", "audit") else []
        code = main([command, *override.split(), *run_dir])
    results.append({"code": code, "stderr": err.getvalue()})
heavy = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "flwr.simulation")))
print(json.dumps({"results": results, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cfg") / "run"
    cases = json.dumps([[command, override] for command, override, _ in BAD])
    done = subprocess.run([sys.executable, "-c", CHILD, cases, str(run_dir)], capture_output=True, text=True,
                          timeout=600, cwd=run_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report | {"run_dir_created": run_dir.exists()}


def test_at_least_25_bad_overrides_are_covered():
    assert len(BAD) >= 25


@pytest.mark.parametrize("index", range(len(BAD)), ids=[f"{c}:{o}" for c, o, _ in BAD])
def test_bad_override_exits_2_with_one_line_naming_the_key(refusals, index):
    command, override, expected = BAD[index]
    result = refusals["results"][index]
    assert result["code"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"storefed {command}: ") and expected in lines[0], lines[0]


def test_no_refusal_started_ray_flower_or_wrote_a_run_dir(refusals):
    assert refusals["heavy"] == []
    assert not refusals["run_dir_created"]


def test_defaults_live_once_in_the_schema_and_presets_only_change_values():
    review = compose("simulate", ["task=review"]).task
    assert isinstance(review, ReviewConfig) and review == ReviewConfig()  # no YAML repeats or changes a default
    amazon = compose("simulate", ["data=amazon", f"data.path={__file__}"]).data
    assert isinstance(amazon, ImportedDataConfig) and amazon.label == "category" and amazon.num_merchants == 10
    none = compose("simulate", ["privacy=none"]).privacy
    assert none.enabled is False and none.epsilon == float("inf")


def test_typed_values_and_the_round_trip_through_plain_data():
    cfg = compose("simulate", ["task.lr=0.5", "privacy.noise_multiplier=1.25", "federation.rounds=7"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.task, RecommenderConfig)
    assert cfg.task.lr == 0.5 and cfg.federation.rounds == 7 and cfg.privacy.noise_multiplier == "1.25"
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match=r"task.name='magic' is unknown"):
        from_dict(RunConfig, to_dict(cfg) | {"task": {"name": "magic"}})
    with pytest.raises(ConfigError, match="federation.rounds=0 is not allowed"):
        from_dict(RunConfig, to_dict(cfg) | {"federation": to_dict(cfg)["federation"] | {"rounds": 0}})


def test_help_lists_the_commands_keys_with_defaults():
    done = subprocess.run([sys.executable, "-m", "storefed", "simulate", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "  privacy.person_epsilon = 8.0" in out and "  privacy.epsilon = null" in out and "  task.embedding_dim = 32" in out
    assert "  federation.num_stores = 100" in out and "  data.generator.num_items = 1000" in out
    assert "task        recommender | review" in out and "privacy_schema" not in out
    merchant = subprocess.run([sys.executable, "-m", "storefed", "merchant", "--help"], capture_output=True, text=True,
                              timeout=120).stdout
    assert "  data_dir = ???" in merchant and "  ledger_dir = ledger" in merchant
