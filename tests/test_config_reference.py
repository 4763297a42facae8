"""docs/configuration.md is generated from the structured configs and must stay in step with them."""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from storefed.config import compose, schema
from storefed.config.reference import (
    REGENERATE,
    all_key_docs,
    field_description,
    field_owner,
    parse_classes,
    render_reference,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
CELL = re.compile(r"(?<!\\)\|")


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


@pytest.fixture(scope="module")
def sections(reference: str) -> dict[str, dict[str, list[str]]]:
    """Per heading (``#### `task=review` ``, ``### `storefed simulate` ``): table rows by key -> cells."""
    out: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in reference.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().strip("`")
            out.setdefault(heading, {})
        elif line.startswith("| `"):
            cells = [c.strip() for c in CELL.split(line)[1:-1]]
            out[heading][cells[0].strip("`")] = cells
    return out


def _all_keys(sections: dict[str, dict[str, list[str]]]) -> set[str]:
    return {key for rows in sections.values() for key in rows}


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a composed (dataclass) config, sections and leaves, as the user types it."""
    keys: list[str] = []
    for f in fields(node):
        if f.name == "defaults":
            continue
        keys.append(f"{prefix}{f.name}")
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys += _dotted_keys(value, f"{prefix}{f.name}.")
    return keys


def _schema_dataclasses() -> list[type]:
    return [c for _, c in inspect.getmembers(schema, inspect.isclass)
            if is_dataclass(c) and c.__module__ == schema.__name__]


def test_docs_configuration_md_is_current(reference: str) -> None:
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    if current != reference:
        diff = list(difflib.unified_diff(current.splitlines(), reference.splitlines(), "docs/configuration.md",
                                         "render_reference()", lineterm="", n=1))
        pytest.fail(f"docs/configuration.md is stale: regenerate it with `{REGENERATE}` (from the repository "
                    "root) and commit it.\n" + "\n".join(diff[:40]), pytrace=False)


def test_header_says_generated_and_how(reference: str) -> None:
    head = "\n".join(reference.splitlines()[:4])
    assert "Generated" in head and REGENERATE in head
    assert str(Path.cwd()) not in reference and str(Path.home()) not in reference  # no absolute paths


def test_every_composed_key_is_documented(sections: dict[str, dict[str, list[str]]]) -> None:
    documented = _all_keys(sections)
    for command, overrides in [("simulate", []), ("simulate", ["task=review", "privacy=none", "strategy=fedadam"]),
                               ("simulate", ["strategy=fedtrimmedavg", "data=files"]), ("server", []),
                               ("certs", []), ("merchant", ["data_dir=x"]), ("merchant_status", [])]:
        missing = [k for k in _dotted_keys(compose(command, overrides)) if k not in documented]
        assert not missing, f"{command} {overrides}: keys missing from the reference: {missing}"


def test_known_keys_show_their_schema_defaults(sections: dict[str, dict[str, list[str]]]) -> None:
    def row(heading: str, key: str) -> tuple[str, str]:
        cells = sections[heading][key]
        return cells[1], cells[2].strip("`")

    dp, none = schema.PrivacyConfig(), compose("simulate", ["privacy=none"]).privacy
    assert row("privacy=dp", "privacy.epsilon") == ("float or null", "null") and dp.epsilon is None
    assert row("privacy=dp", "privacy.person_epsilon") == ("float or null", repr(dp.person_epsilon))
    assert row("privacy=dp", "privacy.delta") == ("float", repr(dp.delta))
    assert row("privacy=none", "privacy.epsilon") == ("float or null", repr(none.epsilon))  # the preset's own value
    # per-option defaults: the same key documented once per option, each with its own default
    recommender, review = schema.RecommenderConfig(), schema.ReviewConfig()
    assert recommender.epochs != review.epochs
    assert row("task=recommender", "task.epochs") == ("int", str(recommender.epochs))
    assert row("task=review", "task.epochs") == ("int", str(review.epochs))
    assert row("federation=local", "federation.num_stores")[1] == str(schema.FederationConfig().num_stores)
    assert row("federation=deployment", "federation.num_stores")[1] == str(compose("server").federation.num_stores)
    assert row("data=virtual", "data.generator.num_items")[1] == str(schema.GeneratorConfig().num_items)
    assert row("storefed simulate", "seed") == ("int", str(schema.RunConfig().seed))
    group_default = schema.RunConfig().defaults[0]["task"]
    assert sections["storefed simulate"]["task"][1] == f"`{group_default}`"  # groups table: group, default, ...
    assert sections["storefed merchant"]["data_dir"][2] == "`???` (required)"
    assert row("storefed server", "server.control_port")[1] == str(schema.ServerConfig().control_port)


def test_every_schema_field_has_a_description(sections: dict[str, dict[str, list[str]]]) -> None:
    docs = all_key_docs()
    by_field: dict[tuple[str, str], set[str]] = {}
    for doc in docs:
        by_field.setdefault((doc.owner, doc.field), set()).add(doc.key)
    tables: dict[str, list[list[str]]] = {}
    for rows in sections.values():
        for key, cells in rows.items():
            tables.setdefault(key, []).append(cells)
    problems = []
    for cls in _schema_dataclasses():
        for f in fields(cls):
            if f.name == "defaults":  # hydra's defaults list, not a key
                continue
            where = f"{field_owner(cls, f.name)}.{f.name}"
            if not field_description(cls, f.name):
                problems.append(f"{where}: no comment in schema.py")
            keys = by_field.get((field_owner(cls, f.name), f.name), set())
            if not keys:
                problems.append(f"{where}: not in the reference")
            for key in keys:
                if key not in tables or not all(cells[-1] for cells in tables[key]):
                    problems.append(f"{where}: row {key} missing or without a description")
    assert not problems, "\n".join(problems)


def test_descriptions_are_the_schema_comments(sections: dict[str, dict[str, list[str]]]) -> None:
    text = field_description(schema.PrivacyConfig, "epsilon")
    assert text and sections["privacy=dp"]["privacy.epsilon"][-1] == text
    assert "|" in field_description(schema.RecommenderConfig, "model")  # escaped, so the table keeps 4 columns
    assert len(sections["task=recommender"]["task.model"]) == 4


def test_comment_parser() -> None:
    source = '''
class A:
    """First paragraph
    of the doc.

    Second paragraph."""

    # block above
    x: int = 1  # trailing
    y: str = "a#b"  # the real comment

    # detached by a blank line

    z: list = field(default_factory=lambda: [
        1, 2])  # after a multi-line value
    w: int = 0

    def f(self) -> None:
        v: int = 3  # a local, not a field
'''
    parsed = parse_classes(source)["A"]
    assert parsed.docstring == "First paragraph of the doc."
    assert parsed.comments == {"x": "block above. trailing", "y": "the real comment",
                               "z": "after a multi-line value", "w": ""}
