"""The merchant's Flower ClientApp (Message API): train under DP, evaluate, or refuse.

What leaves the merchant in a train reply: exactly the task's shared tensors (names and shapes
of the global model), one MetricRecord of numbers, and one ConfigRecord ``privacy`` with the
unit, accountant and guarantee text. Nothing else: no customer ids, no per-example values.
The round itself (budget check, DP-SGD, ledger, refusal) is ``client/training_round.py``; under
secure aggregation the same round runs through ``client/secure_train.py`` and its tensors leave
only as a masked SecAgg+ vector.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from storefed.console import setup_console

setup_console()  # every ClientApp process (Ray actors, flwr-clientapp): one handler, benign warnings off

from storefed.client.fault_injection import fail_if_injected  # noqa: E402
from storefed.client.secure_train import secure_aggregation_router  # noqa: E402
from storefed.client.training_round import TrainOutcome, load_round, train_round  # noqa: E402
from storefed.client.warm_up import warm_up  # noqa: E402
from storefed.wire import ARRAYS, CONFIG, METRICS, PRIVACY, PROXIMAL_MU, SERVER_ROUND, RoundConfig  # noqa: E402

app = ClientApp()


def _reply(msg: Message, outcome: TrainOutcome) -> Message:
    content = RecordDict({METRICS: MetricRecord(outcome.metrics), PRIVACY: ConfigRecord(outcome.privacy)})
    if outcome.arrays is not None:
        content[ARRAYS] = outcome.arrays
    return Message(content=content, reply_to=msg)


@app.train(mods=[secure_aggregation_router])
def train(msg: Message, context: Context) -> Message:
    """One round of local training under DP (or a refusal)."""
    config = msg.content[CONFIG]
    round_config = RoundConfig.from_record(config)
    fail_if_injected(round_config, int(config[SERVER_ROUND]), dict(context.node_config))  # simulations only
    global_state = msg.content[ARRAYS].to_torch_state_dict()
    proximal_mu = float(config.get(PROXIMAL_MU, 0.0))  # sent by FedProx
    outcome = train_round(round_config, global_state, int(config[SERVER_ROUND]), proximal_mu, dict(context.node_config))
    return _reply(msg, outcome)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this merchant's held-out split (metrics are not DP-protected)."""
    round_config = RoundConfig.from_record(msg.content[CONFIG])
    task, model, data, device = load_round(
        round_config, msg.content[ARRAYS].to_torch_state_dict(), dict(context.node_config), keep_copy=True
    )
    metrics = task.evaluate(model.to(device), data, device)
    return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query("warmup")
def warmup(msg: Message, context: Context) -> Message:
    """Simulation only (server/warm_up.py): import and build the public catalog and model before round 1."""
    done = warm_up(RoundConfig.from_record(msg.content[CONFIG]))
    return Message(content=RecordDict({METRICS: MetricRecord(done)}), reply_to=msg)
