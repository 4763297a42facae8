"""What a user sees: a quiet console (one line per round, no library noise), and the run report
(Markdown, a self-contained HTML page checked in a real headless Chromium, PNG plots)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from storefed.simulations.report import run_report_command, write_report

SMALL = ["federation.num_stores=4", "federation.stores_per_round=2", "federation.rounds=2",
         "data.generator.num_items=200"]


def _storefed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "storefed", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A real 2-round recommender simulation under DP, run as a user runs it (stdout is a pipe: plain lines)."""
    base = tmp_path_factory.mktemp("run")
    result = _storefed("simulate", *SMALL, f"run_dir={base / 'run'}", cwd=base)
    assert result.returncode == 0, result.stdout + result.stderr
    return base / "run", result


def test_console_is_one_plain_line_per_round_without_library_noise(finished_run):
    run_dir, result = finished_run
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 10, "\n".join(lines)  # header, 2 rounds, 5 summary lines, report line
    budget = next(line for line in lines if line.startswith("  per customer across tasks:"))
    assert "budget 8 (privacy.person_epsilon, enforced" in budget and "this task's budget 5.323" in budget
    for number in (1, 2):
        assert sum(line.startswith(f"[recommender] round {number}:") for line in lines) == 1
    text = "\n".join(lines)
    for noise in ("UserWarning", "INFO", "DEPRECATED", "ClientAppActor", "\x1b["):
        assert noise not in text, f"{noise!r} printed:\n{text}"
    assert len(lines) == len(set(lines)), "a line was printed twice"
    assert "[recommender] 2/2 rounds in" in text
    assert re.search(r"privacy: epsilon max \d+\.\d{3} over \d+ merchants \(per customer, delta=1e-05, RDP "
                     r"accountant, Poisson sampling, local mode\)", text)
    assert f"report: {run_dir / 'report.html'}" in text


def test_verbose_brings_back_flower_lines(tmp_path):
    quiet_rounds = ["federation.rounds=1"]
    result = _storefed("simulate", "-v", *SMALL, *quiet_rounds, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "[ROUND 1/1]" in text and "configure_train" in text  # Flower's own INFO lines
    assert "StoreFed merchant store-" in text  # the simulated merchants' round lines


def test_report_files_agree_with_the_run(finished_run):
    run_dir, _ = finished_run
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the round table holds the run's own numbers
        assert f"| {row['round']} | {row['trained']} | {row['refused']} |" in markdown
        assert f"{row['eval_hr@10']:.4f}" in markdown and f"{row['epsilon_total_max']:.3f}" in markdown
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"**{summary['privacy']['epsilon_max']:.3f}** per customer" in markdown
    assert "delta=1e-05, RDP accountant, Poisson sampling, local mode" in markdown
    assert "(this task's budget 5.323, delta=1e-05" in markdown and "budget None" not in markdown
    assert "- Per customer across tasks: budget 8 (privacy.person_epsilon, enforced" in markdown  # as on the console
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots == ["epsilon_vs_round.png", "loss_vs_round.png", "metric_vs_round.png", "participation.png"]
    import matplotlib.image

    for name in plots:
        height, width = matplotlib.image.imread(run_dir / "plots" / name).shape[:2]
        assert width >= 400 and height >= 200, name
        assert f"(plots/{name})" in markdown
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 4 and "plots/" not in page.split("<body>")[1]


PROBE = """<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(
String((e.target&&e.target.src&&e.target.src.slice(0,60))||e.message||e.type))},true);
window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);var r={images:im.length,
loaded:im.filter(function(i){return i.complete&&i.naturalWidth>0}).length,errors:window.__errors,
title:document.title,tables:document.querySelectorAll('table').length};var p=document.createElement('pre');
p.id='storefed-check';p.textContent=JSON.stringify(r);document.body.appendChild(p);});</script>"""


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)


def test_report_page_loads_in_headless_chromium_with_every_image(finished_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine: install the Debian package `chromium` to run the browser check")
    run_dir, _ = finished_run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"  # the report as is, plus a probe that records load errors and image sizes
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                             "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="storefed-check">(.*?)</pre>', result.stdout)
    assert found, f"the page did not finish loading: {result.stderr[-500:]}"
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check == {"images": 4, "loaded": 4, "errors": [], "title": "StoreFed run report: recommender",
                     "tables": 3}, check
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,1400", (run_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1400, 1000) and pixels[..., :3].std() > 0.05, "the page rendered blank"


def test_sweep_folder_gets_a_privacy_utility_curve_across_runs(finished_run, tmp_path):
    run_dir, _ = finished_run
    for name, epsilon, metric in (("eps-1", 1.0, 0.11), ("eps-8", 8.0, 0.22)):
        member = tmp_path / "sweep" / name
        shutil.copytree(run_dir, member)
        config = yaml.safe_load((member / "config.yaml").read_text())
        config["privacy"]["epsilon"] = epsilon
        (member / "config.yaml").write_text(yaml.safe_dump(config))
        summary = json.loads((member / "summary.json").read_text())
        summary["final_eval"]["eval_hr@10"] = metric
        (member / "summary.json").write_text(json.dumps(summary))
    files = write_report(tmp_path / "sweep")
    markdown = files.markdown.read_text()
    assert files.kind == "sweep" and [p.name for p in files.images] == ["privacy_utility_runs.png"]
    table = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| eps-")}
    assert table["eps-1"].startswith("| eps-1 | 1.000 |") and table["eps-1"].endswith("| 0.1100 |")
    assert table["eps-8"].startswith("| eps-8 | 8.000 |") and table["eps-8"].endswith("| 0.2200 |")


def test_bad_run_dirs_are_refused_with_one_line(finished_run, tmp_path, capsys):
    assert run_report_command([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert run_report_command([str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
    run_dir, _ = finished_run
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    ledger = next((edited / "ledgers").glob("*.ledger.json"))
    payload = json.loads(ledger.read_text())
    payload["rounds"][0]["epsilon_total"] = 0.01  # someone lowers the recorded spend by hand
    ledger.write_text(json.dumps(payload))
    before = sorted(p.name for p in edited.iterdir())
    assert run_report_command([str(edited)]) == 2
    err = capsys.readouterr().err.strip()
    assert ledger.name in err and "\n" not in err
    assert not (edited / "report.html").exists() or "report.html" in before  # nothing new half-written


def test_simulations_turn_on_ray_token_authentication(tmp_path, monkeypatch):
    """Ray cannot be bound to loopback (storefed/flower_env.py): its servers must refuse peers without the token."""
    from storefed.flower_env import prepare_simulation_environment

    tokens = []
    for _ in range(2):
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "FLWR_HOME"):
            monkeypatch.delenv(key, raising=False)
        prepare_simulation_environment(tmp_path)

        assert os.environ["RAY_AUTH_MODE"] == "token"
        tokens.append(os.environ["RAY_AUTH_TOKEN"])
    # one token per process (Ray's loader keeps the first it saw), a fresh random one in every process
    other = subprocess.run([sys.executable, "-c", "import os; from storefed.flower_env import "
                            f"prepare_simulation_environment as p; p(__import__('pathlib').Path({str(tmp_path)!r})); "
                            "print(os.environ['RAY_AUTH_TOKEN'])"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}, check=True).stdout.strip()
    assert all(re.fullmatch(r"[0-9a-f]{64}", t) for t in (*tokens, other))
    assert tokens[0] == tokens[1] and other != tokens[0], "one random token per process"
