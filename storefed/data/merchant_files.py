"""Read, validate and write a merchant's data directory (schema version 1).

Layout::

    catalog.csv        item_id[,category][,title]           (published by the coordinator)
    <merchant dir>/
        interactions.csv   user_id,item_id,timestamp[,rating]
        reviews.csv        user_id,item_id,rating,text,timestamp
     or reviews.jsonl      one JSON object per line with those five keys

CSV columns are matched by header name, so their order may vary. Files are UTF-8 (a BOM is
accepted). Items missing from the catalog are dropped and counted, not rejected. Every problem
is reported as a :class:`MerchantDataError` naming the file, the 1-based line (the header is
line 1) and the field, and saying what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from storefed.atomic_files import atomic_write_text
from storefed.data.schema import (
    Catalog,
    Interactions,
    MerchantData,
    Reviews,
    empty_interactions,
    empty_reviews,
)

SCHEMA_VERSION = 1

CATALOG_FILE = "catalog.csv"
INTERACTIONS_FILE = "interactions.csv"
REVIEWS_CSV_FILE = "reviews.csv"
REVIEWS_JSONL_FILE = "reviews.jsonl"

_CATALOG_REQUIRED = ("item_id",)
_CATALOG_OPTIONAL = ("category", "title")
_INTERACTIONS_REQUIRED = ("user_id", "item_id", "timestamp")
_INTERACTIONS_OPTIONAL = ("rating",)
_REVIEWS_REQUIRED = ("user_id", "item_id", "rating", "text", "timestamp")

_EXPECTED_FILES = (
    f"expected a directory containing {INTERACTIONS_FILE} and/or one of "
    f"{REVIEWS_CSV_FILE} or {REVIEWS_JSONL_FILE}"
)
_DIGITS = re.compile(r"[0-9]+")
MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z: larger "unix seconds" are a unit mistake (ms, us)
MAX_TEXT_CHARS = csv.field_size_limit()  # the CSV reader's own field limit (131,072), for JSONL too


class MerchantDataError(ValueError):
    """A merchant data file is missing or malformed.

    ``path`` is the offending file or directory, ``line`` the 1-based line (header = 1) or
    None, ``field`` the column / JSON key or None, ``reason`` the bare explanation.
    """

    def __init__(
        self, path: str | Path, reason: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path
        if line is not None:
            where += f" line {line}"
        if field is not None:
            where += f", field {_show(field)}"  # repr, shortened: any key stays one short line
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    """Return the file decoded as UTF-8 (BOM stripped); errors name the file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MerchantDataError(path, "file not found") from None
    except OSError as e:
        raise MerchantDataError(path, f"cannot read file ({e.strerror or e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start : e.start + 1].hex()
        raise MerchantDataError(
            path, f"not valid UTF-8 (byte 0x{bad}); save the file as UTF-8", line=line
        ) from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _csv_records(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Check the header, then yield ``(line, {column: value})`` for each non-blank record."""
    text = _read_text(path)
    allowed = required + optional
    shape = ",".join(required) + "".join(f"[,{c}]" for c in optional)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def next_row() -> tuple[int, list[str]] | None:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return None
            except csv.Error as e:
                raise MerchantDataError(path, f"malformed CSV ({e})", line=start) from None
            if row and not (len(row) == 1 and not row[0].strip()):
                return start, row

    first = next_row()
    if first is None:
        raise MerchantDataError(path, f"file is empty; expected header '{shape}'", line=1)
    header_line, raw_header = first
    header = [h.strip().lower() for h in raw_header]
    for col, name in enumerate(header, start=1):
        if not name:
            raise MerchantDataError(
                path,
                f"empty column name in column {col} (stray comma?); expected header '{shape}'",
                line=header_line,
            )
        if name not in allowed:
            raise MerchantDataError(
                path, f"unknown column; expected header '{shape}'", line=header_line, field=name
            )
        if header.count(name) > 1:
            raise MerchantDataError(path, "duplicate column", line=header_line, field=name)
    for name in required:
        if name not in header:
            raise MerchantDataError(
                path, f"missing required column; expected header '{shape}'",
                line=header_line, field=name,
            )

    def records() -> Iterator[tuple[int, dict[str, str]]]:
        while (item := next_row()) is not None:
            line, row = item
            if len(row) != len(header):
                raise MerchantDataError(
                    path,
                    f"expected {len(header)} fields ({','.join(header)}), got {len(row)}",
                    line=line,
                )
            yield line, dict(zip(header, row))

    return header, records()


def _jsonl_records(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, object)`` for each non-blank line, checking keys exactly."""
    text = _read_text(path)
    # Split on "\n" only: str.splitlines would also split inside strings at U+2028 etc.
    for line, chunk in enumerate(text.split("\n"), start=1):
        if not chunk.strip():
            continue
        try:
            obj = json.loads(chunk)
        except json.JSONDecodeError as e:
            raise MerchantDataError(
                path, f"not valid JSON ({e.msg} at column {e.colno})", line=line
            ) from None
        except RecursionError:
            raise MerchantDataError(path, "JSON nested too deeply; expected one flat object per line",
                                    line=line) from None
        except ValueError:  # an integer literal beyond Python's int_max_str_digits (4300)
            raise MerchantDataError(path, "not valid JSON (a number with too many digits)", line=line) from None
        if not isinstance(obj, dict):
            raise MerchantDataError(
                path, f"expected a JSON object with keys {', '.join(required)}", line=line
            )
        for key in obj:
            if key not in required:
                raise MerchantDataError(
                    path, f"unknown field; expected only {', '.join(required)}",
                    line=line, field=str(key),
                )
        for key in required:
            if key not in obj:
                raise MerchantDataError(path, "missing required field", line=line, field=key)
        yield line, obj


# --------------------------------------------------------------------------- field parsers
# Each parser takes the raw value (a str from CSV, any JSON value from JSONL) and returns the
# parsed value or raises ValueError carrying the "expected ..." text.


def _parse_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"expected a non-empty id string, got {_show(value)}")


def _parse_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()) and len(value.strip()) <= 4000:
        return int(value.strip())  # (longer: far out of range, and int() refuses over 4300 digits)
    raise TypeError


def _parse_timestamp(value: Any) -> int:
    try:
        ts = _parse_int(value)
    except TypeError:
        ts = -1
    if not 0 <= ts <= MAX_TIMESTAMP:
        raise ValueError(f"expected an integer unix time in seconds (0 to {MAX_TIMESTAMP}, year 9999; "
                         f"milliseconds are too large), got {_show(value)}")
    return ts


def _parse_review_rating(value: Any) -> int:
    try:
        rating = _parse_int(value)
    except TypeError:
        rating = 0
    if not 1 <= rating <= 5:
        raise ValueError(f"expected an integer rating from 1 to 5, got {_show(value)}")
    return rating


def _parse_interaction_rating(value: Any) -> float:
    """Empty means "no rating" and is stored as 0."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0.0
    try:
        rating = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        rating = 0.0
    if isinstance(value, bool) or not 1.0 <= rating <= 5.0:
        raise ValueError(f"expected empty or a number from 1 to 5, got {_show(value)}")
    return rating


def _parse_text(value: Any) -> str:
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"expected at most {MAX_TEXT_CHARS} characters (as in CSV), got {len(value)}: shorten "
                         "the review (the review model reads its first 256 tokens)")
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string (may be empty), got {_show(value)}")


def _field(
    path: Path, line: int, rec: dict[str, Any], name: str, parse: Callable[[Any], Any]
) -> Any:
    """Parse ``rec[name]``, turning a parser's ValueError into a located MerchantDataError."""
    try:
        return parse(rec[name])
    except ValueError as e:
        raise MerchantDataError(path, str(e), line=line, field=name) from None


# --------------------------------------------------------------------------- loaders


def load_catalog(path: str | Path) -> Catalog:
    """Load ``catalog.csv`` (``item_id`` required, ``category``/``title`` optional)."""
    path = Path(path)
    header, records = _csv_records(path, _CATALOG_REQUIRED, _CATALOG_OPTIONAL)
    ids: list[str] = []
    categories: list[str] = []
    titles: list[str] = []
    first_line: dict[str, int] = {}
    for line, rec in records:
        item = _field(path, line, rec, "item_id", _parse_id)
        if item in first_line:
            raise MerchantDataError(
                path, f"duplicate item id {item!r} (first seen on line {first_line[item]})",
                line=line, field="item_id",
            )
        first_line[item] = line
        ids.append(item)
        categories.append(rec.get("category", "").strip())
        titles.append(rec.get("title", ""))
    return Catalog(
        item_ids=tuple(ids),
        categories=tuple(categories),
        titles=tuple(titles) if "title" in header else (),
    )


def _natural_key(s: str) -> tuple[tuple[Any, ...], str]:
    """Sort "u2" before "u10" so ids written as ``u{index}`` load back to the same index."""
    parts = re.split(r"(\d+)", s)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), s


def load_merchant_dir(
    directory: str | Path, catalog: Catalog, merchant_id: str | None = None
) -> MerchantData:
    """Load and validate one merchant directory against ``catalog``.

    Rows whose item is not in the catalog are dropped (after validation) and counted in
    ``dropped_unknown_items``. User ids from both files share one mapping to ``0..n-1``,
    in natural sort order of the ids that have at least one kept row.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MerchantDataError(directory, f"merchant directory not found; {_EXPECTED_FILES}")
    inter_path = directory / INTERACTIONS_FILE
    rev_csv, rev_jsonl = directory / REVIEWS_CSV_FILE, directory / REVIEWS_JSONL_FILE
    if rev_csv.exists() and rev_jsonl.exists():
        raise MerchantDataError(
            directory, f"both {REVIEWS_CSV_FILE} and {REVIEWS_JSONL_FILE} present; keep only one"
        )
    rev_path = rev_csv if rev_csv.exists() else rev_jsonl if rev_jsonl.exists() else None
    if not inter_path.exists() and rev_path is None:
        raise MerchantDataError(directory, f"no merchant data files; {_EXPECTED_FILES}")

    dropped = 0
    inter_rows: list[tuple[str, int, int, float]] = []
    has_rating = False
    if inter_path.exists():
        header, records = _csv_records(inter_path, _INTERACTIONS_REQUIRED, _INTERACTIONS_OPTIONAL)
        has_rating = "rating" in header
        for line, rec in records:
            user = _field(inter_path, line, rec, "user_id", _parse_id)
            item = _field(inter_path, line, rec, "item_id", _parse_id)
            ts = _field(inter_path, line, rec, "timestamp", _parse_timestamp)
            rating = 0.0
            if has_rating:
                rating = _field(inter_path, line, rec, "rating", _parse_interaction_rating)
            idx = catalog.index.get(item)
            if idx is None:
                dropped += 1
            else:
                inter_rows.append((user, idx, ts, rating))

    rev_rows: list[tuple[str, int, int, str, int]] = []
    if rev_path is not None:
        if rev_path.suffix == ".csv":
            records = _csv_records(rev_path, _REVIEWS_REQUIRED)[1]
        else:
            records = _jsonl_records(rev_path, _REVIEWS_REQUIRED)
        for line, rec in records:
            user = _field(rev_path, line, rec, "user_id", _parse_id)
            item = _field(rev_path, line, rec, "item_id", _parse_id)
            rating_i = _field(rev_path, line, rec, "rating", _parse_review_rating)
            text = _field(rev_path, line, rec, "text", _parse_text)
            ts = _field(rev_path, line, rec, "timestamp", _parse_timestamp)
            idx = catalog.index.get(item)
            if idx is None:
                dropped += 1
            else:
                rev_rows.append((user, idx, rating_i, text, ts))

    users = sorted({r[0] for r in inter_rows} | {r[0] for r in rev_rows}, key=_natural_key)
    uidx = {u: n for n, u in enumerate(users)}

    def ints(values: list[int]) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).reshape(-1)

    interactions = empty_interactions()
    if inter_rows or has_rating:
        interactions = Interactions(
            user=ints([uidx[r[0]] for r in inter_rows]),
            item=ints([r[1] for r in inter_rows]),
            timestamp=ints([r[2] for r in inter_rows]),
            rating=np.asarray([r[3] for r in inter_rows], dtype=np.float32) if has_rating else None,
        )
    reviews = empty_reviews()
    if rev_rows:
        reviews = Reviews(
            user=ints([uidx[r[0]] for r in rev_rows]),
            item=ints([r[1] for r in rev_rows]),
            rating=ints([r[2] for r in rev_rows]),
            text=[r[3] for r in rev_rows],
            timestamp=ints([r[4] for r in rev_rows]),
        )
    if merchant_id is None:
        merchant_id = Path(os.path.abspath(directory)).name
    return MerchantData(
        merchant_id=merchant_id,
        num_users=len(users),
        interactions=interactions,
        reviews=reviews,
        dropped_unknown_items=dropped,
    )


# --------------------------------------------------------------------------- writers


def _csv_text(header: list[str], rows: Iterator[list[Any]] | list[list[Any]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_catalog(catalog: Catalog, path: str | Path) -> None:
    """Write ``catalog`` as ``catalog.csv`` (title column only if the catalog has titles)."""
    path = Path(path)
    if catalog.titles:
        if len(catalog.titles) != catalog.num_items:
            raise ValueError("Catalog: titles must have one entry per item")
        header = ["item_id", "category", "title"]
        rows = [list(r) for r in zip(catalog.item_ids, catalog.categories, catalog.titles)]
    else:
        header = ["item_id", "category"]
        rows = [list(r) for r in zip(catalog.item_ids, catalog.categories)]
    atomic_write_text(path, _csv_text(header, rows))


def _check_indices(
    name: str, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> None:
    if users.shape != items.shape:
        raise ValueError(f"{name}: user and item arrays differ in length")
    if users.size and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"{name}: user index outside 0..{num_users - 1}")
    if items.size and (items.min() < 0 or items.max() >= num_items):
        raise ValueError(f"{name}: item index outside the catalog (0..{num_items - 1})")


def write_merchant_dir(
    data: MerchantData, catalog: Catalog, directory: str | Path, reviews_format: str = "csv"
) -> None:
    """Write ``data`` as a merchant directory that :func:`load_merchant_dir` reads back equal.

    User ``i`` is written as ``u{i}``; items by their catalog id. ``reviews_format`` is
    ``"csv"`` or ``"jsonl"``; a reviews file of the other format already in ``directory``
    is removed so the directory stays loadable. Users with no rows at all cannot be
    represented, so the round trip is exact when every user has at least one row.
    """
    if reviews_format not in ("csv", "jsonl"):
        raise ValueError(f"reviews_format must be 'csv' or 'jsonl', got {reviews_format!r}")
    directory = Path(directory)
    inter, rev = data.interactions, data.reviews
    _check_indices("interactions", inter.user, inter.item, data.num_users, catalog.num_items)
    _check_indices("reviews", rev.user, rev.item, data.num_users, catalog.num_items)
    if len(rev.text) != len(rev) or rev.rating.shape != rev.user.shape:
        raise ValueError("reviews: rating/text arrays differ in length from user array")
    if inter.rating is not None and inter.rating.shape != inter.user.shape:
        raise ValueError("interactions: rating array differs in length from user array")
    directory.mkdir(parents=True, exist_ok=True)
    ids = catalog.item_ids

    header = list(_INTERACTIONS_REQUIRED) + (["rating"] if inter.rating is not None else [])
    rows = []
    for n in range(len(inter)):
        row: list[Any] = [
            f"u{int(inter.user[n])}", ids[int(inter.item[n])], int(inter.timestamp[n])
        ]
        if inter.rating is not None:
            r = float(inter.rating[n])
            row.append(repr(r) if r != 0 else "")
        rows.append(row)
    atomic_write_text(directory / INTERACTIONS_FILE, _csv_text(header, rows))

    review_rows = [
        [f"u{int(u)}", ids[int(i)], int(r), t, int(ts)]
        for u, i, r, t, ts in zip(rev.user, rev.item, rev.rating, rev.text, rev.timestamp)
    ]
    if reviews_format == "csv":
        target, other = directory / REVIEWS_CSV_FILE, directory / REVIEWS_JSONL_FILE
        text = _csv_text(list(_REVIEWS_REQUIRED), review_rows)
    else:
        target, other = directory / REVIEWS_JSONL_FILE, directory / REVIEWS_CSV_FILE
        text = "".join(
            json.dumps(dict(zip(_REVIEWS_REQUIRED, row)), ensure_ascii=False) + "\n"
            for row in review_rows
        )
    atomic_write_text(target, text)
    if other.exists():
        other.unlink()


def summarize(data: MerchantData) -> dict[str, Any]:
    """Counts describing ``data`` (safe to log: no ids or text)."""
    return {
        "merchant_id": data.merchant_id,
        "users": int(data.num_users),
        "interactions": len(data.interactions),
        "reviews": len(data.reviews),
        "dropped_unknown_items": int(data.dropped_unknown_items),
    }
