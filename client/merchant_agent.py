"""`storefed merchant`: one merchant's agent (a Flower 1.39 SuperNode) on the merchant's machine.

It validates the merchant's data directory first (files, lines and fields, as in
storefed/data/merchant_files.py) and fails fast before connecting; then it runs ``flower-supernode``
against the coordinator's Fleet API over TLS (trusting ``ca_cert``) and authenticates with the
merchant's private node key. The node config tells the StoreFed ClientApp where the data and the
privacy ledger live, and the merchant's own budget (which overrides what the coordinator proposes).

``insecure=true`` (plain-text gRPC, no key) exists for local debugging only and prints a warning
on every start.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from storefed.client.supernode_process import run_supernode
from storefed.data.merchant_files import MerchantDataError, load_catalog, load_merchant_dir, summarize
from storefed.flower_env import flower_env
from storefed.privacy.delta_check import check_merchant_delta
from storefed.privacy.ledger_integrity import bind_directory

INSECURE_WARNING = (
    "WARNING: insecure=true: NO TLS and NO node authentication; model updates travel in clear text. "
    "Use this for local debugging only."
)


@dataclass(frozen=True)
class MerchantOptions:
    data_dir: Path
    ledger_dir: Path
    superlink: str
    catalog: Path | None = None
    ca_cert: Path | None = None
    private_key: Path | None = None
    clientappio_port: int = 9094
    insecure: bool = False
    epsilon_budget: float | None = None
    person_epsilon_budget: float | None = None
    delta: float | None = None
    max_wait_time_s: float | None = None


def validate(options: MerchantOptions) -> dict:
    """Load and validate the data directory; returns its counts. Raises MerchantDataError."""
    catalog = load_catalog(options.catalog or options.data_dir / "catalog.csv")
    data = load_merchant_dir(options.data_dir, catalog)
    if data.num_users == 0:
        raise MerchantDataError(options.data_dir, "no usable customers: the files hold no rows"
                                + (f" ({data.dropped_unknown_items} dropped: their items are not in the catalog)"
                                   if data.dropped_unknown_items else "")
                                + "; check the files and the catalog before joining a federation")
    return summarize(data)


def node_config(options: MerchantOptions) -> str:
    entries = {
        "data-dir": str(options.data_dir.resolve()),
        "ledger-dir": str(options.ledger_dir.resolve()),
        "catalog": str((options.catalog or options.data_dir / "catalog.csv").resolve()),
    }
    text = " ".join(f'{k}="{v}"' for k, v in entries.items())
    if options.epsilon_budget is not None:
        text += f" epsilon-budget={float(options.epsilon_budget)}"
    if options.person_epsilon_budget is not None:
        text += f" person-epsilon-budget={float(options.person_epsilon_budget)}"
    if options.delta is not None:
        text += f" delta={float(options.delta)}"
    return text


def supernode_command(options: MerchantOptions) -> list[str]:
    local = Path(sys.executable).with_name("flower-supernode")
    cmd = [str(local) if local.exists() else "flower-supernode", "--superlink", options.superlink,
           "--node-config", node_config(options), "--port", str(options.clientappio_port)]
    if options.max_wait_time_s is not None:
        cmd += ["--max-wait-time", str(options.max_wait_time_s)]
    if options.insecure:
        return cmd + ["--insecure"]
    for what, path, hint in (("ca_cert", options.ca_cert, "the coordinator's ca.crt"),
                             ("private_key", options.private_key, "this merchant's node key from `storefed certs`")):
        if path is None or not Path(path).is_file():
            raise ValueError(f"merchant.{what}={path} is not a file: pass {hint} (or insecure=true for local debugging)")
    return cmd + ["--root-certificates", str(options.ca_cert), "--auth-supernode-private-key", str(options.private_key)]


def run_merchant(options: MerchantOptions) -> int:
    """Validate, then run the SuperNode until it exits (its exit code) or the agent is stopped (128 + signal)."""
    counts = validate(options)
    check_merchant_delta(options.delta, counts["users"], counts["reviews"])
    bind_directory(options.ledger_dir, Path(options.data_dir.resolve()).name)  # the id the ledgers are kept under
    print(f"merchant data OK: {counts}", flush=True)
    command = supernode_command(options)
    if options.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    return run_supernode(command, flower_env())  # never outlives this agent (client/supernode_process.py)
