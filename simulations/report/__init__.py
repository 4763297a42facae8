"""``storefed report RUN_DIR``: Markdown + self-contained HTML report with PNG plots, for any run directory.

    write_report(run_dir) -> ReportFiles     # report.md, report.html, plots/*.png in run_dir

Also called at the end of ``storefed simulate``, ``server`` and ``evaluate``. Kinds of directory
and what each report shows: ``run_data.py``; the plots: ``figures.py``; the text: ``render.py``.
Nothing is half-written: every file goes through a temp file and a rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from storefed.atomic_files import atomic_write_bytes, atomic_write_text
from storefed.privacy.ledger import LedgerError
from storefed.simulations.report import figures
from storefed.simulations.report.render import evaluation_markdown, federation_markdown, sweep_markdown, to_html
from storefed.simulations.report.run_data import (
    ReportError,
    kind_of,
    load_evaluation,
    load_federation,
    sweep_members,
)

PLOTS_DIR = "plots"


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    kind: str
    markdown: Path
    html: Path
    images: tuple[Path, ...]


def _federation_images(run, plots: Path) -> dict[str, Path]:
    mode = (run.summary.get("privacy") or {}).get("mode") or (run.config.get("privacy") or {}).get("mode", "local")
    candidates = {
        "Task metric per round": figures.metric_vs_round(run.rows, run.task, plots / "metric_vs_round.png"),
        "Training loss per round": figures.loss_vs_round(run.rows, run.task, plots / "loss_vs_round.png"),
        "Epsilon per merchant per round (from the ledgers)": figures.epsilon_vs_round(
            [ledger for ledger in run.ledgers if ledger.task == run.task], mode, plots / "epsilon_vs_round.png"),
        "Participation per round": figures.participation(run.rows, plots / "participation.png"),
    }
    return {title: path for title, path in candidates.items() if path is not None}


def _sweep_points(folder: Path) -> list[dict]:
    points = []
    for member in sweep_members(folder):
        run = load_federation(member)
        privacy_cfg = run.config.get("privacy") or {}
        summary_privacy = run.summary.get("privacy") or {}
        metric = figures.TASK_METRICS.get(run.task, ("",))[0]
        enabled = privacy_cfg.get("enabled", True)
        points.append({
            "label": member.name, "task": run.task,
            "epsilon": float(privacy_cfg.get("epsilon", float("inf"))) if enabled else float("inf"),
            "spent": summary_privacy.get("epsilon_max"), "unit": summary_privacy.get("unit", "?"),
            "delta": privacy_cfg.get("delta"), "metric": (run.summary.get("final_eval") or {}).get(f"eval_{metric}"),
        })
    return points


def write_report(run_dir: Path | str) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``run_dir``; ReportError on a bad directory."""
    run_dir = Path(run_dir).resolve()
    kind = kind_of(run_dir)
    plots = run_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    try:
        if kind == "federation":
            run = load_federation(run_dir)
            images = _federation_images(run, plots)
            text, title = federation_markdown(run, images), f"StoreFed run report: {run.task}"
        elif kind == "evaluate":
            payload = load_evaluation(run_dir)
            images = {title: run_dir / name for title, name in (
                ("Privacy-utility (per method, mean over seeds)", "privacy_utility.png"),
                ("DP / non-private ratio by number of customers", "dp_ratio_by_customers.png"))
                if (run_dir / name).is_file()}
            images = {title: _copy_into(path, plots) for title, path in images.items()}
            text, title = evaluation_markdown(run_dir, payload, images), "StoreFed evaluation report"
        else:
            points = _sweep_points(run_dir)
            curve = figures.privacy_utility_across_runs(points, points[0]["task"], plots / "privacy_utility_runs.png")
            images = {"Privacy-utility across runs": curve} if curve else {}
            text, title = sweep_markdown(run_dir, points, images), "StoreFed sweep report"
    except (LedgerError, yaml.YAMLError) as exc:
        raise ReportError(f"cannot report on {run_dir}: {exc}") from exc
    markdown_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(markdown_path, text)
    atomic_write_text(html_path, to_html(text, run_dir, title))
    return ReportFiles(kind, markdown_path, html_path, tuple(images.values()))


def _copy_into(path: Path, plots: Path) -> Path:
    target = plots / path.name
    atomic_write_bytes(target, path.read_bytes())
    return target


def report_after_run(run_dir: Path) -> ReportFiles | None:
    """The report a finished command writes for its run; a directory it cannot report on is named, not fatal."""
    try:
        files = write_report(run_dir)
    except ReportError as exc:
        print(f"  report: not written: {' '.join(str(exc).split())}", file=sys.stderr)
        return None
    print(f"  report: {files.html}")
    return files


def run_report_command(argv: list[str]) -> int:
    """``storefed report RUN_DIR``: exit 0 and the written paths, or 2 with one line naming the problem."""
    parser = argparse.ArgumentParser(prog="storefed report", description=run_report_command.__doc__)
    parser.add_argument("run_dir", help="a run directory of storefed simulate, server or evaluate, or a folder of runs")
    args = parser.parse_args(argv)
    try:
        files = write_report(args.run_dir)
    except ReportError as exc:
        print(f"storefed report: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"report ({files.kind}): {files.html}")
    print(f"  markdown: {files.markdown}; {len(files.images)} plots in {files.html.parent / PLOTS_DIR}")
    return 0
