"""Secure deployment on loopback: real processes, real TLS, node authentication, refusals."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SMALL_WORLD
from storefed.data.merchant_files import write_catalog, write_merchant_dir
from storefed.data.virtual_stores import StoreGeneratorConfig, generate_catalog, generate_store
from storefed.flower_env import flower_env
from storefed.privacy.accounting import epsilon_of
from storefed.simulations.deployment_load import free_ports

MERCHANTS = ("shop-a", "shop-b", "shop-c")
BIN = Path(sys.executable).parent


class Proc:
    """A process whose output lines are collected in the background; stopped by PID at the end."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.log = log
        self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                      env=flower_env(PYTHONPATH=str(ROOT)), start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        with open(self.log, "w", encoding="utf-8") as out:
            for line in self.popen.stdout:
                out.write(line)
                out.flush()
                self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen within {timeout} s; log: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the whole process group, then SIGKILL to whatever is left of it: a SuperNode can
        outlive its ``storefed merchant`` parent (seen once: still running 40 minutes after its test)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, 15)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, 9)
        except ProcessLookupError:  # the group is gone: nothing left behind
            pass


def _storefed(*args: str) -> list[str]:
    return [sys.executable, "-m", "storefed", *args]


@pytest.fixture
def world(tmp_path):
    certs, other = tmp_path / "certs", tmp_path / "other-ca"
    for out, merchants in ((certs, "[shop-a,shop-b,shop-c,rogue]"), (other, "[]")):
        done = subprocess.run(_storefed("certs", f"out_dir={out}", f"merchants={merchants}"), capture_output=True,
                              text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in MERCHANTS:  # the rogue key is never registered
        shutil.copy(certs / "merchants" / f"{name}.pub", authorized)
    gen = StoreGeneratorConfig(**{**SMALL_WORLD, "mean_customers": 40})
    catalog = generate_catalog(gen)
    write_catalog(catalog, tmp_path / "catalog.csv")
    for i, name in enumerate(MERCHANTS):
        write_merchant_dir(generate_store(gen, i), catalog, tmp_path / name)
        shutil.copy(tmp_path / "catalog.csv", tmp_path / name / "catalog.csv")
    return tmp_path, certs, other, authorized


def test_tls_deployment_runs_with_authorized_merchants_and_rejects_the_rest(world):
    tmp, certs, other, authorized = world
    fleet, control, *node_ports = free_ports(9)
    run_dir = tmp / "run"
    procs: list[Proc] = []
    try:
        server = Proc(_storefed(
            "server", f"run_dir={run_dir}", f"server.certs_dir={certs}", f"server.authorized_dir={authorized}",
            f"server.fleet_address=127.0.0.1:{fleet}", f"server.control_port={control}", f"data.catalog={tmp / 'catalog.csv'}",
            "federation.rounds=2", "task.epochs=1", "privacy.epsilon=8",
        ), tmp / "server.log")
        procs.append(server)
        server.wait_for("registered 3 merchant key(s)", timeout=90)
        attackers = {
            "insecure": ["--insecure"],
            "wrong-ca": ["--root-certificates", str(other / "ca.crt"), "--auth-supernode-private-key", str(certs / "merchants" / "rogue")],
            "unregistered": ["--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / "merchants" / "rogue")],
            "no-key": ["--root-certificates", str(certs / "ca.crt")],
        }
        intruders = {}
        for (label, flags), port in zip(attackers.items(), node_ports[3:]):
            intruders[label] = Proc([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{fleet}", "--max-wait-time", "10",
                                     "--port", str(port), *flags], tmp / f"intruder-{label}.log")
            procs.append(intruders[label])
        for name, port in zip(MERCHANTS, node_ports):
            procs.append(Proc(_storefed(
                "merchant", f"data_dir={tmp / name}", f"ledger_dir={tmp / name / 'ledger'}", f"superlink=127.0.0.1:{fleet}",
                f"ca_cert={certs / 'ca.crt'}", f"private_key={certs / 'merchants' / name}", f"port={port}",
            ), tmp / f"{name}.log"))
        rejected = {}
        for label, proc in intruders.items():
            rc = proc.popen.wait(timeout=300)
            time.sleep(0.5)  # let the output pump drain
            rejected[label] = (rc, proc.log.read_text())
        assert all(rc != 0 for rc, _ in rejected.values()), {k: v[0] for k, v in rejected.items()}
        assert "CERTIFICATE_VERIFY_FAILED" in rejected["wrong-ca"][1]
        assert "Failed to activate SuperNode" in rejected["unregistered"][1]
        assert "Failed to initialize the connection to the SuperLink" in rejected["no-key"][1]
        assert "Connection attempt failed" in rejected["insecure"][1]

        # The control API is not served on the public fleet address.
        probe = subprocess.run(["curl", "-sk", "--max-time", "5", "-X", "POST", f"https://127.0.0.1:{fleet}/v1/control/list-runs",
                                "-o", "/dev/null", "-w", "%{http_code}"], capture_output=True, text=True)
        assert probe.stdout.strip() in ("000", ""), probe.stdout
        control_probe = subprocess.run(["curl", "-sk", "--max-time", "5", "-X", "POST",
                                        f"https://127.0.0.1:{control}/v1/control/list-runs", "-o", "/dev/null", "-w", "%{http_code}"],
                                       capture_output=True, text=True)
        assert control_probe.stdout.strip() not in ("000", "")  # it does answer on the loopback control port

        assert server.popen.wait(timeout=400) == 0, (tmp / "server.log").read_text()[-3000:]
    finally:
        for proc in procs:
            proc.stop()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "global_model.safetensors").exists() and (run_dir / "superlink.db").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["trained"] == 3 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    reported = sorted(summary["privacy"]["epsilon_by_node"].values())
    ledgers = [json.loads(next((tmp / name / "ledger").glob("*.ledger.json")).read_text()) for name in MERCHANTS]
    assert all(len(led["rounds"]) == 2 for led in ledgers)
    from_ledgers = sorted(
        epsilon_of([(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in led["rounds"]], led["delta"]) for led in ledgers
    )
    assert reported == pytest.approx(from_ledgers)
    merchant_log = (tmp / "shop-a.log").read_text()
    assert "merchant data OK" in merchant_log
    assert "StoreFed merchant shop-a round 2: trained" in merchant_log and "per customer, RDP accountant" in merchant_log
    # each merchant keeps the latest global model it received, usable on its side (client/global_copy.py)
    from safetensors.torch import load_file

    from storefed.simulations.recommend import Recommender

    copy = tmp / "shop-a" / "ledger" / "global_model" / "recommender"
    final = load_file(run_dir / "global_model.safetensors")
    kept = load_file(copy / "global_model.safetensors")
    assert set(kept) == set(final) and all(torch.equal(kept[k], final[k]) for k in final), "the final global model"
    assert (tmp / "report.html").exists() or (run_dir / "report.html").exists()
    top = Recommender.from_run_dir(copy).recommend([], k=3)
    assert len(top) == 3 and top[0].score >= top[1].score >= top[2].score


def test_merchant_with_bad_data_fails_before_connecting(tmp_path):
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "catalog.csv").write_text("item_id\nA\n")
    (tmp_path / "shop" / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,A,yesterday\n")
    done = subprocess.run(_storefed("merchant", f"data_dir={tmp_path / 'shop'}", "superlink=127.0.0.1:1", "insecure=true"),
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "data check failed, not connecting" in done.stderr and "line 2, field 'timestamp'" in done.stderr


def test_insecure_merchant_warns_on_every_start_and_secure_needs_key(world, monkeypatch, capsys):
    from storefed.client import merchant_agent
    from storefed.client.merchant_agent import INSECURE_WARNING, MerchantOptions, run_merchant, supernode_command

    tmp, certs, _, _ = world
    launched = []
    monkeypatch.setattr(merchant_agent, "run_supernode", lambda cmd, env: launched.append(cmd) or 0)
    options = MerchantOptions(data_dir=tmp / "shop-a", ledger_dir=tmp / "ledger", superlink="127.0.0.1:1", insecure=True)
    for _ in range(2):
        assert run_merchant(options) == 0
        assert INSECURE_WARNING in capsys.readouterr().err
    assert all("--insecure" in cmd and "--auth-supernode-private-key" not in cmd for cmd in launched)
    with pytest.raises(ValueError, match="merchant.private_key=None is not a file"):
        supernode_command(MerchantOptions(data_dir=tmp, ledger_dir=tmp, superlink="h:1", ca_cert=certs / "ca.crt"))
    secure = supernode_command(MerchantOptions(data_dir=tmp, ledger_dir=tmp, superlink="h:1", ca_cert=certs / "ca.crt",
                                               private_key=certs / "merchants" / "shop-a"))
    assert "--insecure" not in secure and str(certs / "ca.crt") in secure


def test_renaming_the_data_directory_does_not_reset_the_budget(world, monkeypatch, tmp_path):
    import shutil

    from storefed.client import merchant_agent
    from storefed.client.merchant_agent import MerchantOptions, run_merchant

    tmp, _, _, _ = world
    monkeypatch.setattr(merchant_agent, "run_supernode", lambda cmd, env: 0)
    ledger = tmp_path / "ledger"
    assert run_merchant(MerchantOptions(data_dir=tmp / "shop-a", ledger_dir=ledger, superlink="h:1", insecure=True)) == 0
    assert json.loads((ledger / "merchant.json").read_text()) == {"merchant_id": "shop-a"}
    renamed = tmp_path / "shop-a-2027"
    shutil.copytree(tmp / "shop-a", renamed)
    with pytest.raises(ValueError, match="belongs to merchant 'shop-a', but this agent's data directory makes it "
                                         "'shop-a-2027': the privacy budget stays with the merchant"):
        run_merchant(MerchantOptions(data_dir=renamed, ledger_dir=ledger, superlink="h:1", insecure=True))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="ledger_dir=.*a-file is a file, not a directory"):
        run_merchant(MerchantOptions(data_dir=renamed, ledger_dir=tmp_path / "a-file", superlink="h:1", insecure=True))


def test_failed_deployment_run_exits_nonzero_and_insecure_server_warns(world):
    """``flwr run`` reports success on submission; the server must read the run's real final status."""
    tmp, _, _, _ = world
    fleet, control, port = free_ports(3)
    procs: list[Proc] = []
    try:
        server = Proc(_storefed(
            "server", f"run_dir={tmp / 'run'}", "server.insecure=true", f"server.fleet_address=127.0.0.1:{fleet}",
            f"server.control_port={control}", f"data.catalog={tmp / 'catalog.csv'}", "federation.num_stores=1",
            "federation.stores_per_round=1", "federation.eval_stores_per_round=1", "federation.rounds=1",
        ), tmp / "server.log")
        procs.append(server)
        server.wait_for("submitted run", timeout=90)
        broken = tmp / "ledger-broken"  # the merchant fails at round time: its ledger is unreadable
        broken.mkdir(exist_ok=True)
        (broken / "shop-a.recommender.ledger.json").write_text("{not json")
        procs.append(Proc(_storefed("merchant", f"data_dir={tmp / 'shop-a'}", f"ledger_dir={broken}",
                                    f"superlink=127.0.0.1:{fleet}", "insecure=true", f"port={port}"), tmp / "merchant.log"))
        assert server.popen.wait(timeout=300) == 1
    finally:
        for proc in procs:
            proc.stop()
    log = (tmp / "server.log").read_text()
    assert "NO TLS and NO merchant authentication" in log
    assert "FAILED" in log and "finished:failed" in log and "every sampled merchant failed" in log
    assert json.loads((tmp / "run" / "status.json").read_text())["status"] == "failed"
    assert "NO TLS" in (tmp / "merchant.log").read_text()


def test_tls_deployment_runs_distributed_dp_end_to_end(world):
    """privacy.mode=distributed over TLS gRPC with node auth: SecAgg+ carries the merchants' integer shares."""
    tmp, certs, _, authorized = world
    fleet, control, *node_ports = free_ports(5)
    run_dir = tmp / "run-distributed"
    procs: list[Proc] = []
    try:
        server = Proc(_storefed(
            "server", f"run_dir={run_dir}", f"server.certs_dir={certs}", f"server.authorized_dir={authorized}",
            f"server.fleet_address=127.0.0.1:{fleet}", f"server.control_port={control}",
            f"data.catalog={tmp / 'catalog.csv'}", "federation.rounds=2", "privacy.mode=distributed",
            "privacy.sample_rate=0.3", "privacy.epsilon=8",
        ), tmp / "server-distributed.log")
        procs.append(server)
        server.wait_for("registered 3 merchant key(s)", timeout=90)
        for name, port in zip(MERCHANTS, node_ports):
            procs.append(Proc(_storefed(
                "merchant", f"data_dir={tmp / name}", f"ledger_dir={tmp / name / 'ledger-distributed'}",
                f"superlink=127.0.0.1:{fleet}", f"ca_cert={certs / 'ca.crt'}", f"private_key={certs / 'merchants' / name}",
                f"port={port}",
            ), tmp / f"{name}-distributed.log"))
        assert server.popen.wait(timeout=400) == 0, (tmp / "server-distributed.log").read_text()[-3000:]
    finally:
        for proc in procs:
            proc.stop()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["secure_aggregation"] == "aggregated" for r in rows)
    assert "round 2: 3 trained" in (tmp / "server-distributed.log").read_text()  # the last round is printed too
    ledgers = [json.loads(next((tmp / name / "ledger-distributed").glob("*.ledger.json")).read_text())
               for name in MERCHANTS]
    for led in ledgers:
        assert [r["mechanism"] for r in led["rounds"]] == ["skellam", "skellam"]
        assert led["rounds"][-1]["epsilon_own_share_total"] > led["rounds"][-1]["epsilon_total"]
    assert len({round(led["rounds"][-1]["epsilon_total"], 9) for led in ledgers}) == 1, "one population-level epsilon"
    assert "population-level epsilon" in (tmp / "shop-a-distributed.log").read_text()


def test_exposing_options_and_an_expired_certificate_are_refused_before_start(tmp_path, capsys):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from storefed.cli import main
    from storefed.server.deployment import ServerOptions, exposure_problem

    certs = tmp_path / "certs"
    certs.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(past).not_valid_after(past + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (certs / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    base = dict(certs_dir=certs, authorized_dir=certs, fleet_address="0.0.0.0:9092")
    assert "not now: merchants would refuse" in exposure_problem(ServerOptions(**base))
    assert "control_host=0.0.0.0 is not allowed" in exposure_problem(ServerOptions(**base, control_host="0.0.0.0"))
    insecure = ServerOptions(**base, insecure=True)
    assert "insecure=true with server.fleet_address=0.0.0.0:9092 is not allowed" in exposure_problem(insecure)
    assert exposure_problem(ServerOptions(**{**base, "fleet_address": "127.0.0.1:9092"}, insecure=True)) is None
    run_dir = tmp_path / "run"
    code = main(["server", f"run_dir={run_dir}", f"server.certs_dir={certs}", "server.control_host=10.0.0.5",
                 f"data.catalog={tmp_path / 'catalog.csv'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "server.control_host=10.0.0.5 is not allowed" in err and "\n" not in err
    assert not run_dir.exists(), "nothing written or started"


def test_merchant_person_budget_reaches_the_node_config_and_bad_values_are_refused(tmp_path, capsys):
    from storefed.cli import main
    from storefed.client.merchant_agent import MerchantOptions, node_config

    text = node_config(MerchantOptions(data_dir=tmp_path, ledger_dir=tmp_path, superlink="h:1", person_epsilon_budget=4))
    assert "person-epsilon-budget=4.0" in text.split()
    assert "person-epsilon-budget" not in node_config(MerchantOptions(data_dir=tmp_path, ledger_dir=tmp_path, superlink="h:1"))
    assert main(["merchant", f"data_dir={tmp_path}", "person_epsilon_budget=-1"]) == 2
    assert "person_epsilon_budget=-1" in capsys.readouterr().err


def test_the_server_prints_the_last_round_written_just_before_the_run_finished(tmp_path, monkeypatch, capsys):
    """The race seen over SecAgg+: the final metrics row lands between the read and the status check."""
    from storefed.server import deployment

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 1, "trained": 3}\n{"round": 2, "tra', encoding="utf-8")  # row 2 half-appended
    calls = []

    def status(run_id, env):
        calls.append(run_id)
        if len(calls) == 2:  # row 2 completes, then the run finishes, before the next read
            metrics.write_text('{"round": 1, "trained": 3}\n{"round": 2, "trained": 3, "failed": 1}\n', encoding="utf-8")
            return "finished:completed"
        return "running"

    monkeypatch.setattr(deployment, "run_status", status)
    assert deployment.wait_for_run("7", tmp_path, {}, timeout_s=30, poll_s=0.01) == "finished:completed"
    assert capsys.readouterr().out.splitlines() == [
        "round 1: 3 trained, 0 refused, 0 failed", "round 2: 3 trained, 0 refused, 1 failed"]
