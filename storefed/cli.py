"""The one `storefed` command: parse, compose the typed config, call down.

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
    storefed classify RUN_DIR TEXT ...   the run's exported review model on texts (label and score)
    storefed recommend RUN_DIR --history A,B --k 10   top-k catalog items of the run's recommender
    storefed bench dp|comm|dropouts|load measurements, printed as JSON lines and a table
    storefed report RUN_DIR              report.md + self-contained report.html + plots/*.png (also written
                                         at the end of simulate, server and evaluate)

Every command composes its configuration (storefed.config) first: a bad key or value exits 2 with
one line naming it, before anything expensive starts. ``storefed <command> --help`` lists the keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from storefed.config import ConfigError, compose
from storefed.config.compose import describe
from storefed.console import setup_console


def cmd_simulate(overrides: list[str]) -> int:
    settings = compose("simulate", overrides)  # first: a bad key exits 2 before anything heavy is imported
    from storefed.server.run_setup import RunFailed
    from storefed.simulations.runner import simulate

    try:
        summary = simulate(settings)
    except RunFailed as exc:
        print(f"storefed simulate: FAILED: {exc}", file=sys.stderr)
        return 1
    from storefed.server.run_log import summary_lines
    from storefed.simulations.report import report_after_run

    run_dir = Path(summary["model"]).parent
    print("\n".join(summary_lines(summary, run_dir)))
    report_after_run(run_dir)
    return 0


def cmd_import(overrides: list[str]) -> int:
    settings = compose("import", overrides)  # first: a bad key exits 2 before anything heavy is imported
    from storefed.data.convert import convert_to_merchant_dirs

    for row in convert_to_merchant_dirs(settings.data, settings.seed, settings.out_dir):
        print(json.dumps(row))
    return 0


def cmd_certs(overrides: list[str]) -> int:
    cfg = compose("certs", overrides)  # first: a bad key exits 2 before anything heavy is imported
    from storefed.privacy.certificates import CertificateRequest, create_certificates

    request = CertificateRequest(
        out_dir=Path(cfg.out_dir), merchants=tuple(cfg.merchants), dns_names=tuple(cfg.dns),
        ip_addresses=tuple(cfg.ips), days=cfg.days, organization=cfg.organization, force=cfg.force,
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
    settings = compose("server", overrides)  # first: a bad key exits 2 before anything heavy is imported
    import dataclasses

    from storefed.config.schema import FilesDataConfig
    from storefed.server.deployment import DeploymentError, ServerOptions, serve
    from storefed.server.run_setup import check_run_dir
    from storefed.simulations.checks import check_run
    from storefed.simulations.runner import resolve_run_dir

    check_run(settings)
    srv = settings.server
    options = ServerOptions(
        certs_dir=Path(srv.certs_dir).resolve(), authorized_dir=Path(srv.authorized_dir).resolve(),
        fleet_address=srv.fleet_address, control_host=srv.control_host, control_port=srv.control_port,
        insecure=srv.insecure, start_timeout_s=srv.start_timeout_s, run_timeout_s=srv.run_timeout_s,
    )
    if isinstance(settings.data, FilesDataConfig):  # the ServerApp process runs elsewhere: absolute paths
        settings = dataclasses.replace(settings, data=FilesDataConfig(catalog=str(Path(settings.data.catalog).resolve())))
    run_dir = resolve_run_dir(settings.run_dir, f"server-{settings.task.name}")
    check_run_dir(settings, run_dir)
    try:
        summary = serve(settings, options, run_dir)
    except (DeploymentError, KeyboardInterrupt) as exc:
        print(f"storefed server: FAILED: {exc or 'interrupted'}", file=sys.stderr)
        return 1
    from storefed.server.run_log import summary_lines
    from storefed.simulations.report import report_after_run

    print("\n".join(summary_lines(summary, run_dir)))
    report_after_run(run_dir)
    return 0


def cmd_merchant(overrides: list[str]) -> int:
    from storefed.client.merchant_agent import MerchantOptions, run_merchant
    from storefed.data.merchant_files import MerchantDataError

    if overrides[:1] == ["status"]:
        from storefed.privacy.ledger_status import (
            format_ledger_status,
            format_person_status,
            ledger_status,
            person_status,
        )

        cfg = compose("merchant_status", overrides[1:])
        rows = ledger_status(Path(cfg.ledger_dir))
        print(format_ledger_status(rows))
        if rows:
            print(format_person_status(person_status(Path(cfg.ledger_dir))))
        return 0
    cfg = compose("merchant", overrides)

    def path(value: str | None) -> Path | None:
        return Path(value).resolve() if value else None

    options = MerchantOptions(
        data_dir=Path(cfg.data_dir).resolve(), ledger_dir=Path(cfg.ledger_dir).resolve(), superlink=cfg.superlink,
        catalog=path(cfg.catalog), ca_cert=path(cfg.ca_cert), private_key=path(cfg.private_key),
        clientappio_port=cfg.port, insecure=cfg.insecure, epsilon_budget=cfg.epsilon_budget, delta=cfg.delta,
        person_epsilon_budget=cfg.person_epsilon_budget,
        max_wait_time_s=cfg.max_wait_time_s,
    )
    try:
        return run_merchant(options)
    except MerchantDataError as exc:
        print(f"storefed merchant: data check failed, not connecting: {exc}", file=sys.stderr)
        return 2


def cmd_evaluate(overrides: list[str]) -> int:
    from storefed.simulations.evaluation.command import run_evaluate_command

    return run_evaluate_command(compose("evaluate", overrides), overrides)


def cmd_audit(overrides: list[str]) -> int:
    from storefed.simulations.audit_command import run_audit_command

    return run_audit_command(compose("audit", overrides))


def cmd_classify(argv: list[str]) -> int:
    """``storefed classify RUN_DIR TEXT ...``: the exported review model (``RUN_DIR/review_model``) on each text."""
    parser = argparse.ArgumentParser(prog="storefed classify", description=cmd_classify.__doc__)
    parser.add_argument("run_dir", help="a run directory with review_model/, or the review_model folder itself")
    parser.add_argument("texts", nargs="+", help="review texts to classify")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    model_dir = run_dir / "review_model" if (run_dir / "review_model").is_dir() else run_dir
    if not (model_dir / "config.json").is_file():
        print(f"storefed classify: {run_dir} holds no review_model/ folder: it is written at the end of "
              "`storefed simulate task=review` or `storefed server` runs (task.encoder=frozen, or lora with "
              "task.pooling=cls)", file=sys.stderr)
        return 2
    from transformers import pipeline

    from storefed.models.text_encoder import quiet_transformers

    with quiet_transformers():
        classify = pipeline("text-classification", model=str(model_dir), device=-1)
    for text, result in zip(args.texts, classify(args.texts, truncation=True)):
        print(f"{result['label']:<9} {result['score']:.3f}  {text}")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str, str]] = {
    # name: (handler, root config, one-line description)
    "simulate": (cmd_simulate, "simulate", "local simulation of many virtual stores (Flower Simulation Engine)"),
    "import": (cmd_import, "import", "a public data set -> merchant directories (schema v1)"),
    "certs": (cmd_certs, "certs", "CA, coordinator TLS certificate and merchant node keys"),
    "server": (cmd_server, "server", "the coordinator: SuperLink over TLS gRPC + one federated run"),
    "merchant": (cmd_merchant, "merchant", "one merchant's agent (SuperNode); `merchant status` reads its ledger"),
    "evaluate": (cmd_evaluate, "evaluate", "privacy-utility evaluation on real data"),
    "audit": (cmd_audit, "audit", "one-run canary audit: empirical lower bound on epsilon"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storefed", description="Privacy-preserving federated learning for merchants")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, root, text) in COMMANDS.items():
        child = sub.add_parser(name, help=text, description=text, add_help=False,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        child.add_argument("-h", "--help", action="store_true", help="list this command's config keys and exit")
        child.add_argument("-v", "--verbose", action="store_true",
                           help="show Flower's own log lines, library warnings and every merchant's round line")
        child.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task=review privacy.epsilon=3")
        child.set_defaults(root=root)
    sub.add_parser("classify", help="the run's exported review model on texts: storefed classify RUN_DIR TEXT ...")
    sub.add_parser("bench", help="measurements side by side: storefed bench dp|comm|dropouts|load [--help]")
    sub.add_parser("report", help="Markdown + HTML report with plots for a run directory: storefed report RUN_DIR")
    sub.add_parser("recommend", help="a run's recommender: storefed recommend RUN_DIR --history ITEM,ITEM --k 10")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    deployed = argv[:1] in (["server"], ["merchant"])  # real merchants' round lines always show (not inherited)
    setup_console(verbose=True if {"-v", "--verbose"} & set(argv) else None,  # before any library is imported
                  simulated_merchants=False if deployed else None)
    if argv[:1] == ["classify"]:  # positional texts, no config keys
        return cmd_classify(argv[1:])
    if argv[:1] == ["bench"]:  # measurements with their own options
        from storefed.simulations.bench import run_bench_command

        return run_bench_command(argv[1:])
    if argv[:1] == ["report"]:  # a run dir, no config keys
        from storefed.simulations.report import run_report_command

        return run_report_command(argv[1:])
    if argv[:1] == ["recommend"]:  # a run dir and flags, no config keys
        from storefed.simulations.recommend import run_recommend_command

        return run_recommend_command(argv[1:])
    args = _parser().parse_args(argv)
    handler, root, text = COMMANDS[args.command]
    if args.help:
        print(f"usage: storefed {args.command} [key=value ...]\n\n{text}\n\n{describe(root)}")
        if args.command == "merchant":
            print(f"\nstorefed merchant status [key=value ...]:\n{describe('merchant_status')}")
        return 0
    try:
        return handler(args.overrides)
    except (ConfigError, ValueError) as exc:  # bad input found before the work starts: one line, no traceback
        print(f"storefed {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
