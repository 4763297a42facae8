"""Fuzz tests: generated bad inputs to the merchant file loaders, the public-format importers, the
converter and config validation.

Every input is a valid one with mutations (wrong types, missing/extra fields, NaN/inf/huge/negative
numbers, broken JSON, truncated lines, non-UTF-8 bytes, empty files, duplicate ids, unknown items,
bad timestamps, very long strings, nested structures; for configs unknown keys, wrong types,
out-of-range values and malformed ``key=value`` strings). Each call either succeeds (the mutation
happened to be valid) or raises only the documented error type with one line naming the file (and
line/field where it applies) or the config key; any other exception fails the test. A refused
conversion leaves the output directory as it was; an accepted one loads back. 2,350 generated inputs
in all (plus the explicit examples: inputs that found bugs), derandomized; about 20 s.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import math
import re
import tempfile
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from storefed.config import ConfigError, compose
from storefed.config.schema import ImportedDataConfig
from storefed.config.serialize import from_dict, to_dict
from storefed.config.store import ROOT_CONFIGS
from storefed.config.validate import config_keys
from storefed.data import sources
from storefed.data.convert import convert_to_merchant_dirs
from storefed.data.importers import read_amazon_reviews, read_movielens
from storefed.data.merchant_files import (
    MAX_TEXT_CHARS,
    MerchantDataError,
    load_catalog,
    load_merchant_dir,
)
from storefed.data.schema import Catalog


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


CATALOG = Catalog(item_ids=("A", "B", "C"), categories=("x", "x", "y"))
MAX_MESSAGE = 1000  # characters besides the file path: a clear error, not a dump of the input


@dataclass(frozen=True)
class Raw:
    """A JSON token written verbatim (huge integer literals, NaN, broken syntax, deep nesting)."""

    text: str


RAW_TOKENS = [
    "1" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "[" * 3000 + "]" * 3000,
    '"\\ud800"', '"a\\udfffb"', "tru", "01", '"unterminated', "{", "}", "[1,", "'single'", "0x10", "+1", ".5",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=6,
)

# any value a JSON field may hold, mostly wrong
bad_json_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 6, 10**12, 10**20, 2**63, -(2**63) - 1, 253_402_300_800, 4.0, 4.5, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "inf", "-5", "1.5", "1e999", "4", " 3 ", "\x00", "\ud800", "x\ny", "5" * 30]),
    st.just("x" * (MAX_TEXT_CHARS + 1)),
    json_values,
    st.sampled_from(RAW_TOKENS).map(Raw),
)

# any text a CSV cell or u.data field may hold, mostly wrong
bad_cells = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "-5", "1.5", "4.0", "1e999", "0", "6", "1_000", "\x00", '"',
                     "a,b", "x\ny", "x\ry", "\t", "9" * 5000, "٣", "253402300800", "99999999999999999999999"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.just("x" * (MAX_TEXT_CHARS + 1)),
)

byte_mutations = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**9)),
    st.tuples(st.just("insert"), st.integers(0, 10**9),
              st.sampled_from([b"\xff", b"\xc3", b"\xe9t\xe9", b"\x00", b"\r", b'"', b"\xef\xbb\xbf", b"\n\n", b",",
                               b"\t", b"{", b"\x1f\x8b"]) | st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 10**9), st.integers(1, 50)),
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.just(("empty",)),
)


def mutate_bytes(data: bytes, mutation: tuple | None) -> bytes:
    if mutation is None:
        return data
    kind, *args = mutation
    if kind == "empty":
        return b""
    pos = args[0] % (len(data) + 1)
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + args[1] + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + args[1]:]
    if not data:
        return data
    pos %= len(data)
    return data[:pos] + bytes([data[pos] ^ args[1]]) + data[pos + 1:]


def json_line(record: dict) -> str:
    parts = [f"{json.dumps(k)}: {v.text if isinstance(v, Raw) else json.dumps(v)}" for k, v in record.items()]
    return "{" + ", ".join(parts) + "}"


def record_mutations(fields_: list[str], num_records: int):
    """One structural mutation of a list of JSON records: (kind, record index, ...)."""
    index = st.integers(0, num_records - 1)
    field = st.sampled_from(fields_)
    extra_key = st.text(max_size=8).filter(lambda k: k not in fields_) | st.sampled_from(["email", "a\nb", "\ud800"])
    return st.one_of(
        st.tuples(st.just("set"), index, field, bad_json_values),
        st.tuples(st.just("delete"), index, field),
        st.tuples(st.just("extra"), index, extra_key, bad_json_values),
        st.tuples(st.just("line"), index, st.one_of(
            json_values.map(json.dumps), st.sampled_from(RAW_TOKENS), st.text(max_size=20),
            st.just(""), st.just("{}"))),
        st.tuples(st.just("duplicate"), index),
        st.tuples(st.just("unknown_item"), index),
    )


def apply_record_mutation(records: list[dict], mutation: tuple, item_field: str) -> tuple[list[str], int, str | None]:
    """The file's lines, and the 1-based line and field an error must name (field None: any or none)."""
    records = [dict(r) for r in records]
    kind, i, *args = mutation
    field = None
    lines: list[str | None] = [None] * len(records)
    if kind == "set":
        field = args[0]
        records[i][field] = args[1]
    elif kind == "delete":
        field = args[0]
        del records[i][field]
    elif kind == "extra":
        records[i][args[0]] = args[1]
        field = args[0]
    elif kind == "line":
        lines[i] = args[0].replace("\n", " ")
    elif kind == "duplicate":
        records.insert(i, dict(records[i]))
        lines.insert(i, None)
    elif kind == "unknown_item":
        records[i][item_field] = "not-in-catalog"
    return [json_line(r) if line is None else line for r, line in zip(records, lines)], i + 1, field


def one_line(message: str, path_text: str) -> None:
    assert "\n" not in message and "\r" not in message, message[:500]
    assert len(message) <= len(path_text) + MAX_MESSAGE, message[:500]


def check_merchant_error(err: MerchantDataError, allowed: set[Path], line: int | None = None,
                         field: str | None = None) -> None:
    """One line naming the file (and line, field), pointing at ``line``/``field`` when given."""
    msg = str(err)
    assert err.path in {str(p) for p in allowed}, (err.path, msg)
    assert msg.startswith(err.path), msg
    one_line(msg, err.path)
    if err.line is not None:
        assert err.line >= 1 and f" line {err.line}" in msg, msg
    if err.field is not None:
        assert repr(err.field)[:50] in msg, msg
    if line is not None:
        assert err.line == line, (line, msg)
    if field is not None:
        assert err.field in (field, None), (field, msg)


# --------------------------------------------------------------------------- merchant directories

REVIEW_FIELDS = ["user_id", "item_id", "rating", "text", "timestamp"]
REVIEWS = [
    {"user_id": "u1", "item_id": "A", "rating": 4, "text": "good", "timestamp": 1_600_000_000},
    {"user_id": "u2", "item_id": "B", "rating": 1, "text": "", "timestamp": 0},
    {"user_id": 7, "item_id": "C", "rating": 5, "text": "naïve\u2028café", "timestamp": "1600000001"},
    {"user_id": "u1", "item_id": "C", "rating": "3", "text": "x" * 50, "timestamp": 253_402_300_799},
]


@fuzz(400)
@given(mutation=record_mutations(REVIEW_FIELDS, len(REVIEWS)),
       garble=st.none() | byte_mutations, with_interactions=st.booleans())
@example(("set", 1, "timestamp", Raw("1" * 5000)), None, False)  # was: ValueError from json, no file or line
@example(("extra", 0, "a\nb", 1), None, False)  # was: the key's newline split the message
@example(("set", 2, "text", "x" * (MAX_TEXT_CHARS + 1)), None, True)
@example(("set", 0, "timestamp", "9" * 5000), None, False)
def test_fuzz_merchant_reviews_jsonl(mutation: tuple, garble: tuple | None, with_interactions: bool) -> None:
    lines, line, field = apply_record_mutation(REVIEWS, mutation, "item_id")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "shop"
        d.mkdir()
        path = d / "reviews.jsonl"
        path.write_bytes(mutate_bytes("".join(s + "\n" for s in lines).encode("utf-8"), garble))
        allowed = {path}
        if with_interactions:
            (d / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,A,5\n")
            allowed.add(d / "interactions.csv")
        try:
            data = load_merchant_dir(d, CATALOG)
        except MerchantDataError as err:
            exact = garble is None and mutation[0] not in ("duplicate", "unknown_item")
            check_merchant_error(err, allowed, line if exact else None, field if exact else None)
            event("refused")
            return
    assert garble is not None or mutation[0] != "delete"  # a missing field is always refused
    assert len(data.reviews) + data.dropped_unknown_items <= len(lines)


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def csv_mutations(header: list[str], num_rows: int):
    index = st.integers(0, num_rows - 1)
    column = st.integers(0, len(header) - 1)
    return st.one_of(
        st.tuples(st.just("cell"), index, column, bad_cells),
        st.tuples(st.just("cell"), index, column, st.sampled_from(["A", "B", "C", "u1", "ZZZ"])),  # duplicates
        st.tuples(st.just("add_cell"), index, bad_cells),
        st.tuples(st.just("drop_cell"), index, column),
        st.tuples(st.just("drop_column"), column),
        st.tuples(st.just("rename_column"), column, st.text(max_size=10) | st.sampled_from(
            ["", " ", "stars", "USER_ID", " item_id ", "item_id", "title", "a\nb", "x" * 300])),
        st.tuples(st.just("duplicate_row"), index),
        st.tuples(st.just("raw_line"), st.integers(0, num_rows), st.text(max_size=20) | st.sampled_from(
            ['u,"open,1', 'a"b,c', ",,,", "\x00", '""']),
        ),
    )


def apply_csv_mutation(header: list[str], rows: list[list[str]], mutation: tuple) -> tuple[str, int | None, str | None]:
    """The file's text, and the line/field an error must name (None: not predicted)."""
    header, rows = list(header), [list(r) for r in rows]
    kind, *args = mutation
    line = field = None
    if kind == "cell":
        i, col, value = args
        rows[i][col] = value
        field = header[col]
    elif kind == "add_cell":
        rows[args[0]].append(args[1])
    elif kind == "drop_cell":
        del rows[args[0]][args[1]]
    elif kind == "drop_column":
        del header[args[0]]
        for r in rows:
            del r[args[0]]
        line, field = 1, None
    elif kind == "rename_column":
        header[args[0]] = args[1]
        line = 1
    elif kind == "duplicate_row":
        rows.insert(args[0], list(rows[args[0]]))
    if kind in ("cell", "add_cell", "drop_cell"):
        before = csv_text(header, rows[: args[0]])
        line = len(re.findall(r"\r\n|\r|\n", before)) + 1  # the record's first physical line
    text = csv_text(header, rows)
    if kind == "raw_line":
        at, raw = args
        kept = text.split("\n")
        text = "\n".join(kept[: at + 1] + [raw.replace("\n", " ").replace("\r", " ")] + kept[at + 1:])
    return text, line, field


INTERACTIONS_HEADER = ["user_id", "item_id", "timestamp", "rating"]
INTERACTIONS = [["u1", "A", "1600000000", ""], ["u2", "B", "0", "4.5"], ["7", "C", "253402300799", "1"],
                ["u1", "C", " 12 ", "5"]]
REVIEWS_HEADER = ["text", "timestamp", "rating", "user_id", "item_id"]
REVIEWS_ROWS = [["fine, ok", "40", "4", "u1", "A"], ["two\nlines", "50", "2", "u2", "C"], ["", "0", "5", "u3", "B"]]


@fuzz(300)
@given(mutation=csv_mutations(INTERACTIONS_HEADER, len(INTERACTIONS)), garble=st.none() | byte_mutations)
@example(("cell", 1, 2, "9" * 5000), None)  # was: int()'s digit-limit message instead of the expected range
@example(("rename_column", 0, "a\nb"), None)
@example(("rename_column", 0, "x" * 300), None)
def test_fuzz_merchant_interactions_csv(mutation: tuple, garble: tuple | None) -> None:
    text, line, field = apply_csv_mutation(INTERACTIONS_HEADER, INTERACTIONS, mutation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shop" / "interactions.csv"
        path.parent.mkdir()
        path.write_bytes(mutate_bytes(text.encode("utf-8"), garble))
        try:
            data = load_merchant_dir(path.parent, CATALOG)
        except MerchantDataError as err:
            exact = garble is None
            check_merchant_error(err, {path}, line if exact else None, field if exact else None)
            event("refused")
            return
    assert data.interactions.timestamp.min(initial=0) >= 0


@fuzz(250)
@given(mutation=csv_mutations(REVIEWS_HEADER, len(REVIEWS_ROWS)), garble=st.none() | byte_mutations)
def test_fuzz_merchant_reviews_csv(mutation: tuple, garble: tuple | None) -> None:
    text, line, field = apply_csv_mutation(REVIEWS_HEADER, REVIEWS_ROWS, mutation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shop" / "reviews.csv"
        path.parent.mkdir()
        path.write_bytes(mutate_bytes(text.encode("utf-8"), garble))
        try:
            data = load_merchant_dir(path.parent, CATALOG)
        except MerchantDataError as err:
            exact = garble is None
            check_merchant_error(err, {path}, line if exact else None, field if exact else None)
            event("refused")
            return
    assert set(data.reviews.rating.tolist()) <= {1, 2, 3, 4, 5}


CATALOG_HEADER = ["item_id", "category", "title"]
CATALOG_ROWS = [["A", "toys", "Ball"], ["B", "toys", "Kite, red"], ["item,4", "", 'The "Book"']]


@fuzz(200)
@given(mutation=csv_mutations(CATALOG_HEADER, len(CATALOG_ROWS)), garble=st.none() | byte_mutations)
@example(("cell", 0, 0, "B"), None)  # duplicate id: reported on the later line
def test_fuzz_catalog(mutation: tuple, garble: tuple | None) -> None:
    text, line, field = apply_csv_mutation(CATALOG_HEADER, CATALOG_ROWS, mutation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.csv"
        path.write_bytes(mutate_bytes(text.encode("utf-8"), garble))
        try:
            catalog = load_catalog(path)
        except MerchantDataError as err:
            exact = garble is None and "duplicate item id" not in err.reason
            check_merchant_error(err, {path}, line if exact else None, field if exact else None)
            event("refused")
            return
    assert len(set(catalog.item_ids)) == catalog.num_items and all(i.strip() for i in catalog.item_ids)


# --------------------------------------------------------------------------- importers and converter

AMAZON_FIELDS = ["reviewerID", "asin", "overall", "reviewText", "unixReviewTime", "categories", "summary"]
AMAZON = [
    {"reviewerID": f"U{u}", "asin": f"B00{(u + j) % 3}", "overall": float(1 + (u + j) % 5),
     "reviewText": "" if (u, j) == (0, 1) else f"text {u} {j}", "unixReviewTime": 1_000_000 + 10 * u + j,
     "categories": [[f"Cat{(u + j) % 2}", "Sub"]], "summary": "short"}
    for u in range(3) for j in range(2)
]


def check_import_error(err: ValueError, path: Path, line: int | None, field: str | None) -> None:
    """``<file>: line N: field 'F': ...`` (or a whole-file problem), one line."""
    msg = str(err)
    assert msg.startswith(f"{path}: "), msg
    one_line(msg, str(path))
    if line is not None:
        assert msg.startswith(f"{path}: line {line}: "), (line, msg)
    if field is not None and "field" in msg:
        assert f"field {field!r}" in msg, (field, msg)


def amazon_bytes(mutation: tuple, compress: bool, garble: tuple | None) -> tuple[bytes, int, str | None]:
    lines, line, field = apply_record_mutation(AMAZON, mutation, "asin")
    data = "".join(s + "\n" for s in lines).encode("utf-8")
    return mutate_bytes(gzip.compress(data, mtime=0) if compress else data, garble), line, field


@fuzz(400)
@given(mutation=record_mutations(AMAZON_FIELDS, len(AMAZON)), compress=st.booleans(),
       garble=st.none() | byte_mutations)
@example(("duplicate", 0), True, ("delete", 3, 1))  # was: zlib.error escaped (corrupt gzip stream)
@example(("set", 0, "overall", 10**400), False, None)  # was: OverflowError from float()
@example(("set", 1, "overall", Raw("1" * 5000)), False, None)  # was: ValueError from json, no file or line
@example(("set", 0, "overall", "x" * 5000), False, None)  # was: the whole value in the message
def test_fuzz_amazon_importer(mutation: tuple, compress: bool, garble: tuple | None) -> None:
    raw, line, field = amazon_bytes(mutation, compress, garble)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reviews.json.gz"
        path.write_bytes(raw)
        try:
            catalog, table = read_amazon_reviews(path)
        except ValueError as err:
            exact = garble is None and mutation[0] not in ("duplicate", "unknown_item")
            check_import_error(err, path, line if exact else None, field if exact else None)
            event("refused")
            return
    assert catalog.num_items >= 1 and len(table) >= 1
    assert table.timestamp.min() >= 0 and set(table.rating.tolist()) <= {1, 2, 3, 4, 5}


UDATA = [["1", "11", "3", "881250949"], ["2", "12", "5", "881250950"], ["1", "12", "1", "0"], ["3", "7", "4", "12"]]


@fuzz(200)
@given(mutation=st.one_of(
    st.tuples(st.just("cell"), st.integers(0, 3), st.integers(0, 3), bad_cells),
    st.tuples(st.just("add_cell"), st.integers(0, 3), bad_cells),
    st.tuples(st.just("drop_cell"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("line"), st.integers(0, 3), st.text(max_size=20)),
), garble=st.none() | byte_mutations)
def test_fuzz_movielens_importer(mutation: tuple, garble: tuple | None) -> None:
    rows = [list(r) for r in UDATA]
    kind, i, *args = mutation
    names = ("user", "item", "rating", "timestamp")
    field = None
    if kind == "cell":
        rows[i][args[0]], field = args[1].replace("\n", " ").replace("\r", " "), names[args[0]]
    elif kind == "add_cell":
        rows[i].append(args[0].replace("\n", " ").replace("\r", " "))
    elif kind == "drop_cell":
        del rows[i][args[0]]
    lines = ["\t".join(r) for r in rows]
    if kind == "line":
        lines[i] = args[0].replace("\n", " ").replace("\r", " ")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u.data"
        path.write_bytes(mutate_bytes("".join(s + "\n" for s in lines).encode("utf-8"), garble))
        try:
            catalog, table = read_movielens(path)
        except ValueError as err:
            check_import_error(err, path, i + 1 if garble is None else None, field if garble is None else None)
            event("refused")
            return
    assert catalog.num_items >= 1 and table.timestamp.min() >= 0


def snapshot(root: Path) -> dict[str, bytes | None] | None:
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@fuzz(200)
@given(mutation=record_mutations(AMAZON_FIELDS, len(AMAZON)), compress=st.booleans(),
       garble=st.none() | byte_mutations, out_state=st.sampled_from(["absent", "absent", "empty", "occupied"]),
       reviews_format=st.sampled_from(["csv", "jsonl"]))
# were: catalog.csv and merchant-000/interactions.csv written, then UnicodeEncodeError (no file, line or field)
@example(("set", 0, "reviewText", Raw('"\\ud800"')), False, None, "absent", "csv")
@example(("set", 0, "asin", Raw('"x\\udc80"')), False, None, "empty", "jsonl")
@example(("set", 0, "categories", Raw('["\\ud800"]')), False, None, "absent", "csv")
# were: converted, but the output did not load back (CSV field limit, blank or colliding item ids)
@example(("set", 0, "reviewText", "x" * (MAX_TEXT_CHARS + 1)), True, None, "absent", "csv")
@example(("set", 0, "asin", "  "), False, None, "absent", "csv")
@example(("set", 0, "asin", " B001"), False, None, "absent", "jsonl")
@example(("set", 0, "reviewText", "a\x00b"), False, None, "occupied", "csv")
def test_fuzz_convert_refuses_without_half_written_output(mutation: tuple, compress: bool, garble: tuple | None,
                                                           out_state: str, reviews_format: str) -> None:
    raw, line, field = amazon_bytes(mutation, compress, garble)
    sources._partitioned.cache_clear()  # the same path holds new content in every example
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "reviews.json.gz", Path(tmp) / "out"
        path.write_bytes(raw)
        if out_state != "absent":
            out.mkdir()
        if out_state == "occupied":
            (out / "notes.txt").write_text("keep me")
        before = snapshot(out)
        cfg = ImportedDataConfig(source="amazon", path=str(path), num_merchants=1)
        try:
            summaries = convert_to_merchant_dirs(cfg, 0, out, reviews_format=reviews_format)
        except ValueError as err:
            after = snapshot(out)
            assert after == before or (before is None and after == {}), (before, after)
            if out_state == "occupied":
                assert str(out) in str(err) and "not empty" in str(err)
            else:
                exact = garble is None and mutation[0] not in ("duplicate", "unknown_item")
                check_import_error(err, path, line if exact else None, field if exact else None)
            event("refused")
            return
        finally:
            sources._partitioned.cache_clear()
        assert out_state != "occupied"
        # what was written loads back as merchant directories
        catalog = load_catalog(out / "catalog.csv")
        for summary in summaries:
            data = load_merchant_dir(out / summary["merchant_id"], catalog)
            assert len(data.interactions) == summary["interactions"] and len(data.reviews) == summary["reviews"]
            assert data.dropped_unknown_items == 0


# --------------------------------------------------------------------------- configuration

BASE_OVERRIDES = {
    "simulate": [], "server": [], "audit": [], "certs": [],
    "evaluate": [f"data.path={__file__}"],
    "merchant": ["data_dir=shop"],
    "import": [f"data.path={__file__}", "out_dir=out"],
}


@cache
def base_config(command: str) -> Any:
    return compose(command, BASE_OVERRIDES[command])


@cache
def known_keys(command: str) -> tuple[str, ...]:
    return tuple(key for key, _ in config_keys(base_config(command)))


def no_nan(node: Any, key: str = "") -> None:
    """An accepted configuration holds no NaN anywhere (every range check is false for NaN)."""
    if is_dataclass(node):
        for f in fields(node):
            no_nan(getattr(node, f.name), f"{key}{f.name}.")
    elif isinstance(node, (list, tuple)):
        for value in node:
            no_nan(value, key)
    elif isinstance(node, dict):
        for name, value in node.items():
            no_nan(value, f"{key}{name}.")
    else:
        assert not (isinstance(node, float) and math.isnan(node)), f"{key.rstrip('.')} accepted NaN"


OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["", "abc", "nan", "-nan", "inf", "-inf", "-1", "0", "1e400", "-1e400", "99999999999999999999999",
                     "1.5", "0.5", "[1,2]", "[]", "{a: 1}", "null", "true", "false", "'", '"', "'quoted'", "${nope}",
                     "${oc.env:HOME}", "${privacy.epsilon}", "???", "[nan]", "[-1]", "x,y", "a=b", "1_000", "٣"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)


@fuzz(100)
@given(command=st.sampled_from(sorted(BASE_OVERRIDES)), data=st.data())
def test_fuzz_compose_overrides(command: str, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["value", "value", "value", "unknown", "group", "raw", "delete"]))
    key = None
    if kind == "value":
        key = data.draw(st.sampled_from(known_keys(command)))
        override = f"{key}={data.draw(OVERRIDE_VALUES)}"
    elif kind == "unknown":
        prefix = data.draw(st.sampled_from(["", "+", "++"]))
        name = data.draw(st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True))
        override = f"{prefix}{name}={data.draw(OVERRIDE_VALUES)}"
    elif kind == "group":
        group = data.draw(st.sampled_from(["task", "privacy", "strategy", "federation", "data"]))
        override = f"{group}={data.draw(st.text(max_size=10) | st.sampled_from(['review', 'none', 'dp', '']))}"
    elif kind == "delete":
        override = f"~{data.draw(st.sampled_from(known_keys(command)))}"
    else:
        override = data.draw(st.text(max_size=20))
    try:
        cfg = compose(command, [*BASE_OVERRIDES[command], override])
    except ConfigError as err:
        msg = str(err)
        assert msg and "\n" not in msg, msg
        assert "Traceback" not in msg, msg
        if key is not None and "\n" not in override:
            assert key.split(".")[-1] in msg or override in msg, (override, msg)
        event("refused")
        return
    no_nan(cfg)


def leaf_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in leaf_paths(v, (*prefix, k))] + ([prefix] if prefix else [])
    return [prefix]


BAD_PY_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["", "abc", "5", "nan", "auto", "cpu", "cuda:x", "local", "???"]),
    st.sampled_from([10**400, -(10**400), float("nan"), [float("nan")], [], [-1], {}]),
    json_values, st.lists(st.floats(allow_nan=True), max_size=3), st.just({"name": "magic"}),
)
DISCRIMINATORS = {("task", "name"), ("strategy", "name"), ("data", "source")}


@fuzz(300)
@given(command=st.sampled_from(["simulate", "server", "evaluate", "audit", "merchant", "import"]), data=st.data())
def test_fuzz_config_from_dict(command: str, data: st.DataObject) -> None:
    """A hand-edited config file (the run dir's config.yaml): from_dict re-validates, with ValueError."""
    plain = copy.deepcopy(to_dict(base_config(command)))
    path = data.draw(st.sampled_from(leaf_paths(plain)))
    kind = data.draw(st.sampled_from(["set", "set", "set", "delete", "extra"]))
    node = plain
    for k in path[:-1]:
        node = node[k]
    if kind == "set":
        node[path[-1]] = data.draw(BAD_PY_VALUES)
    elif kind == "delete":
        del node[path[-1]]
    else:
        target = node[path[-1]] if isinstance(node[path[-1]], dict) else node
        target[data.draw(st.text(min_size=1, max_size=8))] = data.draw(BAD_PY_VALUES)
    try:
        cfg = from_dict(ROOT_CONFIGS[command], plain)
    except ValueError as err:  # ConfigError for values; ValueError for unknown keys and group options
        msg = str(err)
        assert msg and "\n" not in msg, msg
        if kind == "set":
            assert str(path[-1]).lower() in msg.lower() or str(path[0]).lower() in msg.lower(), (path, msg)
        event("refused")
        return
    no_nan(cfg)


def test_from_dict_unhashable_option_name_is_a_value_error() -> None:
    plain = to_dict(base_config("simulate"))
    plain["task"]["name"] = ["recommender"]
    with pytest.raises(ValueError, match="task.name"):
        from_dict(ROOT_CONFIGS["simulate"], plain)
