"""Importers from public review/rating formats into StoreFed's in-memory form.

``read_amazon_reviews`` and ``read_movielens`` return the shared :class:`Catalog` plus a
:class:`RawTable` of every event with *global* user indices; ``split_into_merchants`` then
deals the customers to simulated merchants and builds one :class:`MerchantData` each.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storefed.data.merchant_files import MAX_TEXT_CHARS, MAX_TIMESTAMP, _show
from storefed.data.partition import partition_users
from storefed.data.schema import Catalog, Interactions, MerchantData, Reviews, empty_reviews

GZIP_MAGIC = b"\x1f\x8b"
LABELS = ("category", "item")
UNKNOWN_CATEGORY = "unknown"


@dataclass
class RawTable:
    """All events of a data set before it is split among merchants (one row per event)."""

    user_key: np.ndarray  # int64, global user index into user_ids
    item: np.ndarray  # int64, catalog index
    rating: np.ndarray  # int64 in 1..5
    timestamp: np.ndarray  # int64, unix seconds
    text: list[str]  # review text, "" when none
    user_ids: list[str]  # global user index -> external user id

    def __len__(self) -> int:
        return int(self.user_key.shape[0])

    @property
    def num_users(self) -> int:
        return len(self.user_ids)


# ---------------------------------------------------------------- reading


def _bad(path: Path, lineno: int, field: str, problem: str) -> ValueError:
    return ValueError(f"{path}: line {lineno}: field {field!r}: {problem}")


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line) of a plain or gzip file (detected by magic bytes)."""
    path = Path(path)
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == GZIP_MAGIC
    opener = gzip.open if is_gzip else open
    lineno = 0
    with opener(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: line {lineno}: not valid UTF-8 ({e})") from None
        except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt compressed data
            raise ValueError(f"{path}: unreadable after line {lineno}: {e}") from None


def _rating(value: object, path: Path, lineno: int, field: str) -> int:
    """An integral rating 1..5 (ints, integral floats and their string forms are accepted)."""
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float
            pass
    if number is None or not number.is_integer() or not 1 <= number <= 5:
        raise _bad(path, lineno, field, f"expected an integer rating 1..5, got {_show(value)}")
    return int(number)


def _integer(value: object, path: Path, lineno: int, field: str) -> int:
    """An integer (ints, integral floats and integer strings are accepted)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise _bad(path, lineno, field, f"expected an integer, got {_show(value)}")


def _timestamp(value: object, path: Path, lineno: int, field: str) -> int:
    """Unix seconds that a merchant directory accepts (0 to year 9999), so imports always load back."""
    stamp = _integer(value, path, lineno, field)
    if not 0 <= stamp <= MAX_TIMESTAMP:
        raise _bad(path, lineno, field, f"expected unix seconds from 0 to {MAX_TIMESTAMP}, got {stamp}")
    return stamp


def _string(record: dict, key: str, path: Path, lineno: int, required: bool = True) -> str:
    """A string field; a required one is an id, stripped and non-empty as a merchant directory reads it."""
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        problem = "missing" if value is None else f"expected a non-empty string, got {_show(value)}"
        raise _bad(path, lineno, key, problem)
    _writable(value, path, lineno, key)
    return value.strip() if required else value


def _writable(value: str, path: Path, lineno: int, field: str) -> None:
    """Refuse a string a merchant directory could not hold: not UTF-8-encodable, or over the CSV field limit."""
    if len(value) > MAX_TEXT_CHARS:
        raise _bad(path, lineno, field, f"expected at most {MAX_TEXT_CHARS} characters (as a merchant directory "
                   f"reads them), got {len(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(path, lineno, field, "not valid Unicode (an unpaired surrogate escape such as \\ud800)") from None


def _category(record: dict) -> str | None:
    """First entry of a ``category``/``categories`` field (nested lists: first leaf), else None."""
    value = record.get("category", record.get("categories"))
    while isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) and value else None


def _table(
    users: list[str],
    items: list[str],
    ratings: list[int],
    stamps: list[int],
    texts: list[str],
    user_order: list[str],
    catalog: Catalog,
) -> RawTable:
    """Assemble a RawTable from parsed columns (external ids mapped to indices)."""
    user_index = {u: n for n, u in enumerate(user_order)}
    return RawTable(
        user_key=np.fromiter((user_index[u] for u in users), np.int64, count=len(users)),
        item=np.fromiter((catalog.index[i] for i in items), np.int64, count=len(items)),
        rating=np.asarray(ratings, dtype=np.int64),
        timestamp=np.asarray(stamps, dtype=np.int64),
        text=texts,
        user_ids=user_order,
    )


def read_amazon_reviews(path: str | Path) -> tuple[Catalog, RawTable]:
    """Read Amazon review JSON lines (plain or gzip).

    Required fields: reviewerID, asin, overall (1..5), unixReviewTime; reviewText may be
    missing or empty (the event is then an interaction without a review). The catalog is the
    sorted unique asins; an item's category is the first entry of a ``category``/``categories``
    field when a line of that item has one, else the asin itself. Bad lines raise ValueError
    naming file, line and field.
    """
    path = Path(path)
    users: list[str] = []
    items: list[str] = []
    ratings: list[int] = []
    stamps: list[int] = []
    texts: list[str] = []
    categories: dict[str, str] = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {lineno}: invalid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"{path}: line {lineno}: JSON nested too deeply (expected one flat review object)") from None
        except ValueError:  # an integer literal beyond Python's int_max_str_digits (4300)
            raise ValueError(f"{path}: line {lineno}: invalid JSON (a number with too many digits)") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {lineno}: expected a JSON object")
        users.append(_string(record, "reviewerID", path, lineno))
        asin = _string(record, "asin", path, lineno)
        items.append(asin)
        ratings.append(_rating(record.get("overall"), path, lineno, "overall"))
        if "unixReviewTime" not in record:
            raise _bad(path, lineno, "unixReviewTime", "missing")
        stamps.append(_timestamp(record["unixReviewTime"], path, lineno, "unixReviewTime"))
        texts.append(_string(record, "reviewText", path, lineno, required=False))
        category = _category(record)
        if category is not None:
            _writable(category, path, lineno, "category" if "category" in record else "categories")
            categories.setdefault(asin, category)
    if not users:
        raise ValueError(f"{path}: no reviews found")
    item_ids = tuple(sorted(set(items)))
    catalog = Catalog(item_ids=item_ids, categories=tuple(categories.get(i, i) for i in item_ids))
    return catalog, _table(users, items, ratings, stamps, texts, sorted(set(users)), catalog)


def read_movielens(path: str | Path) -> tuple[Catalog, RawTable]:
    """Read a MovieLens ``u.data`` file: tab-separated user, item, rating, timestamp; no header.

    Ids must be integers; catalog and user ids are sorted numerically; every category is
    ``'unknown'`` and every text empty. Bad lines raise ValueError naming file, line and field.
    """
    path = Path(path)
    fields = ("user", "item", "rating", "timestamp")
    users: list[int] = []
    items: list[int] = []
    ratings: list[int] = []
    stamps: list[int] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 4:
            raise ValueError(
                f"{path}: line {lineno}: expected 4 tab-separated fields "
                f"({', '.join(fields)}), got {len(parts)}"
            )
        users.append(_integer(parts[0].strip(), path, lineno, "user"))
        items.append(_integer(parts[1].strip(), path, lineno, "item"))
        ratings.append(_rating(parts[2].strip(), path, lineno, "rating"))
        stamps.append(_timestamp(parts[3].strip(), path, lineno, "timestamp"))
    if not users:
        raise ValueError(f"{path}: no ratings found")
    item_ids = tuple(str(i) for i in sorted(set(items)))
    catalog = Catalog(item_ids=item_ids, categories=(UNKNOWN_CATEGORY,) * len(item_ids))
    user_order = [str(u) for u in sorted(set(users))]
    texts = [""] * len(users)
    user_strs = [str(u) for u in users]
    item_strs = [str(i) for i in items]
    return catalog, _table(user_strs, item_strs, ratings, stamps, texts, user_order, catalog)


# ---------------------------------------------------------------- splitting


def user_labels(catalog: Catalog, table: RawTable, label: str = "category") -> np.ndarray:
    """Each user's most frequent item category (``label='category'``) or item (``'item'``).

    Ties go to the smallest category code / catalog index. Returns int64 codes, one per user.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; valid labels: {', '.join(LABELS)}")
    if label == "item":
        codes = table.item
    else:
        _, item_codes = np.unique(np.asarray(catalog.categories), return_inverse=True)
        codes = item_codes.reshape(-1).astype(np.int64)[table.item]
    pairs, counts = np.unique(np.stack([table.user_key, codes]), axis=1, return_counts=True)
    order = np.lexsort((pairs[1], -counts, pairs[0]))  # by user, most frequent, smallest code
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = pairs[0, order[1:]] != pairs[0, order[:-1]]
    labels = np.full(table.num_users, -1, dtype=np.int64)
    labels[pairs[0, order[first]]] = pairs[1, order[first]]
    return labels


def split_into_merchants(
    catalog: Catalog,
    table: RawTable,
    num_merchants: int,
    scheme: str = "iid",
    alpha: float = 0.3,
    label: str = "category",
    seed: int = 0,
    min_users: int = 1,
) -> list[MerchantData]:
    """Deal the customers of ``table`` to ``num_merchants`` merchants with :func:`partition_users`.

    Each customer goes, with all their events, to exactly one merchant. Merchant ``k`` is
    ``merchant-{k:03d}`` with local user indices ``0..n-1`` (in global-index order); its
    interactions are all its events (rating as float32), its reviews the events with text.
    """
    _check_table(catalog, table)
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; valid labels: {', '.join(LABELS)}")
    labels = user_labels(catalog, table, label) if scheme == "dirichlet" else None
    parts = partition_users(
        np.arange(table.num_users), num_merchants, scheme, alpha, labels, seed, min_users
    )
    owner = np.empty(table.num_users, dtype=np.int64)
    local = np.empty(table.num_users, dtype=np.int64)
    for k, members in enumerate(parts):
        owner[members] = k
        local[members] = np.arange(members.shape[0])
    event_owner = owner[table.user_key]
    by_merchant = np.argsort(event_owner, kind="stable")  # keeps file order within a merchant
    bounds = np.cumsum(np.bincount(event_owner, minlength=num_merchants))[:-1]
    has_text = np.fromiter((bool(t.strip()) for t in table.text), bool, count=len(table))
    return [
        _merchant(k, parts[k].shape[0], rows, table, local, has_text)
        for k, rows in enumerate(np.split(by_merchant, bounds))
    ]


def _check_table(catalog: Catalog, table: RawTable) -> None:
    """Raise ValueError when the table's columns disagree with each other or the catalog."""
    n = len(table)
    lengths = {len(c) for c in (table.item, table.rating, table.timestamp, table.text)}
    if lengths != {n}:
        raise ValueError("RawTable: columns must all have one entry per event")
    if n and (table.item.min() < 0 or table.item.max() >= catalog.num_items):
        raise ValueError("RawTable: item index outside the catalog")
    if n and (table.user_key.min() < 0 or table.user_key.max() >= table.num_users):
        raise ValueError("RawTable: user_key outside user_ids")


def _merchant(
    k: int,
    num_users: int,
    rows: np.ndarray,
    table: RawTable,
    local: np.ndarray,
    has_text: np.ndarray,
) -> MerchantData:
    """Build merchant ``k`` from its event rows (indices into ``table``)."""
    users = local[table.user_key[rows]]
    interactions = Interactions(
        user=users,
        item=table.item[rows],
        timestamp=table.timestamp[rows],
        rating=table.rating[rows].astype(np.float32),
    )
    with_text = rows[has_text[rows]]
    if with_text.shape[0] == 0:
        reviews = empty_reviews()
    else:
        reviews = Reviews(
            user=local[table.user_key[with_text]],
            item=table.item[with_text],
            rating=table.rating[with_text].astype(np.int64),
            text=[table.text[i] for i in with_text],
            timestamp=table.timestamp[with_text],
        )
    return MerchantData(
        merchant_id=f"merchant-{k:03d}",
        num_users=num_users,
        interactions=interactions,
        reviews=reviews,
    )
