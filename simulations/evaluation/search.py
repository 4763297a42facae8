"""Hyperparameter search on validation data, through `storefed evaluate`'s own code path.

    python -m storefed.simulations.evaluation.search task=review data=amazon data.path=FILE \\
        "evaluate.methods=[federated_dp]" run_dir=runs/search-review \\
        --trial "task.lr=0.05" --trial "task.lr=0.2 privacy.max_grad_norm=0.5"

Every trial is the base overrides plus its own, with ``task.holdout=validation`` forced: the
held-out reviews (or each customer's last training item, for the recommender) are carved from the
*training* data and the test split is never read. Trials run one after another in this process, so review embeddings are computed
once. ``<run_dir>/search.{json,md}`` list each trial's validation score per method and epsilon
and the best trial per row; the test-set run then uses the chosen values.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from storefed.atomic_files import atomic_write_text
from storefed.config.compose import compose
from storefed.config.validate import ConfigError

SCORE = {"review": "macro_f1", "recommender": "hr@10"}


def run_search(base: list[str], trials: list[list[str]], run_dir: Path) -> dict:
    """Run every trial on validation data; returns (and writes) the table and the best trial per row."""
    from storefed.simulations.evaluation.command import evaluate
    from storefed.simulations.evaluation.grid import build_spec

    settings = [compose("evaluate", [*base, *trial, "task.holdout=validation", f"run_dir={run_dir / f'trial-{n}'}"])
                for n, trial in enumerate(trials)]
    task = settings[0].task.name
    if task not in SCORE:
        raise ConfigError(f"task={task}: no validation score is defined for it: choose task=review or task=recommender")
    specs = [build_spec(s) for s in settings]  # every trial's config is checked before the first one runs
    rows = []
    for n, (trial, cfg, spec) in enumerate(zip(trials, settings, specs)):
        print(f"[trial {n + 1}/{len(trials)}] {' '.join(trial) or '(base)'}", flush=True)
        paths = evaluate(cfg, spec, Path(cfg.run_dir), command=["search", *base, *trial])
        for row in json.loads(Path(paths["json"]).read_text(encoding="utf-8"))["summary"]:
            rows.append({"trial": n, "overrides": " ".join(trial), **row})
    best: dict[str, dict] = {}
    score = SCORE[task]
    for row in rows:
        key = f"{row['method']} K={row['num_merchants']} {row['partition']} eps={row.get('epsilon')}"
        value = row["stats"][score]["mean"]
        if key not in best or value > best[key]["score"]:
            best[key] = {"score": value, "trial": row["trial"], "overrides": row["overrides"]}
    result = {"base": base, "trials": [" ".join(t) for t in trials], "score": f"validation {score}",
              "rows": rows, "best": best}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "search.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(run_dir / "search.md", _markdown(result, score))
    return result


def _markdown(result: dict, score: str) -> str:
    lines = [f"# Hyperparameter search (validation {score}; the test split is not used)", "",
             f"Base: `{' '.join(result['base'])}`", "", f"| trial | overrides | method | K | partition | eps | {score} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        m = row["stats"][score]
        lines.append(f"| {row['trial']} | `{row['overrides'] or '(base)'}` | {row['method']} | {row['num_merchants']} | "
                     f"{row['partition']} | {row.get('epsilon') or '-'} | {m['mean']:.4f} ± {m.get('std', 0):.4f} |")
    lines += ["", "## Best per row", ""]
    lines += [f"- {key}: trial {b['trial']} (`{b['overrides'] or '(base)'}`), {b['score']:.4f}" for key, b in result["best"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storefed.simulations.evaluation.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="base config overrides (key=value), as for storefed evaluate")
    parser.add_argument("--trial", action="append", default=[], help="one trial's extra overrides, quoted")
    args = parser.parse_args(argv)
    base = [o for o in args.overrides if not o.startswith("run_dir=")]
    run_dirs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("run_dir=")]
    if not run_dirs:
        print("search: give run_dir=DIR (trials go to DIR/trial-N)", file=sys.stderr)
        return 2
    try:
        result = run_search(base, [shlex.split(t) for t in args.trial] or [[]], Path(run_dirs[0]).resolve())
    except (ConfigError, ValueError) as exc:
        print("search: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    print(_markdown(result, result["score"].split()[-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
