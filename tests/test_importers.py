"""Tests for the public-format importers and the customer partitioner."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from storefed.data.importers import (
    RawTable,
    read_amazon_reviews,
    read_movielens,
    split_into_merchants,
    user_labels,
)
from storefed.data.partition import partition_users
from storefed.data.schema import Catalog, MerchantData

REAL_AMAZON = (
    Path(__file__).resolve().parents[2] / "shared/data/reviews_Musical_Instruments_5.json.gz"
)

# ---------------------------------------------------------------- helpers


def amazon_records(num_users: int = 6, num_items: int = 4, with_category: bool = False) -> list:
    """User u rates items u % num_items and (u + 1) % num_items; user 0's 2nd review has no text."""
    rows = []
    for u in range(num_users):
        for j in range(2):
            item = (u + j) % num_items
            row = {
                "reviewerID": f"U{u:02d}",
                "asin": f"B{item:03d}",
                "overall": float(1 + (u + j) % 5),
                "reviewText": "" if (u, j) == (0, 1) else f"text {u} {j}",
                "unixReviewTime": 1_000_000 + 10 * u + j,
            }
            if u % 2:
                row["summary"] = "short"
            if with_category:
                row["categories"] = [[f"Cat{item % 2}", "Sub"]]
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list, compress: bool) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


def write_udata(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def udata_lines(num_users: int = 5, per_user: int = 3) -> list[str]:
    return [
        f"{u}\t{(u * 7 + j) % 11 + 1}\t{1 + (u + j) % 5}\t{880_000_000 + u * 100 + j}"
        for u in range(1, num_users + 1)
        for j in range(per_user)
    ]


def label_table(num_users: int, num_classes: int, seed: int = 0) -> tuple[Catalog, RawTable]:
    """Synthetic table: each user rates 3 items of one category (category = user % num_classes)."""
    rng = np.random.default_rng(seed)
    items_per_class = 4
    item_ids = tuple(f"I{i:04d}" for i in range(num_classes * items_per_class))
    cats = tuple(f"C{i // items_per_class}" for i in range(len(item_ids)))
    users = np.repeat(np.arange(num_users), 3)
    cls = users % num_classes
    items = cls * items_per_class + rng.integers(0, items_per_class, users.shape[0])
    n = users.shape[0]
    table = RawTable(
        user_key=users.astype(np.int64),
        item=items.astype(np.int64),
        rating=np.full(n, 4, dtype=np.int64),
        timestamp=np.arange(n, dtype=np.int64),
        text=["t"] * n,
        user_ids=[f"u{i}" for i in range(num_users)],
    )
    return Catalog(item_ids=item_ids, categories=cats), table


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over merchants of the entropy (nats) of the label distribution of its users."""
    ents = []
    for part in parts:
        p = np.bincount(labels[part]) / part.shape[0]
        p = p[p > 0]
        ents.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(ents))


def signature(user: np.ndarray, item: np.ndarray, ts: np.ndarray, rating: np.ndarray, u: int):
    """A user's events as a sorted tuple of (item, timestamp, rating)."""
    rows = user == u
    return tuple(sorted(zip(item[rows].tolist(), ts[rows].tolist(), rating[rows].tolist())))


def check_split(catalog: Catalog, table: RawTable, merchants: list[MerchantData]) -> None:
    """Every customer at exactly one merchant, with all of their events and reviews."""
    ids = [m.merchant_id for m in merchants]
    assert ids == [f"merchant-{k:03d}" for k in range(len(merchants))]
    assert sum(len(m.reviews) for m in merchants) == sum(bool(t.strip()) for t in table.text)
    t = table
    global_sigs = [
        signature(t.user_key, t.item, t.timestamp, t.rating, g) for g in range(t.num_users)
    ]
    assert len(set(global_sigs)) == t.num_users  # synthetic users are distinguishable
    local_sigs = []
    for m in merchants:
        ia = m.interactions
        assert ia.user.dtype == np.int64 and ia.item.dtype == np.int64
        assert ia.rating is not None and ia.rating.dtype == np.float32
        assert set(ia.user.tolist()) == set(range(m.num_users))  # local ids 0..n-1, all used
        assert m.reviews.rating.dtype == np.int64 and len(m.reviews.text) == len(m.reviews)
        assert all(0 <= u < m.num_users for u in m.reviews.user.tolist())
        rating = ia.rating.astype(np.int64)
        local_sigs += [
            signature(ia.user, ia.item, ia.timestamp, rating, u) for u in range(m.num_users)
        ]
    assert sorted(local_sigs) == sorted(global_sigs)


# ---------------------------------------------------------------- Amazon reader


@pytest.mark.parametrize("compress", [False, True])
def test_amazon_plain_and_gzip(tmp_path: Path, compress: bool) -> None:
    path = write_jsonl(tmp_path / "reviews.json", amazon_records(), compress)
    catalog, table = read_amazon_reviews(path)
    assert catalog.item_ids == ("B000", "B001", "B002", "B003")
    assert catalog.categories == catalog.item_ids  # no category field: item id is the category
    assert len(table) == 12 and table.num_users == 6
    assert table.user_ids == [f"U{u:02d}" for u in range(6)]
    assert table.rating.dtype == np.int64 and set(table.rating.tolist()) <= {1, 2, 3, 4, 5}
    assert table.timestamp.dtype == np.int64 and table.user_key.dtype == np.int64
    assert table.text[1] == "" and table.text[0] == "text 0 0"
    # row 3 is user 1, item 2
    assert table.user_ids[table.user_key[3]] == "U01"
    assert catalog.item_ids[table.item[3]] == "B002"
    assert table.rating[3] == 3 and table.timestamp[3] == 1_000_011


def test_amazon_gzip_detected_by_magic_not_extension(tmp_path: Path) -> None:
    gz = write_jsonl(tmp_path / "looks_plain.json", amazon_records(), compress=True)
    plain = write_jsonl(tmp_path / "looks_gzipped.json.gz", amazon_records(), compress=False)
    assert len(read_amazon_reviews(gz)[1]) == len(read_amazon_reviews(plain)[1]) == 12


def test_amazon_category_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.json", amazon_records(with_category=True), compress=False)
    catalog, _ = read_amazon_reviews(path)
    assert catalog.categories == ("Cat0", "Cat1", "Cat0", "Cat1")
    rows = amazon_records()
    rows[0]["category"] = ["Guitars", "Strings"]
    catalog, _ = read_amazon_reviews(write_jsonl(tmp_path / "c.json", rows, compress=False))
    assert catalog.categories == ("Guitars", "B001", "B002", "B003")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.pop("asin"), "asin"),
        (lambda r: r.update(reviewerID=""), "reviewerID"),
        (lambda r: r.update(overall=7), "overall"),
        (lambda r: r.update(overall=3.5), "overall"),
        (lambda r: r.update(overall="good"), "overall"),
        (lambda r: r.update(unixReviewTime="yesterday"), "unixReviewTime"),
        (lambda r: r.pop("unixReviewTime"), "unixReviewTime"),
        (lambda r: r.update(unixReviewTime=-5), "unixReviewTime"),  # would not load back as a merchant dir
        (lambda r: r.update(unixReviewTime=10**20), "unixReviewTime"),
        (lambda r: r.update(reviewText=42), "reviewText"),
    ],
)
def test_amazon_bad_field_names_file_line_field(tmp_path: Path, mutate, field: str) -> None:
    rows = amazon_records()
    mutate(rows[2])
    path = write_jsonl(tmp_path / "bad.json.gz", rows, compress=True)
    with pytest.raises(ValueError) as err:
        read_amazon_reviews(path)
    msg = str(err.value)
    assert "bad.json.gz" in msg and "line 3" in msg and repr(field) in msg


def test_amazon_invalid_json_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(amazon_records()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.json: line 2: invalid JSON"):
        read_amazon_reviews(path)
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no reviews"):
        read_amazon_reviews(empty)


# ---------------------------------------------------------------- MovieLens reader


def test_movielens(tmp_path: Path) -> None:
    lines = udata_lines() + ["10\t2\t5\t881250949"]
    catalog, table = read_movielens(write_udata(tmp_path / "u.data", lines))
    assert len(table) == 16 and table.num_users == 6
    assert table.user_ids == ["1", "2", "3", "4", "5", "10"]  # numeric order
    items = sorted({int(line.split("\t")[1]) for line in lines})
    assert catalog.item_ids == tuple(str(i) for i in items)
    assert set(catalog.categories) == {"unknown"}
    assert table.text == [""] * 16
    assert table.user_ids[table.user_key[-1]] == "10"
    assert catalog.item_ids[table.item[-1]] == "2"
    assert table.rating[-1] == 5 and table.timestamp[-1] == 881250949
    merchants = split_into_merchants(catalog, table, 2, seed=3)
    assert all(len(m.reviews) == 0 for m in merchants)
    check_split(catalog, table, merchants)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("1\t2\t3", "expected 4 tab-separated fields"),
        ("x\t2\t3\t881250949", "'user'"),
        ("1\t2.5\t3\t881250949", "'item'"),
        ("1\t2\t0\t881250949", "'rating'"),
        ("1\t2\t3\tnoon", "'timestamp'"),
    ],
)
def test_movielens_bad_lines(tmp_path: Path, bad_line: str, expected: str) -> None:
    lines = udata_lines()
    lines.insert(4, bad_line)
    with pytest.raises(ValueError) as err:
        read_movielens(write_udata(tmp_path / "u.data", lines))
    msg = str(err.value)
    assert "u.data" in msg and "line 5" in msg and expected in msg


# ---------------------------------------------------------------- partitioning


def test_iid_partition_balanced_and_complete() -> None:
    parts = partition_users(np.arange(103), 10, seed=1)
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_deterministic_per_seed(scheme: str) -> None:
    labels = np.arange(500) % 7
    a = partition_users(np.arange(500), 8, scheme, 0.3, labels, seed=5)
    b = partition_users(np.arange(500), 8, scheme, 0.3, labels, seed=5)
    c = partition_users(np.arange(500), 8, scheme, 0.3, labels, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_more_skewed_than_iid() -> None:
    labels = np.arange(2000) % 10
    iid = partition_users(np.arange(2000), 10, "iid", seed=0)
    skew = partition_users(np.arange(2000), 10, "dirichlet", 0.1, labels, seed=0)
    mild = partition_users(np.arange(2000), 10, "dirichlet", 100.0, labels, seed=0)
    assert np.array_equal(np.sort(np.concatenate(skew)), np.arange(2000))
    h_iid, h_skew, h_mild = (mean_label_entropy(p, labels) for p in (iid, skew, mild))
    assert h_skew < 0.6 * h_iid
    assert h_mild > 0.95 * h_iid  # large alpha approaches IID


def test_dirichlet_min_users_and_retry_error() -> None:
    labels = np.zeros(400, dtype=np.int64)  # one class: pure quantity skew
    parts = partition_users(np.arange(400), 4, "dirichlet", 0.5, labels, seed=0, min_users=20)
    assert min(p.shape[0] for p in parts) >= 20
    with pytest.raises(ValueError, match="could not give every one of 20 merchants"):
        partition_users(np.arange(40), 20, "dirichlet", 0.01, np.zeros(40), seed=0, min_users=2)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_merchants": 0}, "num_merchants must be >= 1"),
        ({"num_merchants": 11}, r"more merchants \(11\) than users \(10\)"),
        ({"scheme": "odd"}, "unknown scheme 'odd'; valid schemes: iid, dirichlet"),
        ({"scheme": "dirichlet", "alpha": 0.0, "user_labels": np.zeros(10)}, "alpha must be > 0"),
        ({"scheme": "dirichlet"}, "needs user_labels"),
        ({"scheme": "dirichlet", "user_labels": np.zeros(3)}, "3 entries for 10 users"),
    ],
)
def test_partition_bad_args(kwargs: dict, expected: str) -> None:
    args = {"num_merchants": 3, **kwargs}
    with pytest.raises(ValueError, match=expected):
        partition_users(np.arange(10), **args)


# ---------------------------------------------------------------- splitting into merchants


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_split_amazon_every_customer_once(tmp_path: Path, scheme: str) -> None:
    path = write_jsonl(tmp_path / "r.json.gz", amazon_records(12, 5, True), compress=True)
    catalog, table = read_amazon_reviews(path)
    merchants = split_into_merchants(catalog, table, 3, scheme, alpha=0.5, seed=2)
    check_split(catalog, table, merchants)
    assert sum(len(m.reviews) for m in merchants) == 23  # one textless review


def test_split_dirichlet_label_skew_and_determinism() -> None:
    catalog, table = label_table(600, 6)
    labels = user_labels(catalog, table, "category")
    assert np.array_equal(labels, np.arange(600) % 6)

    def entropy(merchants: list[MerchantData]) -> float:
        ents = []
        for m in merchants:
            cats = np.array([int(catalog.categories[i][1:]) for i in m.interactions.item])
            p = np.bincount(cats) / cats.shape[0]
            p = p[p > 0]
            ents.append(float(-(p * np.log(p)).sum()))
        return float(np.mean(ents))

    iid = split_into_merchants(catalog, table, 5, "iid", seed=0)
    skew = split_into_merchants(catalog, table, 5, "dirichlet", alpha=0.1, seed=0)
    again = split_into_merchants(catalog, table, 5, "dirichlet", alpha=0.1, seed=0)
    assert entropy(skew) < 0.7 * entropy(iid)
    for a, b in zip(skew, again):
        assert a.num_users == b.num_users
        assert np.array_equal(a.interactions.user, b.interactions.user)
        assert np.array_equal(a.interactions.item, b.interactions.item)
    with pytest.raises(ValueError, match="unknown label 'brand'"):
        split_into_merchants(catalog, table, 5, label="brand")


def test_user_labels_item_mode_tie_break() -> None:
    catalog = Catalog(item_ids=("a", "b", "c"), categories=("x", "y", "y"))
    table = RawTable(
        user_key=np.array([0, 0, 0, 1, 1], dtype=np.int64),
        item=np.array([2, 1, 2, 0, 1], dtype=np.int64),
        rating=np.full(5, 3, dtype=np.int64),
        timestamp=np.arange(5, dtype=np.int64),
        text=[""] * 5,
        user_ids=["p", "q"],
    )
    assert user_labels(catalog, table, "item").tolist() == [2, 0]  # user 1: tie -> smallest
    assert user_labels(catalog, table, "category").tolist() == [1, 0]


# ---------------------------------------------------------------- the real data set


@pytest.mark.skipif(
    not REAL_AMAZON.exists(), reason=f"real Amazon 5-core file not found at {REAL_AMAZON}"
)
def test_real_amazon_musical_instruments() -> None:
    catalog, table = read_amazon_reviews(REAL_AMAZON)
    assert len(table) == 10_261
    assert table.num_users == 1_429
    assert catalog.num_items == 900
    merchants = split_into_merchants(catalog, table, 10, "dirichlet", alpha=0.3, label="item")
    assert sum(m.num_users for m in merchants) == 1_429
    assert sum(len(m.interactions) for m in merchants) == 10_261
    assert min(m.num_users for m in merchants) >= 1
