"""The one `storefed` command: subcommands with hydra-style ``key=value`` overrides.

    storefed simulate [key=value ...]    local simulation of many virtual stores
    storefed import data=amazon data.path=F data.num_merchants=N out_dir=D
                                         public-format export -> merchant directories
    storefed certs merchants=[a,b] dns=[host] ips=[10.0.0.5]
                                         CA, coordinator TLS certificate, merchant node keys
    storefed server [key=value ...]      the coordinator: SuperLink over TLS gRPC + one federated run
    storefed merchant data_dir=D private_key=K [key=value ...]   one merchant's agent (SuperNode)
    storefed merchant status ledger_dir=L   rounds, epsilon spent and left, delta, unit, accountant
    storefed evaluate [key=value ...]    privacy-utility evaluation on real data (baselines, local, federated)
    storefed audit [key=value ...]       one-run canary audit: empirical lower bound on epsilon
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
CONF_DIR = Path(os.environ.get("STOREFED_CONF", PROJECT_ROOT / "conf"))


def compose(overrides: list[str], config_name: str = "config") -> dict:
    """The resolved configuration (hydra compose: conf/ groups + command-line overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def cmd_simulate(overrides: list[str]) -> int:
    from server.server_app import RunFailed
    from simulations.runner import simulate

    try:
        summary = simulate(compose(overrides), PROJECT_ROOT)
    except RunFailed as exc:
        print(f"storefed simulate: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary["privacy"] | {"final_eval": summary["final_eval"]}, indent=2, default=str))
    print(f"global model: {summary['model']}")
    return 0


def cmd_import(overrides: list[str]) -> int:
    from simulations.convert import convert_to_merchant_dirs

    out_dirs = [o for o in overrides if o.startswith("out_dir=")]
    if not out_dirs:
        raise ValueError("storefed import needs out_dir=<new directory>")
    rest = [o for o in overrides if not o.startswith("out_dir=")]
    settings = compose(rest)
    data = dict(settings["data"], seed=settings["seed"])
    for row in convert_to_merchant_dirs(data, out_dirs[-1].split("=", 1)[1]):
        print(json.dumps(row))
    return 0


def cmd_certs(overrides: list[str]) -> int:
    from privacy.certificates import CertificateRequest, create_certificates

    cfg = compose(overrides, config_name="certs")
    request = CertificateRequest(
        out_dir=Path(cfg["out_dir"]),
        merchants=tuple(str(m) for m in cfg["merchants"]),
        dns_names=tuple(cfg["dns"]),
        ip_addresses=tuple(str(ip) for ip in cfg["ips"]),
        days=int(cfg["days"]),
        organization=str(cfg["organization"]),
        force=bool(cfg["force"]),
    )
    try:
        written = create_certificates(request)
    except FileExistsError as exc:
        print(f"storefed certs: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def cmd_server(overrides: list[str]) -> int:
    from server.deployment import DeploymentError, ServerOptions, serve
    from simulations.runner import resolve_run_dir

    from privacy.central_dp import check_privacy_options

    settings = compose(["data=files", "federation=deployment", *overrides])
    check_privacy_options(settings["privacy"], settings["strategy"]["name"], int(settings["federation"]["num_stores"]))
    srv = settings["server"]
    options = ServerOptions(
        certs_dir=Path(srv["certs_dir"]).resolve(),
        authorized_dir=Path(srv["authorized_dir"]).resolve(),
        fleet_address=str(srv["fleet_address"]),
        control_host=str(srv["control_host"]),
        control_port=int(srv["control_port"]),
        insecure=bool(srv["insecure"]),
        start_timeout_s=float(srv["start_timeout_s"]),
        run_timeout_s=float(srv["run_timeout_s"]),
    )
    if settings["data"].get("source") == "files":
        settings["data"]["catalog"] = str(Path(settings["data"]["catalog"]).resolve())
    run_dir = resolve_run_dir(settings, PROJECT_ROOT)
    try:
        summary = serve(settings, options, run_dir, PROJECT_ROOT)
    except (DeploymentError, KeyboardInterrupt) as exc:
        print(f"storefed server: FAILED: {exc or 'interrupted'}", file=sys.stderr)
        return 1
    print(json.dumps(summary["privacy"], indent=2, default=str))
    print(f"global model: {summary['model']}")
    return 0


def cmd_merchant(overrides: list[str]) -> int:
    from client.merchant_agent import MerchantOptions, run_merchant
    from client.merchant_files import MerchantDataError

    if overrides[:1] == ["status"]:
        from privacy.ledger_status import format_ledger_status, ledger_status

        cfg = compose(overrides[1:], config_name="merchant")
        print(format_ledger_status(ledger_status(Path(cfg["ledger_dir"]))))
        return 0
    cfg = compose(overrides, config_name="merchant")
    path = lambda key: Path(cfg[key]).resolve() if cfg[key] else None  # noqa: E731
    options = MerchantOptions(
        data_dir=Path(cfg["data_dir"]).resolve(),
        ledger_dir=Path(cfg["ledger_dir"]).resolve(),
        superlink=str(cfg["superlink"]),
        catalog=path("catalog"),
        ca_cert=path("ca_cert"),
        private_key=path("private_key"),
        clientappio_port=int(cfg["port"]),
        insecure=bool(cfg["insecure"]),
        epsilon_budget=cfg["epsilon_budget"],
        delta=cfg["delta"],
        max_wait_time_s=cfg["max_wait_time_s"],
    )
    try:
        return run_merchant(options)
    except MerchantDataError as exc:
        print(f"storefed merchant: data check failed, not connecting: {exc}", file=sys.stderr)
        return 2


def cmd_evaluate(overrides: list[str]) -> int:
    from simulations.evaluation.command import run_evaluate_command

    return run_evaluate_command(overrides)


def cmd_audit(overrides: list[str]) -> int:
    from privacy.audit_command import run_audit_command

    return run_audit_command(overrides)


COMMANDS = {
    "simulate": cmd_simulate,
    "import": cmd_import,
    "certs": cmd_certs,
    "server": cmd_server,
    "merchant": cmd_merchant,
    "evaluate": cmd_evaluate,
    "audit": cmd_audit,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="storefed", description="Privacy-preserving federated learning for merchants")
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. task=review privacy.epsilon=3")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args.overrides)
    except Exception as exc:  # configuration errors: one clear line, no traceback
        from hydra.errors import HydraException

        if isinstance(exc, (ValueError, HydraException)):
            print(f"storefed {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
