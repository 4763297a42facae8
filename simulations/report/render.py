"""The report's text: Markdown (``report.md``, images as relative links) and a self-contained HTML
page (``report.html``, the same content converted by the ``markdown`` library, images embedded as
data URIs so the one file can be mailed or archived)."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import markdown as markdown_lib

from storefed.server.checkpoint import run_owner_alive
from storefed.server.run_log import budget_sentence
from storefed.simulations.report.figures import TASK_METRICS
from storefed.simulations.report.run_data import FederationRun

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4rem 0; }
code { background: #f5f5f5; padding: 0 0.2rem; }
"""


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _budget(privacy: dict, cfg: dict) -> str:
    """This task's epsilon budget: the run's resolved one (``privacy.epsilon=null`` means its share of the
    person budget), else the configured value (older runs)."""
    budget = privacy.get("task_epsilon", cfg.get("epsilon"))
    return "?" if budget is None else f"{float(budget):.3f}"


def _privacy_lines(run: FederationRun) -> list[str]:
    privacy = run.summary.get("privacy") or {}
    cfg = run.config.get("privacy") or {}
    lines = [f"- Guarantee: {privacy.get('guarantee', 'unknown (no summary.json: the run did not finish)')}"]
    if privacy.get("epsilon_max") is not None:
        final = run.summary.get("final_eval") or {}
        lines.append(
            f"- Epsilon spent, max over {privacy.get('merchants_trained', 0)} merchants: "
            f"**{privacy['epsilon_max']:.3f}** per {privacy['unit']} (this task's budget {_budget(privacy, cfg)}, "
            f"delta={final.get('delta', cfg.get('delta', '?'))}, {str(privacy['accountant']).upper()} accountant, "
            f"{privacy['sampling']} sampling, {privacy['mode']} mode)")
    budget = budget_sentence(privacy)
    if budget:
        lines.append(f"- {budget[0].upper()}{budget[1:]}")
    if privacy.get("client_level"):
        lines.append(f"- Client-level (central) DP: `{privacy['client_level']}`")
    if privacy.get("mode") == "distributed":
        lines.append("- Distributed mode: the epsilon is population-level and holds only while secure aggregation "
                     "holds (an honest-but-curious coordinator that follows the SecAgg+ protocol).")
    return lines


def _person_table(run: FederationRun, limit: int = 10) -> list[str]:
    """Per merchant: each task's epsilon and the per-customer epsilon composed over all its tasks."""
    if not run.person:
        return []
    tasks = sorted({t for row in run.person for t in row["per_task"]})
    ordered = sorted(run.person, key=lambda r: -r["epsilon"])
    methods = {re.sub(r"k=\d+", "k=K", r["method"]) for r in ordered}
    ks = [re.search(r"k=(\d+)", r["method"]) for r in ordered[:limit]]
    grouped = any(ks)  # a per-review task: show each merchant's K
    rows = [[r["merchant_id"]] + [_num(r["per_task"].get(t), 3) for t in tasks] + [_num(r["epsilon"], 3)]
            + (([k.group(1)] if k else ["-"]) if grouped else []) for r, k in zip(ordered[:limit], ks)]
    units = {ledger.task: ledger.unit for ledger in run.ledgers}
    header = (["merchant"] + [f"{t} (per {units.get(t, '?')})" for t in tasks] + ["per customer, all tasks"]
              + (["K (largest group of one customer's units)"] if grouped else []))
    delta = min(r["delta"] for r in run.person)
    note = (f"{len(ordered)} merchants with a ledger; the {min(limit, len(ordered))} with the largest per-customer "
            f"epsilon shown. delta={delta:g}. The per-customer column composes every task whose data holds the "
            f"customer: {'; '.join(sorted(methods))}.")
    budgets = {ledger.budget for ledger in run.ledgers}
    worst = ordered[0]["epsilon"]
    warning = []
    if budgets and worst > max(budgets) * 1.0001:
        warning = [f"> **Per customer, the largest composed epsilon is {worst:.3f}**, above the per-task budget "
                   f"({max(budgets):g}): a per-task budget does not cover a customer who has several units (reviews) "
                   "or appears in several tasks. `privacy.person_epsilon` enforces a per-customer budget "
                   "(docs/privacy.md).", ""]
    return ["### Per-task and per-customer epsilon at each merchant", "", note, "", *warning, _table(header, rows), ""]


def federation_markdown(run: FederationRun, images: dict[str, Path]) -> str:
    status = run.status.get("status", "unknown")
    cfg = run.config
    federation = cfg.get("federation") or {}
    summary = run.summary
    metric, baseline = TASK_METRICS.get(run.task, ("", ""))
    lines = [f"# StoreFed run report: {run.task}", "",
             f"- Run directory: `{run.run_dir.name}`; status: **{status}**"
             + (f" ({run.status.get('error')})" if run.status.get("error") else ""),
             f"- Rounds: {summary.get('rounds_completed', len(run.rows))} of {summary.get('rounds', federation.get('rounds', '?'))}"
             f" completed in {summary.get('seconds', '?')} s"
             + (f"; stopped early: {summary['stopped_early']}" if summary.get("stopped_early") else ""),
             f"- Federation: {federation.get('num_stores', '?')} stores, {federation.get('stores_per_round', '?')} per "
             f"round; strategy {(cfg.get('strategy') or {}).get('name', '?')}; data {(cfg.get('data') or {}).get('source', '?')}",
             ""]
    if run.status.get("status") == "running":
        alive = run_owner_alive(run.status)
        if alive is False:
            lines += [f"> **This run was left `running` by a dead process** (pid {run.status.get('pid')} on "
                      f"{run.status.get('host')}): its metrics stop at the last finished round. Continue it with "
                      "the same command and `resume=true`.", ""]
        else:
            lines += ["> **This run is still running**" + (" " if alive else " (or its process is on another host) ")
                      + "- the report shows the rounds finished so far.", ""]
    final = summary.get("final_eval") or (run.rows[-1] if run.rows else {})
    if final:
        cells = [(metric, final.get(f"eval_{metric}")), (f"baseline: {baseline}", final.get(f"eval_{baseline}")),
                 ("training loss", final.get("train_train_loss"))]
        lines += ["## Outcome (last round)", "", _table(["quantity", "value"], [[k, _num(v)] for k, v in cells]), ""]
    lines += ["## Privacy", ""] + _privacy_lines(run) + [""] + _person_table(run)
    if run.rows:
        header = ["round", "trained", "refused", "failed", "rejected", "loss", metric, "eps max", "eps median"]
        rows = [[r["round"], r.get("trained", 0), r.get("refused", 0), r.get("failed", 0), r.get("rejected", 0),
                 _num(r.get("train_train_loss")), _num(r.get(f"eval_{metric}")), _num(r.get("epsilon_total_max"), 3),
                 _num(r.get("epsilon_total_median"), 3)] for r in run.rows]
        lines += ["## Rounds", "", _table(header, rows), ""]
    lines += _images(images)
    return "\n".join(lines) + "\n"


def evaluation_markdown(run_dir: Path, payload: dict, images: dict[str, Path]) -> str:
    meta = payload.get("meta", {})
    results_md = (run_dir / "results.md").read_text(encoding="utf-8") if (run_dir / "results.md").is_file() else ""
    results_md = re.sub(r"^#+ ", "### ", results_md, flags=re.M)  # nested under the report's headings
    lines = [f"# StoreFed evaluation report: {meta.get('task', '?')}", "",
             f"- Run directory: `{run_dir.name}`; data {meta.get('data', '?')}; {len(payload.get('rows', []))} result rows; "
             f"{meta.get('wall_seconds', '?')} s on {meta.get('machine', '?')}",
             f"- Command: `{meta.get('command', '?')}`", "", "## Results", "", results_md, ""]
    lines += _images(images)
    return "\n".join(lines) + "\n"


def sweep_markdown(folder: Path, points: list[dict], images: dict[str, Path]) -> str:
    task = points[0]["task"] if points else "?"
    metric = TASK_METRICS.get(task, ("metric",))[0]
    rows = [[p["label"], _num(p["epsilon"], 3), _num(p["spent"], 3), _num(p["metric"])] for p in
            sorted(points, key=lambda p: p["epsilon"])]
    unit = next((p["unit"] for p in points), "?")
    lines = [f"# StoreFed sweep report: {task}", "", f"{len(points)} runs under `{folder.name}`.", "",
             _table(["run", f"epsilon budget (per {unit})", "epsilon spent (max)", f"final {metric}"], rows), ""]
    lines += _images(images)
    return "\n".join(lines) + "\n"


def _images(images: dict[str, Path]) -> list[str]:
    if not images:
        return []
    lines = ["## Plots", ""]
    for title, path in images.items():
        lines += [f"### {title}", "", f"![{title}]({path.parent.name}/{path.name})", ""]
    return lines


def to_html(markdown_text: str, base: Path, title: str) -> str:
    """One self-contained page: the Markdown converted, each local PNG embedded as a data URI."""
    body = markdown_lib.markdown(markdown_text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        path = base / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")

