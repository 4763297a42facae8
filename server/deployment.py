"""`storefed server`: run the coordinator on real machines (Flower 1.39 SuperLink over TLS gRPC).

What it does, in order:
1. starts ``flower-superlink`` with TLS (the CA, ``server.pem``/``server.key`` from
   ``storefed certs``) and ``--enable-supernode-auth``; the Fleet API (where merchants connect and
   model updates travel) is gRPC on ``server.fleet_address``; the control API and ServerApp runtime
   listen on ``server.control_host`` (127.0.0.1 by default) only; the SuperLink database lives in
   the run directory;
2. registers every ``*.pub`` merchant key found in ``server.authorized_dir``;
3. submits the StoreFed ServerApp run (``flwr run``) with the resolved settings file;
4. streams per-round progress from the run directory and polls the run's real status (``flwr
   run`` exits 0 even for failed runs); exits non-zero unless the run completed;
5. stops the SuperLink it started (also on Ctrl-C).

``server.insecure=true`` (plain-text gRPC, no node authentication) exists for local debugging only
and prints a warning on every start.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from storefed.atomic_files import atomic_write_text
from storefed.config.schema import ServerRunConfig
from storefed.config.serialize import to_dict
from storefed.flower_app import APP_DIR
from storefed.flower_env import flower_env, flwr_bin

CONNECTION = "storefed"
INSECURE_WARNING = (
    "WARNING: insecure=true: NO TLS and NO merchant authentication. Anyone on the network can read "
    "model updates and join as a merchant. Use this for local debugging only."
)


class DeploymentError(RuntimeError):
    """The coordinator could not be started or the run did not complete."""


@dataclass(frozen=True)
class ServerOptions:
    certs_dir: Path
    authorized_dir: Path
    fleet_address: str = "0.0.0.0:9092"
    control_host: str = "127.0.0.1"
    control_port: int = 9093
    insecure: bool = False
    start_timeout_s: float = 60.0
    run_timeout_s: float = 3600.0

    @property
    def control_address(self) -> str:
        return f"{self.control_host}:{self.control_port}"



def write_connection(flwr_home: Path, options: ServerOptions) -> None:
    """The Flower CLI connection ``storefed`` (control API address + CA) in a project-local FLWR_HOME."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{options.control_address}"']
    if options.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{(options.certs_dir / "ca.crt").resolve()}"')
    atomic_write_text(flwr_home / "config.toml", "\n".join(lines) + "\n")


def _loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(options: ServerOptions) -> str | None:
    """Why these options would expose the coordinator, or None: checked before the SuperLink starts."""
    if not _loopback(options.control_host):
        return (f"server.control_host={options.control_host} is not allowed: the control API and the ServerApp "
                "runtime have no authentication; keep them on 127.0.0.1 (reach them over SSH)")
    fleet_host = options.fleet_address.rsplit(":", 1)[0]
    if options.insecure and not _loopback(fleet_host):
        return (f"server.insecure=true with server.fleet_address={options.fleet_address} is not allowed: plain-text "
                "gRPC without merchant authentication must stay on loopback (server.fleet_address=127.0.0.1:PORT)")
    if not options.insecure and (options.certs_dir / "server.pem").is_file():
        import datetime as dt

        from cryptography import x509

        cert = x509.load_pem_x509_certificate((options.certs_dir / "server.pem").read_bytes())
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (f"{options.certs_dir / 'server.pem'} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now: merchants would refuse the connection; "
                    f"create new TLS material with `storefed certs out_dir={options.certs_dir} force=true`")
    return None


def superlink_command(options: ServerOptions, run_dir: Path) -> list[str]:
    cmd = [
        flwr_bin("flower-superlink"),
        "--fleet-api-address", options.fleet_address,
        "--host", options.control_host,
        "--port", str(options.control_port),
        "--database", str(run_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    if options.insecure:
        return cmd + ["--insecure"]
    certs = options.certs_dir
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (certs / name).is_file():
            raise DeploymentError(f"{certs / name} is missing: create TLS material with `storefed certs out_dir={certs}`")
    return cmd + [
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
    ]


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with code {process.returncode} during start-up")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise DeploymentError(f"flower-superlink did not open {host}:{port} within {timeout_s:.0f} s")


def _flwr(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([flwr_bin("flwr"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def register_merchants(authorized_dir: Path, env: dict) -> list[str]:
    """``flwr supernode register`` for every ``*.pub`` key in ``authorized_dir``; returns the names."""
    keys = sorted(Path(authorized_dir).glob("*.pub"))
    if not keys:
        raise DeploymentError(f"no merchant public keys (*.pub) in {authorized_dir}: copy each merchant's key there")
    names = []
    for key in keys:
        done = _flwr(["supernode", "register", str(key), CONNECTION, "--name", key.stem], env)
        if done.returncode != 0 and "already" not in (done.stdout + done.stderr).lower():
            raise DeploymentError(f"registering {key.name} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        names.append(key.stem)
    return names


def submit_run(settings_file: Path, run_dir: Path, env: dict) -> str:
    """Submit the installed StoreFed app (storefed/flower_app) as one run; returns its run id."""
    run_config = f'settings-file="{settings_file}" run-dir="{run_dir}"'
    done = _flwr(["run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--format", "json"], env)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        raise DeploymentError(f"flwr run failed: {(done.stderr or done.stdout).strip()[-800:]}")
    return str(reply["run-id"])


def run_status(run_id: str, env: dict) -> str:
    """The run's status as the SuperLink reports it (e.g. ``running``, ``finished:completed``)."""
    done = _flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], env)
    try:
        runs = json.loads(done.stdout[done.stdout.index("{"):]).get("runs", [])
    except ValueError:
        return "unknown"
    matching = [r for r in runs if str(r.get("run-id")) == run_id]
    return str(matching[0]["status"]) if matching else "unknown"


def _print_new_rounds(metrics: Path, shown: int) -> int:
    """Print a line for each complete metrics row after the first ``shown``; returns the rows shown so far."""
    if not metrics.exists():
        return shown
    complete = metrics.read_text(encoding="utf-8").split("\n")[:-1]  # a row still being appended waits
    for line in complete[shown:]:
        row = json.loads(line)
        print(f"round {row['round']}: {row.get('trained', 0)} trained, {row.get('refused', 0)} refused, "
              f"{row.get('failed', 0)} failed", flush=True)
    return max(shown, len(complete))


def wait_for_run(run_id: str, run_dir: Path, env: dict, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the run finishes, printing each new metrics row (the last ones too); returns the final status."""
    deadline, shown = time.time() + timeout_s, 0
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        shown = _print_new_rounds(metrics, shown)
        status = run_status(run_id, env)
        if status.startswith("finished"):
            _print_new_rounds(metrics, shown)  # rows written between the read above and the status check
            return status
        time.sleep(poll_s)
    raise DeploymentError(f"run {run_id} did not finish within {timeout_s:.0f} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def serve(settings: ServerRunConfig, options: ServerOptions, run_dir: Path) -> dict:
    """Start the SuperLink, register merchants, run one federation, stop the SuperLink."""
    problem = exposure_problem(options)
    if problem:  # a bad input: refused (exit 2) before anything is written or started
        raise ValueError(problem)
    run_dir.mkdir(parents=True, exist_ok=True)
    if options.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    settings_file = run_dir / "settings.json"
    atomic_write_text(settings_file, json.dumps(to_dict(settings), indent=2))
    flwr_home = run_dir / "flwr-home"
    write_connection(flwr_home, options)
    env = flower_env(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    log = open(run_dir / "superlink.log", "ab")
    superlink = subprocess.Popen(superlink_command(options, run_dir), stdout=log, stderr=subprocess.STDOUT, env=env)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the SuperLink like Ctrl-C
    try:
        wait_for_port(options.control_host, options.control_port, options.start_timeout_s, superlink)
        host, port = options.fleet_address.rsplit(":", 1)
        wait_for_port("127.0.0.1" if host in ("0.0.0.0", "") else host, int(port), options.start_timeout_s, superlink)
        print(f"SuperLink pid {superlink.pid}: fleet (gRPC{'' if options.insecure else ', TLS'}) on "
              f"{options.fleet_address}, control API on {options.control_address}", flush=True)
        if not options.insecure:
            names = register_merchants(options.authorized_dir, env)
            print(f"registered {len(names)} merchant key(s): {', '.join(names)}", flush=True)
        run_id = submit_run(settings_file, run_dir, env)
        print(f"submitted run {run_id}", flush=True)
        status = wait_for_run(run_id, run_dir, env, options.run_timeout_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
        superlink.terminate()
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            superlink.kill()
        log.close()
    own = json.loads((run_dir / "status.json").read_text(encoding="utf-8")) if (run_dir / "status.json").exists() else {}
    if status != "finished:completed" or own.get("status") != "completed":
        raise DeploymentError(f"run {run_id} ended as {status} ({own.get('error') or 'see superlink.log'})")
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
