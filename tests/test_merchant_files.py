"""Tests for storefed/data/merchant_files.py: loading, validating and writing merchant directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storefed.data.merchant_files import (
    SCHEMA_VERSION,
    MerchantDataError,
    load_catalog,
    load_merchant_dir,
    summarize,
    write_catalog,
    write_merchant_dir,
)
from storefed.data.schema import Catalog, Interactions, MerchantData, Reviews, empty_interactions

CATALOG = Catalog(
    item_ids=("A", "B", "C", "item,4"),
    categories=("toys", "toys", "books", ""),
    titles=("Ball", "Kite, red", 'The "Book"', ""),
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def load_error(directory: Path) -> MerchantDataError:
    with pytest.raises(MerchantDataError) as info:
        load_merchant_dir(directory, CATALOG)
    return info.value


def assert_names(err: MerchantDataError, file: str, line: int | None, field: str | None) -> None:
    msg = str(err)
    assert file in msg and file in err.path
    assert err.line == line and err.field == field
    if line is not None:
        assert f"line {line}" in msg
    if field is not None:
        assert f"'{field}'" in msg


def sample_data(with_rating: bool) -> MerchantData:
    n = 12  # > 10 so "u10" vs "u2" ordering matters
    users = np.arange(n, dtype=np.int64)[::-1].copy()  # first appearance is not index order
    inter = Interactions(
        user=users,
        item=(users % 4).astype(np.int64),
        timestamp=np.arange(n, dtype=np.int64) * 1000 + 1_700_000_000,
        rating=(
            np.where(users % 3 == 0, 0, 1 + (users % 5) * 0.9).astype(np.float32)
            if with_rating
            else None
        ),
    )
    rev = Reviews(
        user=np.array([3, 0, 11], dtype=np.int64),
        item=np.array([3, 2, 0], dtype=np.int64),
        rating=np.array([5, 1, 3], dtype=np.int64),
        text=["Great, really!\nSecond line \u2028 \"quoted\"", "", "naïve café ✓"],
        timestamp=np.array([0, 5, 1_700_000_123], dtype=np.int64),
    )
    return MerchantData(merchant_id="shop", num_users=n, interactions=inter, reviews=rev)


def assert_same(a: MerchantData, b: MerchantData) -> None:
    assert a.num_users == b.num_users
    for name in ("user", "item", "timestamp"):
        np.testing.assert_array_equal(getattr(a.interactions, name), getattr(b.interactions, name))
    if a.interactions.rating is None:
        assert b.interactions.rating is None
    else:
        assert b.interactions.rating.dtype == np.float32
        np.testing.assert_array_equal(a.interactions.rating, b.interactions.rating)
    for name in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(a.reviews, name), getattr(b.reviews, name))
        assert getattr(b.reviews, name).dtype == np.int64
    assert a.reviews.text == b.reviews.text


# --------------------------------------------------------------------------- round trips


def test_schema_version() -> None:
    assert SCHEMA_VERSION == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("with_rating", [True, False])
def test_round_trip(tmp_path: Path, fmt: str, with_rating: bool) -> None:
    data = sample_data(with_rating)
    write_catalog(CATALOG, tmp_path / "catalog.csv")
    catalog = load_catalog(tmp_path / "catalog.csv")
    assert catalog == CATALOG
    write_merchant_dir(data, catalog, tmp_path / "shop", reviews_format=fmt)
    loaded = load_merchant_dir(tmp_path / "shop", catalog)
    assert loaded.merchant_id == "shop"
    assert loaded.dropped_unknown_items == 0
    assert_same(data, loaded)
    # no temp files left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "shop").iterdir()) == sorted(
        ["interactions.csv", f"reviews.{fmt}"]
    )


def test_rewrite_switches_review_format(tmp_path: Path) -> None:
    data = sample_data(True)
    write_merchant_dir(data, CATALOG, tmp_path / "m", reviews_format="jsonl")
    write_merchant_dir(data, CATALOG, tmp_path / "m", reviews_format="csv")
    assert not (tmp_path / "m" / "reviews.jsonl").exists()
    assert_same(data, load_merchant_dir(tmp_path / "m", CATALOG))


def test_catalog_without_optional_columns(tmp_path: Path) -> None:
    cat = load_catalog(write(tmp_path / "catalog.csv", "\ufeffitem_id\nX\n\nY\n"))
    assert cat.item_ids == ("X", "Y") and cat.categories == ("", "") and cat.titles == ()
    write_catalog(cat, tmp_path / "again.csv")
    assert load_catalog(tmp_path / "again.csv") == cat


# --------------------------------------------------------------------------- valid inputs


def test_columns_in_any_order_and_shared_users(tmp_path: Path) -> None:
    d = tmp_path / "m1"
    write(
        d / "interactions.csv",
        "timestamp,rating,item_id,user_id\n10,,B,bob\n20,4.5,A,alice\n30,,C,bob\n",
    )
    write(
        d / "reviews.csv",
        'text,timestamp,rating,user_id,item_id\n"fine, ok",40,4,carol,A\n,50,2,bob,C\n',
    )
    data = load_merchant_dir(d, CATALOG, merchant_id="store-1")
    assert data.merchant_id == "store-1"
    assert data.num_users == 3  # carol only reviewed, still a user
    # ids sorted: alice=0, bob=1, carol=2
    np.testing.assert_array_equal(data.interactions.user, [1, 0, 1])
    np.testing.assert_array_equal(data.interactions.item, [1, 0, 2])
    np.testing.assert_array_equal(data.interactions.timestamp, [10, 20, 30])
    np.testing.assert_array_equal(data.interactions.rating, np.array([0, 4.5, 0], dtype=np.float32))
    np.testing.assert_array_equal(data.reviews.user, [2, 1])
    np.testing.assert_array_equal(data.reviews.rating, [4, 2])
    assert data.reviews.text == ["fine, ok", ""]


def test_jsonl_reviews_only(tmp_path: Path) -> None:
    d = tmp_path / "m2"
    lines = [
        {"user_id": "x", "item_id": "C", "rating": 5, "text": "wow\nnice", "timestamp": 1},
        {"timestamp": 2, "text": "", "rating": 1, "item_id": "A", "user_id": "y"},
    ]
    text = "\ufeff" + json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n"
    write(d / "reviews.jsonl", text)
    data = load_merchant_dir(d, CATALOG)
    assert data.merchant_id == "m2"
    assert data.num_users == 2 and len(data.interactions) == 0
    assert data.interactions.rating is None
    np.testing.assert_array_equal(data.reviews.item, [2, 0])
    assert data.reviews.text == ["wow\nnice", ""]


def test_unknown_items_dropped_and_counted(tmp_path: Path) -> None:
    d = tmp_path / "m3"
    write(d / "interactions.csv", "user_id,item_id,timestamp\nu1,A,1\nu2,ZZZ,2\nu1,nope,3\n")
    rec = {"user_id": "u3", "item_id": "gone", "rating": 3, "text": "", "timestamp": 4}
    write(d / "reviews.jsonl", json.dumps(rec) + "\n")
    data = load_merchant_dir(d, CATALOG)
    assert data.dropped_unknown_items == 3
    assert len(data.interactions) == 1 and len(data.reviews) == 0
    assert data.num_users == 1  # users with only dropped rows have no data
    assert summarize(data) == {
        "merchant_id": "m3",
        "users": 1,
        "interactions": 1,
        "reviews": 0,
        "dropped_unknown_items": 3,
    }


# --------------------------------------------------------------------------- errors


def test_error_is_value_error() -> None:
    err = MerchantDataError("x/interactions.csv", "expected something", line=7, field="timestamp")
    assert isinstance(err, ValueError)
    assert str(err) == "x/interactions.csv line 7, field 'timestamp': expected something"


def test_non_integer_timestamp(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write(d / "interactions.csv", "user_id,item_id,timestamp\n" + "u,A,1\n" * 5 + "u,A,yesterday\n")
    err = load_error(d)
    assert_names(err, "interactions.csv", 7, "timestamp")
    assert "expected an integer unix time in seconds" in str(err) and "'yesterday'" in str(err)


@pytest.mark.parametrize("value", ["-5", "1.5", ""])
def test_bad_timestamp_values(tmp_path: Path, value: str) -> None:
    write(tmp_path / "m" / "interactions.csv", f"user_id,item_id,timestamp\nu,A,{value}\n")
    assert_names(load_error(tmp_path / "m"), "interactions.csv", 2, "timestamp")


@pytest.mark.parametrize("rating", ["0", "6", "five", "4.5", ""])
def test_bad_review_rating_csv(tmp_path: Path, rating: str) -> None:
    body = f"user_id,item_id,rating,text,timestamp\nu,A,3,ok,1\nu,A,{rating},ok,1\n"
    write(tmp_path / "m" / "reviews.csv", body)
    err = load_error(tmp_path / "m")
    assert_names(err, "reviews.csv", 3, "rating")
    assert "1 to 5" in str(err)


@pytest.mark.parametrize("rating", [0, 6, "five", 4.0, True, None])
def test_bad_review_rating_jsonl(tmp_path: Path, rating: object) -> None:
    rec = {"user_id": "u", "item_id": "A", "rating": rating, "text": "", "timestamp": 1}
    write(tmp_path / "m" / "reviews.jsonl", json.dumps(rec) + "\n")
    assert_names(load_error(tmp_path / "m"), "reviews.jsonl", 1, "rating")


@pytest.mark.parametrize("rating", ["0", "6", "five", "nan"])
def test_bad_interaction_rating(tmp_path: Path, rating: str) -> None:
    body = f"user_id,item_id,timestamp,rating\nu,A,1,{rating}\n"
    write(tmp_path / "m" / "interactions.csv", body)
    assert_names(load_error(tmp_path / "m"), "interactions.csv", 2, "rating")


def test_missing_column(tmp_path: Path) -> None:
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id\nu,A\n")
    err = load_error(tmp_path / "m")
    assert_names(err, "interactions.csv", 1, "timestamp")
    assert "user_id,item_id,timestamp[,rating]" in str(err)


def test_misspelled_column(tmp_path: Path) -> None:
    write(tmp_path / "m" / "reviews.csv", "user_id,item_id,stars,text,timestamp\n")
    assert_names(load_error(tmp_path / "m"), "reviews.csv", 1, "stars")


def test_extra_column(tmp_path: Path) -> None:
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id,timestamp,email\nu,A,1,a@b.c\n")
    err = load_error(tmp_path / "m")
    assert_names(err, "interactions.csv", 1, "email")
    assert "unknown column" in str(err)


def test_empty_column_name(tmp_path: Path) -> None:
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id,timestamp,\nu,A,1,\n")
    err = load_error(tmp_path / "m")
    assert_names(err, "interactions.csv", 1, None)
    assert "column 4" in str(err)


def test_wrong_field_count(tmp_path: Path) -> None:
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id,timestamp\nu,A,1\nu,A\n")
    assert_names(load_error(tmp_path / "m"), "interactions.csv", 3, None)


def test_line_numbers_count_multiline_fields(tmp_path: Path) -> None:
    body = 'user_id,item_id,rating,text,timestamp\nu,A,5,"two\nlines",1\nu,A,5,ok,soon\n'
    write(tmp_path / "m" / "reviews.csv", body)
    assert_names(load_error(tmp_path / "m"), "reviews.csv", 4, "timestamp")


def test_empty_user_id(tmp_path: Path) -> None:
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id,timestamp\n ,A,1\n")
    assert_names(load_error(tmp_path / "m"), "interactions.csv", 2, "user_id")


def test_bad_json_line(tmp_path: Path) -> None:
    good = json.dumps({"user_id": "u", "item_id": "A", "rating": 4, "text": "", "timestamp": 1})
    write(tmp_path / "m" / "reviews.jsonl", f"{good}\n{good}\n{{'user_id': 'u'}}\n")
    err = load_error(tmp_path / "m")
    assert_names(err, "reviews.jsonl", 3, None)
    assert "not valid JSON" in str(err)


@pytest.mark.parametrize(
    "rec, field",
    [
        ({"user_id": "u", "item_id": "A", "rating": 4, "timestamp": 1}, "text"),
        (
            {"user_id": "u", "item_id": "A", "rating": 4, "text": "", "timestamp": 1, "email": ""},
            "email",
        ),
        ({"user_id": "u", "item_id": "A", "rating": 4, "text": None, "timestamp": 1}, "text"),
        ({"user_id": "u", "item_id": "A", "rating": 4, "text": "", "timestamp": "soon"}, "timestamp"),
    ],
)
def test_bad_jsonl_fields(tmp_path: Path, rec: dict, field: str) -> None:
    write(tmp_path / "m" / "reviews.jsonl", "\n" + json.dumps(rec) + "\n")
    assert_names(load_error(tmp_path / "m"), "reviews.jsonl", 2, field)


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    write(tmp_path / "m" / "reviews.jsonl", "[1, 2]\n")
    assert_names(load_error(tmp_path / "m"), "reviews.jsonl", 1, None)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    body = b"user_id,item_id,timestamp\nu,A,1\n\xe9t\xe9,A,2\n"  # Latin-1, not UTF-8
    write(tmp_path / "m" / "interactions.csv", body)
    err = load_error(tmp_path / "m")
    assert_names(err, "interactions.csv", 3, None)
    assert "UTF-8" in str(err)


def test_unterminated_quote(tmp_path: Path) -> None:
    body = 'user_id,item_id,rating,text,timestamp\nu,A,5,"open,1\n'
    write(tmp_path / "m" / "reviews.csv", body)
    assert_names(load_error(tmp_path / "m"), "reviews.csv", 2, None)


def test_empty_file(tmp_path: Path) -> None:
    write(tmp_path / "m" / "interactions.csv", "")
    err = load_error(tmp_path / "m")
    assert_names(err, "interactions.csv", 1, None)
    assert "user_id,item_id,timestamp" in str(err)


def test_missing_dir(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope")
    assert "nope" in err.path and err.line is None
    for name in ("interactions.csv", "reviews.csv", "reviews.jsonl"):
        assert name in str(err)


def test_dir_without_data_files(tmp_path: Path) -> None:
    write(tmp_path / "m" / "notes.txt", "hi")
    err = load_error(tmp_path / "m")
    assert "interactions.csv" in str(err) and "reviews.jsonl" in str(err)


def test_both_review_files(tmp_path: Path) -> None:
    write(tmp_path / "m" / "reviews.csv", "user_id,item_id,rating,text,timestamp\n")
    write(tmp_path / "m" / "reviews.jsonl", "")
    err = load_error(tmp_path / "m")
    assert "reviews.csv" in str(err) and "reviews.jsonl" in str(err)


def test_duplicate_catalog_id(tmp_path: Path) -> None:
    path = write(tmp_path / "catalog.csv", "item_id,category\nA,x\nB,y\nA,z\n")
    with pytest.raises(MerchantDataError) as info:
        load_catalog(path)
    assert_names(info.value, "catalog.csv", 4, "item_id")
    assert "line 2" in str(info.value)  # points at the first occurrence too


def test_catalog_missing_item_id_column(tmp_path: Path) -> None:
    path = write(tmp_path / "catalog.csv", "id,category\nA,x\n")
    with pytest.raises(MerchantDataError) as info:
        load_catalog(path)
    assert_names(info.value, "catalog.csv", 1, "id")


def test_catalog_file_missing(tmp_path: Path) -> None:
    with pytest.raises(MerchantDataError) as info:
        load_catalog(tmp_path / "catalog.csv")
    assert "catalog.csv" in str(info.value) and "not found" in str(info.value)


# --------------------------------------------------------------------------- writer checks


def test_writer_rejects_bad_indices(tmp_path: Path) -> None:
    data = sample_data(False)
    data.reviews.item[0] = CATALOG.num_items
    with pytest.raises(ValueError, match="catalog"):
        write_merchant_dir(data, CATALOG, tmp_path / "m")
    with pytest.raises(ValueError, match="reviews_format"):
        write_merchant_dir(sample_data(False), CATALOG, tmp_path / "m", reviews_format="xml")


def test_write_empty_interactions(tmp_path: Path) -> None:
    data = sample_data(False)
    data = MerchantData("m", 12, empty_interactions(), data.reviews)
    write_merchant_dir(data, CATALOG, tmp_path / "m")
    loaded = load_merchant_dir(tmp_path / "m", CATALOG)
    assert len(loaded.interactions) == 0 and loaded.interactions.rating is None
    assert loaded.num_users == 3  # only users with rows survive a round trip


def test_huge_timestamps_deep_json_and_long_texts_are_clear_errors(tmp_path: Path) -> None:
    write(tmp_path / "a" / "interactions.csv", "user_id,item_id,timestamp\nu,A,1\nu,A,99999999999999999999999\n")
    err = load_error(tmp_path / "a")
    assert_names(err, "interactions.csv", 3, "timestamp")
    assert "0 to 253402300799" in str(err) and "milliseconds are too large" in str(err)
    write(tmp_path / "b" / "reviews.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    err = load_error(tmp_path / "b")
    assert_names(err, "reviews.jsonl", 1, None)
    assert "nested too deeply" in str(err)
    rec = {"user_id": "u", "item_id": "A", "rating": 4, "text": "x" * 5_000_000, "timestamp": 1}
    write(tmp_path / "c" / "reviews.jsonl", json.dumps(rec) + "\n")
    err = load_error(tmp_path / "c")
    assert_names(err, "reviews.jsonl", 1, "text")
    assert "at most 131072 characters (as in CSV), got 5000000" in str(err)


def test_a_merchant_without_usable_customers_is_refused_at_start(tmp_path: Path) -> None:
    from storefed.client.merchant_agent import MerchantOptions, validate

    write(tmp_path / "m" / "catalog.csv", "item_id\nA\n")
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id,timestamp\nu1,ZZZ,1\nu2,ZZZ,2\n")
    options = MerchantOptions(data_dir=tmp_path / "m", ledger_dir=tmp_path / "l", superlink="h:1", insecure=True)
    with pytest.raises(MerchantDataError, match=r"no usable customers: .*\(2 dropped: their items are not in the catalog\)"):
        validate(options)
    write(tmp_path / "m" / "interactions.csv", "user_id,item_id,timestamp\n")
    with pytest.raises(MerchantDataError, match="no usable customers: the files hold no rows; check"):
        validate(options)
