"""MovieLens-100k as the three H&M files: a small real dev set (``hm-recsys convert movielens``).

Generated data has an oracle but no real people in it; the Kaggle files are
large and licensed. MovieLens-100k (943 users, 1,682 movies, 100,000 ratings,
1997-09-20..1998-04-22) is real behaviour, small and freely redistributed: the
``recbole`` 1.2.1 wheel carries it as RecBole atomic files under
``recbole/dataset_example/ml-100k/``. ``convert_movielens`` reads them (from
the wheel with ``zipfile``, nothing extracted or executed, or from a folder
holding ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user``) and writes
``articles.csv``, ``customers.csv`` and ``transactions_train.csv`` in H&M's
exact format (the writers of ``hm_recsys.data.hmcsv``, so the bytes follow the
same conventions as the generator's), plus ``conversion.json`` (source sha256,
row counts, date range, weekly volumes and this mapping). There is no oracle.

The mapping (every rule is a pure function of one user, movie or rating, so the
output is byte-identical for the same input and options):

Transactions (``transactions_train.csv``)
    A rating >= ``min_rating`` (default 4) is one purchase of the movie by the
    user, on the UTC day of its timestamp. All days are shifted by one whole
    number of days so that the last purchase day is ``last_day`` (default
    2020-09-22, the last day of the Kaggle data; weekdays are not kept).
    Ratings below ``min_rating`` are dropped. Rows are sorted by
    ``(t_dat, customer_id, timestamp, movie id)``.

    * ``price``: a function of the movie's release year: local price
      ``4.99 + 1.00 x min(40, max(0, (year - 1920) // 2))`` (newer is dearer;
      9.99 when the year is unknown), divided by 590 and truncated to 16
      decimals like H&M's prices: 0.0085..0.0763 (0.0102..0.0746 in ml-100k).
    * ``sales_channel_id``: 1 (store) when ``t_dat`` is a Saturday or Sunday,
      else 2 (online): ~70% online when purchases spread evenly over the week.

Customers (``customers.csv``; every user, buyer or not)
    * ``customer_id``: ``sha256(f"ml-100k user {user_id}")`` as 64 lowercase hex.
    * ``FN``: ``1.0`` for gender F, else empty.
    * ``Active``: ``1.0`` when FN is ``1.0`` and the occupation is neither
      ``retired`` nor ``none``, else empty.
    * ``club_member_status``: ``LEFT CLUB`` for occupation ``retired``,
      ``PRE-CREATE`` for ``none`` and ``other``, else ``ACTIVE``.
    * ``fashion_news_frequency``: FN ``1.0``: ``Monthly`` for students,
      ``Regularly`` otherwise; not FN: ``NONE``.
    * ``age``: the user's age clipped to 16..99 (empty if the file has none).
    * ``postal_code``: ``sha256(zip_code)`` as 64 lowercase hex.

Articles (``articles.csv``; every movie, sold or not; one article per product)
    * ``product_code``: the movie id zero-padded to 7 digits;
      ``article_id``: ``product_code + "001"`` (10 digits).
    * ``prod_name``: the title (``movie_title``); ``detail_desc``:
      ``"<title> (<year>)"`` (the title alone when the year is unknown).
    * ``product_type_no`` / ``_name``: the first listed genre, numbered as in
      MovieLens' ``u.genre`` (Action 1 .. Western 18; no genre or ``unknown``:
      -1 ``Unknown``).
    * ``product_group_name``: the family of the first genre (see ``FAMILIES``).
    * ``graphical_appearance_no`` / ``_name``: the release decade,
      ``1010000 + decade // 10`` / ``"1990s"`` (-1 ``Unknown``).
    * ``colour_group_code`` / ``_name``: the number of genres, ``"02"`` /
      ``"2 genres"`` (``"00"`` ``No genre``).
    * ``perceived_colour_value_id`` / ``_name``: the mood of the genre mix,
      the mood (see ``MOODS``) most of its genres have, ties to the earliest
      listed (-1 ``Unknown``).
    * ``perceived_colour_master_id`` / ``_name``: the family of the *last*
      listed genre.
    * ``department_no`` / ``_name``: the genre combination: a bit mask of the
      genre numbers (``sum(1 << n)``) / the genres joined by ``/`` (-1 ``Unknown``).
    * ``index_code`` / ``index_name``: the release period, one letter like
      H&M's A..J: A before 1950, B 1950s, C 1960s, D 1970s, E 1980s,
      F 1990-1993, G 1994, H 1995, I 1996, J 1997 and later, U unknown.
    * ``index_group_no`` / ``_name``: the family of the first genre.
    * ``section_no`` / ``_name``: the second listed genre (0 ``No second genre``).
    * ``garment_group_no`` / ``_name``: the release's recency at the end of
      the data (1998): 1001 ``New release`` (1997+), 1002 ``Recent``
      (1993-1996), 1003 ``Modern`` (1980-1992), 1004 ``Classic`` (before
      1980), -1 ``Unknown``.

A release year that is not a number between 1800 and 2100 (the wheel has
``V`` and ``unkonwn``) counts as unknown. Everything else that is malformed
(a missing file or member, a missing column, a non-numeric id, rating,
timestamp or age, a line with the wrong number of fields, a rating of an
unknown user or movie, a duplicate id, a genre not in MovieLens' list) raises
``MovieLensError`` naming the file, line and field.

What the real dev set cannot tell (see docs/real-dev-set.md): MovieLens has no
repurchase (a user rates a movie once), one article per product code (no
colour variants), no prices or channels of its own (both are derived), and it
covers ~31 weeks with uneven volume: with the defaults, the week of
2020-08-26 holds 5.4x the median of the 4 weeks before it (a burst of new
users rating their first movies), which ``hm-recsys validate --history``
rejects with its default volume band; ``conversion.json`` lists such weeks
under ``volume_outliers``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hm_recsys.cli import iso_date
from hm_recsys.data import schema

__all__ = [
    "FAMILIES",
    "GENRES",
    "MEMBER_DIR",
    "MOODS",
    "MovieLensError",
    "RECBOLE_VERSION",
    "WHEEL_NAME",
    "article_id",
    "convert_movielens",
    "customer_id",
    "fetch_wheel",
    "main",
    "price_cents",
]

RECBOLE_VERSION = "1.2.1"
WHEEL_NAME = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
# sha256 of the wheel these figures were checked on (55,375 purchases, 943 customers, 1,682 articles).
KNOWN_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBER_DIR = "recbole/dataset_example/ml-100k"
FILES = {"inter": "ml-100k.inter", "item": "ml-100k.item", "user": "ml-100k.user"}
# Required columns of each atomic file (RecBole headers are "name:type"; matched by name).
REQUIRED = {
    "inter": ("user_id", "item_id", "rating", "timestamp"),
    "item": ("item_id", "movie_title", "release_year", "class"),
    "user": ("user_id", "age", "gender", "occupation", "zip_code"),
}
_MAX_MEMBER_BYTES = 64 << 20  # ml-100k.inter is ~2 MB; anything far larger is not this dataset
_MAX_ID = 10**7 - 1  # a movie id must fit the 7-digit product code

# MovieLens' genres, numbered as in u.genre (0 = "unknown").
GENRES: dict[str, int] = {
    "unknown": 0, "Action": 1, "Adventure": 2, "Animation": 3, "Children's": 4, "Comedy": 5, "Crime": 6,
    "Documentary": 7, "Drama": 8, "Fantasy": 9, "Film-Noir": 10, "Horror": 11, "Musical": 12, "Mystery": 13,
    "Romance": 14, "Sci-Fi": 15, "Thriller": 16, "War": 17, "Western": 18,
}  # fmt: skip
# Genre families (index group, product group, colour master): (no, name, genres).
FAMILIES: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "Action & Adventure", ("Action", "Adventure", "War", "Western")),
    (2, "Comedy & Musical", ("Comedy", "Musical")),
    (3, "Drama & Romance", ("Drama", "Romance")),
    (4, "Crime & Mystery", ("Crime", "Film-Noir", "Mystery", "Thriller")),
    (5, "Horror & Sci-Fi", ("Fantasy", "Horror", "Sci-Fi")),
    (6, "Family", ("Animation", "Children's")),
    (7, "Documentary", ("Documentary",)),
)
# Moods (perceived colour value): (id, name, genres).
MOODS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "Dark", ("Crime", "Film-Noir", "Horror", "Mystery", "Thriller", "War")),
    (2, "Light", ("Animation", "Children's", "Comedy", "Fantasy", "Musical")),
    (3, "Bright", ("Action", "Adventure", "Sci-Fi", "Western")),
    (4, "Medium", ("Documentary", "Drama", "Romance")),
)
_FAMILY_OF = {g: (no, name) for no, name, gs in FAMILIES for g in gs}
_MOOD_OF = {g: (no, name) for no, name, gs in MOODS for g in gs}
_UNKNOWN = (-1, "Unknown")
# Release periods (index): (code, name, first year); "U" = unknown year.
PERIODS: tuple[tuple[str, str, int], ...] = (
    ("A", "Before 1950", -10**9),
    ("B", "1950s", 1950),
    ("C", "1960s", 1960),
    ("D", "1970s", 1970),
    ("E", "1980s", 1980),
    ("F", "1990-1993", 1990),
    ("G", "1994", 1994),
    ("H", "1995", 1995),
    ("I", "1996", 1996),
    ("J", "1997 and later", 1997),
)
_UNKNOWN_PERIOD = ("U", "Unknown year")
# Recency at the end of the data (garment group): (no, name, first year).
RECENCY: tuple[tuple[int, str, int], ...] = (
    (1004, "Classic", -10**9),
    (1003, "Modern", 1980),
    (1002, "Recent", 1993),
    (1001, "New release", 1997),
)
_YEAR_RANGE = (1800, 2100)

MAPPING: dict[str, str] = {
    "transactions": "one row per rating >= min_rating, on the rating's UTC day shifted so the last purchase day "
    "is last_day; price from the release year; sales_channel_id 1 on Saturday/Sunday else 2",
    "customer_id": 'sha256("ml-100k user <user_id>"), 64 lowercase hex',
    "FN": "1.0 for gender F, else empty",
    "Active": "1.0 when FN and the occupation is not retired/none, else empty",
    "club_member_status": "LEFT CLUB for retired, PRE-CREATE for none/other, else ACTIVE",
    "fashion_news_frequency": "FN: Monthly for students, Regularly otherwise; not FN: NONE",
    "age": "the user's age clipped to 16..99",
    "postal_code": "sha256(zip_code), 64 lowercase hex",
    "article_id": "product_code + '001'",
    "product_code": "movie id zero-padded to 7 digits",
    "prod_name": "movie title",
    "product_type": "first genre (MovieLens genre number / name; -1 Unknown)",
    "product_group_name": "family of the first genre",
    "graphical_appearance": "release decade (1010000 + decade // 10 / '1990s')",
    "colour_group": "number of genres ('02' / '2 genres')",
    "perceived_colour_value": "mood of the genre mix (Dark/Light/Bright/Medium)",
    "perceived_colour_master": "family of the last genre",
    "department": "genre combination (bit mask of genre numbers / genres joined by '/')",
    "index": "release period A..J (U unknown)",
    "index_group": "family of the first genre",
    "section": "second genre (0 'No second genre')",
    "garment_group": "recency in 1998: New release / Recent / Modern / Classic",
    "detail_desc": "'<title> (<year>)'",
    "price": "(4.99 + 1.00 * min(40, max(0, (year - 1920) // 2))) / 590, truncated to 16 decimals; 9.99 / 590 "
    "when the year is unknown",
}


class MovieLensError(ValueError):
    """The MovieLens input cannot be converted: says which file (or wheel member), line and field."""

    def __init__(self, where: str, reason: str, line: int | None = None, field: str | None = None):
        self.where, self.reason, self.line, self.field = where, reason, line, field
        loc = where + (f": line {line}" if line is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{loc}: {reason}")

    def __reduce__(self):
        return (type(self), (self.where, self.reason, self.line, self.field))


# ==========================================================================
# Reading the atomic files
# ==========================================================================
@dataclass(frozen=True)
class _Atomic:
    """One parsed atomic file: where it came from, its bytes' sha256, and its rows as dicts of the
    required columns (with the file line of each row)."""

    where: str
    sha256: str
    size: int
    rows: list[tuple[int, dict[str, str]]]


def _read_sources(source: Path) -> tuple[dict[str, tuple[str, bytes]], dict]:
    """``{"inter"|"item"|"user": (where, bytes)}`` and a description of the source."""
    source = Path(source)
    out: dict[str, tuple[str, bytes]] = {}
    if source.is_dir():
        for key, name in FILES.items():
            p = source / name
            if not p.is_file():
                raise MovieLensError(str(source), f"the folder has no {name} (expected {', '.join(FILES.values())})")
            out[key] = (str(p), p.read_bytes())
        digest = hashlib.sha256()
        for key in FILES:
            digest.update(hashlib.sha256(out[key][1]).digest())
        return out, {"path": str(source), "kind": "folder", "sha256": digest.hexdigest(),
                     "sha256_of": "sha256 of the three files' sha256 digests (inter, item, user)"}
    if not source.is_file():
        raise MovieLensError(str(source), "no such file or folder (expected the recbole wheel or a folder with "
                             f"{', '.join(FILES.values())})")
    from hm_recsys.fsutil import file_sha256

    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise MovieLensError(str(source), f"not a readable wheel (zip) file: {exc}") from None
    with zf:
        for key, name in FILES.items():
            member = f"{MEMBER_DIR}/{name}"
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise MovieLensError(str(source), f"the wheel has no member {member}") from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise MovieLensError(f"{source}!{member}", f"{info.file_size:,} bytes is far too large for ml-100k")
            try:
                out[key] = (f"{source}!{member}", zf.read(info))
            except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
                raise MovieLensError(f"{source}!{member}", f"cannot be read from the wheel: {exc}") from None
    sha = file_sha256(source)
    return out, {"path": str(source), "kind": "wheel", "sha256": sha, "known_wheel": sha == KNOWN_WHEEL_SHA256}


def _parse_atomic(where: str, data: bytes, key: str) -> _Atomic:
    """Parse a tab-separated RecBole atomic file; keep the required columns by name."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MovieLensError(where, f"invalid UTF-8 byte 0x{data[exc.start]:02x}", line=line) from None
    lines = text.split("\n")
    header = lines[0].rstrip("\r").lstrip("\ufeff")
    if not header.strip():
        raise MovieLensError(where, "empty file (no header line)", line=1)
    tokens = header.split("\t")
    names = [t.split(":", 1)[0].strip() for t in tokens]
    pos: dict[str, int] = {}
    for col in REQUIRED[key]:
        if col not in names:
            raise MovieLensError(where, f"missing column {col!r} in the header {header!r}", line=1, field=col)
        pos[col] = names.index(col)
    rows: list[tuple[int, dict[str, str]]] = []
    for i, raw in enumerate(lines[1:], start=2):
        ln = raw.rstrip("\r")
        if not ln.strip():
            continue
        fields = ln.split("\t")
        if len(fields) != len(tokens):
            raise MovieLensError(where, f"expected {len(tokens)} tab-separated fields, got {len(fields)}", line=i)
        rows.append((i, {c: fields[p].strip() for c, p in pos.items()}))
    return _Atomic(where=where, sha256=hashlib.sha256(data).hexdigest(), size=len(data), rows=rows)


def _int(a: _Atomic, line: int, field: str, value: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        v = int(value)
    except ValueError:
        raise MovieLensError(a.where, f"{value!r} is not an integer", line=line, field=field) from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MovieLensError(a.where, f"{v} is outside {lo}..{hi}", line=line, field=field)
    return v


def _number(a: _Atomic, line: int, field: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise MovieLensError(a.where, f"{value!r} is not a number", line=line, field=field) from None
    if v != v or v in (float("inf"), float("-inf")):
        raise MovieLensError(a.where, f"{value!r} is not a finite number", line=line, field=field)
    return v


# ==========================================================================
# The mapping
# ==========================================================================
def customer_id(user_id: int) -> str:
    return hashlib.sha256(f"ml-100k user {user_id}".encode()).hexdigest()


def article_id(movie_id: int) -> str:
    return f"{movie_id:07d}001"


def _year(value: str) -> int | None:
    try:
        y = int(value)
    except ValueError:
        return None
    return y if _YEAR_RANGE[0] <= y <= _YEAR_RANGE[1] else None


def price_cents(year: int | None) -> int:
    """Local price in cents: 4.99 + 1.00 per two years since 1920 (capped at 44.99); 9.99 if unknown."""
    if year is None:
        return 999
    return 499 + 100 * min(40, max(0, (year - 1920) // 2))


def _customer_row(user_id: int, age: int | None, gender: str, occupation: str, zip_code: str) -> dict[str, str]:
    fn = gender.upper() == "F"
    occ = occupation.lower()
    if occ == "retired":
        club = "LEFT CLUB"
    elif occ in ("none", "other"):
        club = "PRE-CREATE"
    else:
        club = "ACTIVE"
    news = ("Monthly" if occ == "student" else "Regularly") if fn else "NONE"
    return {
        "customer_id": customer_id(user_id),
        "FN": "1.0" if fn else "",
        "Active": "1.0" if fn and occ not in ("retired", "none") else "",
        "club_member_status": club,
        "fashion_news_frequency": news,
        "age": "" if age is None else str(min(schema.AGE_MAX, max(schema.AGE_MIN, age))),
        "postal_code": hashlib.sha256(zip_code.encode("utf-8")).hexdigest(),
    }


def _article_row(movie_id: int, title: str, year: int | None, genres: list[str]) -> dict:
    code = f"{movie_id:07d}"
    real = [g for g in genres if g != "unknown"]
    first = real[0] if real else None
    type_no, type_name = (GENRES[first], first) if first else _UNKNOWN
    fam_first = _FAMILY_OF[first] if first else _UNKNOWN
    fam_last = _FAMILY_OF[real[-1]] if real else _UNKNOWN
    if real:
        counts = Counter(_MOOD_OF[g] for g in real)
        best = max(counts.values())
        mood = next(_MOOD_OF[g] for g in real if counts[_MOOD_OF[g]] == best)
    else:
        mood = _UNKNOWN
    if year is None:
        graph = _UNKNOWN
        period = _UNKNOWN_PERIOD
        recency = _UNKNOWN
    else:
        decade = year // 10 * 10
        graph = (1010000 + decade // 10, f"{decade}s")
        period = next((c, n) for c, n, start in reversed(PERIODS) if year >= start)
        recency = next((no, n) for no, n, start in reversed(RECENCY) if year >= start)
    n = len(real)
    name = title or f"Movie {movie_id}"
    return {
        "article_id": article_id(movie_id),
        "product_code": code,
        "prod_name": name,
        "product_type_no": type_no,
        "product_type_name": type_name,
        "product_group_name": fam_first[1],
        "graphical_appearance_no": graph[0],
        "graphical_appearance_name": graph[1],
        "colour_group_code": f"{min(n, 99):02d}",
        "colour_group_name": "No genre" if n == 0 else f"{n} genre" + ("s" if n > 1 else ""),
        "perceived_colour_value_id": mood[0],
        "perceived_colour_value_name": mood[1],
        "perceived_colour_master_id": fam_last[0],
        "perceived_colour_master_name": fam_last[1],
        "department_no": sum(1 << GENRES[g] for g in set(real)) if real else -1,
        "department_name": "/".join(real) if real else "Unknown",
        "index_code": period[0],
        "index_name": period[1],
        "index_group_no": fam_first[0],
        "index_group_name": fam_first[1],
        "section_no": GENRES[real[1]] if n > 1 else 0,
        "section_name": real[1] if n > 1 else "No second genre",
        "garment_group_no": recency[0],
        "garment_group_name": recency[1],
        "detail_desc": name if year is None else f"{name} ({year})",
    }


# ==========================================================================
# Conversion
# ==========================================================================
def convert_movielens(
    source: Path,
    out: Path,
    *,
    min_rating: int = 4,
    last_day: dt.date = dt.date(2020, 9, 22),
    progress: bool = False,
) -> dict:
    """Write MovieLens-100k from ``source`` (the recbole wheel or a folder of atomic files) into ``out``
    as ``articles.csv``, ``customers.csv``, ``transactions_train.csv`` (H&M format) and ``conversion.json``.

    See the module docstring for the mapping. Returns what ``conversion.json``
    holds. Raises ``MovieLensError`` on malformed input (nothing is written
    then) and when ``out`` holds an ``oracle/`` or ``drops/`` folder (a
    generated dataset: ingestion would attach its oracle to this data).
    """
    import pandas as pd
    import pyarrow as pa

    from hm_recsys import __version__
    from hm_recsys.data.hmcsv import (
        TransactionsCsvWriter,
        price_string_from_cents,
        write_articles_csv,
        write_customers_csv,
    )
    from hm_recsys.fsutil import file_sha256

    def say(msg: str) -> None:
        if progress:
            print(f"convert movielens: {msg}", file=sys.stderr, flush=True)

    out = Path(out)
    for stale in ("oracle", "drops"):
        if (out / stale).exists():
            raise MovieLensError(str(out / stale), "the output folder holds a generated dataset's "
                                 f"{stale}/; ingestion would mix it with MovieLens: use an empty folder")
    if isinstance(last_day, dt.datetime) or not isinstance(last_day, dt.date):
        raise TypeError(f"last_day must be a datetime.date, got {last_day!r}")
    raw, source_info = _read_sources(Path(source))
    atomic = {k: _parse_atomic(w, b, k) for k, (w, b) in raw.items()}
    del raw
    say(f"read {', '.join(f'{len(a.rows):,} {k} rows' for k, a in atomic.items())} from {source}")

    # -- users -> customers
    a = atomic["user"]
    customers: dict[int, dict[str, str]] = {}
    for line, r in a.rows:
        uid = _int(a, line, "user_id", r["user_id"], 1)
        if uid in customers:
            raise MovieLensError(a.where, f"duplicate user_id {uid}", line=line, field="user_id")
        age = None if r["age"] == "" else int(_number(a, line, "age", r["age"]))
        customers[uid] = _customer_row(uid, age, r["gender"], r["occupation"], r["zip_code"])
    if not customers:
        raise MovieLensError(a.where, "no users")

    # -- movies -> articles
    a = atomic["item"]
    articles: dict[int, dict] = {}
    years: dict[int, int | None] = {}
    for line, r in a.rows:
        mid = _int(a, line, "item_id", r["item_id"], 1, _MAX_ID)
        if mid in articles:
            raise MovieLensError(a.where, f"duplicate item_id {mid}", line=line, field="item_id")
        genres = r["class"].split()
        for g in genres:
            if g not in GENRES:
                raise MovieLensError(a.where, f"unknown genre {g!r} (MovieLens has {', '.join(GENRES)})",
                                     line=line, field="class")
        years[mid] = _year(r["release_year"])
        articles[mid] = _article_row(mid, r["movie_title"], years[mid], genres)
    if not articles:
        raise MovieLensError(a.where, "no movies")

    # -- ratings >= min_rating -> purchases
    a = atomic["inter"]
    kept: list[tuple[dt.date, str, int, int]] = []  # (day, customer_id, timestamp, movie id)
    n_ratings = 0
    for line, r in a.rows:
        uid = _int(a, line, "user_id", r["user_id"], 1)
        mid = _int(a, line, "item_id", r["item_id"], 1, _MAX_ID)
        rating = _number(a, line, "rating", r["rating"])
        ts = _number(a, line, "timestamp", r["timestamp"])
        if uid not in customers:
            raise MovieLensError(a.where, f"user {uid} is not in {FILES['user']}", line=line, field="user_id")
        if mid not in articles:
            raise MovieLensError(a.where, f"item {mid} is not in {FILES['item']}", line=line, field="item_id")
        try:
            day = dt.datetime.fromtimestamp(int(ts), dt.UTC).date()
        except (OverflowError, OSError, ValueError):
            raise MovieLensError(a.where, f"{r['timestamp']!r} is not a Unix time", line=line,
                                 field="timestamp") from None
        n_ratings += 1
        if rating >= min_rating:
            kept.append((day, customers[uid]["customer_id"], int(ts), mid))
    if not kept:
        raise MovieLensError(a.where, f"no rating >= {min_rating}: nothing to convert")
    source_first = min(k[0] for k in kept)
    source_last = max(k[0] for k in kept)
    shift = last_day - source_last
    first_day = source_first + shift
    if first_day.year < 1900:
        raise MovieLensError(a.where, f"shifting {source_first}..{source_last} to end on {last_day} starts before 1900")
    kept.sort(key=lambda k: (k[0], k[1], k[2], k[3]))
    say(f"{len(kept):,} of {n_ratings:,} ratings are >= {min_rating}; days shifted by {shift.days:+,}")

    # -- write
    out.mkdir(parents=True, exist_ok=True)
    art_rows = [articles[m] for m in sorted(articles)]
    art_df = pd.DataFrame(art_rows, columns=list(schema.ARTICLE_COLUMNS))
    for c in schema.ARTICLE_INT_COLUMNS:
        art_df[c] = art_df[c].astype("int64")
    write_articles_csv(art_df, out / schema.FILES["articles"])
    cust_rows = sorted(customers.values(), key=lambda r: r["customer_id"])
    write_customers_csv(
        pa.table({c: pa.array([r[c] for r in cust_rows], pa.string()) for c in schema.CUSTOMER_COLUMNS}),
        out / schema.FILES["customers"],
    )
    price_of = {m: price_string_from_cents(price_cents(y)) for m, y in years.items()}
    t_dat, cids, aids, prices, channels = [], [], [], [], []
    weeks: dict[dt.date, list] = {}
    for day, cid, _, mid in kept:
        d = day + shift
        t_dat.append(d.isoformat())
        cids.append(cid)
        aids.append(articles[mid]["article_id"])
        prices.append(price_of[mid])
        channels.append(1 if d.weekday() >= 5 else 2)
        wk = weeks.setdefault(schema.week_start(d), [0, set()])
        wk[0] += 1
        wk[1].add(cid)
    table = pa.table(
        {
            "t_dat": pa.array(t_dat, pa.string()),
            "customer_id": pa.array(cids, pa.string()),
            "article_id": pa.array(aids, pa.string()),
            "price": pa.array(prices, pa.string()),
            "sales_channel_id": pa.array(channels, pa.int8()),
        }
    )
    with TransactionsCsvWriter(out / schema.FILES["transactions"]) as w:
        w.write(table)
    say(f"wrote {out}")

    files = {name: file_sha256(out / name) for name in schema.FILES.values()}
    volume = _volume_outliers({w: n for w, (n, _) in weeks.items()}, last_day)
    for v in volume:
        say(f"note: week {v['week']} holds {v['ratio']}x the median of the {v['history_weeks']} weeks before it, "
            f"outside `hm-recsys validate`'s default band {tuple(v['band'])}: real bursts, see conversion.json")
    result = {
        "dataset": "MovieLens-100k (RecBole atomic files)",
        "source": {
            **source_info,
            "files": {FILES[k]: {"from": v.where, "sha256": v.sha256, "bytes": v.size} for k, v in atomic.items()},
        },
        "options": {"min_rating": min_rating, "last_day": last_day.isoformat()},
        "rows": {
            "ratings": n_ratings,
            "transactions": len(kept),
            "customers": len(customers),
            "articles": len(articles),
            "buyers": len(set(cids)),
            "articles_sold": len(set(aids)),
        },
        "dates": {
            "first": first_day.isoformat(),
            "last": last_day.isoformat(),
            "source_first": source_first.isoformat(),
            "source_last": source_last.isoformat(),
            "shift_days": shift.days,
            "weeks": len(weeks),
        },
        "online_share": round(sum(c == 2 for c in channels) / len(channels), 4),
        # Weeks `hm-recsys validate --history` rejects with its default volume band (real behaviour, kept as is).
        "volume_outliers": volume,
        "weeks": {w.isoformat(): {"rows": n, "buyers": len(b)} for w, (n, b) in sorted(weeks.items())},
        "files": files,
        "mapping": MAPPING,
        "genres": GENRES,
        "families": {name: list(gs) for _, name, gs in FAMILIES},
        "moods": {name: list(gs) for _, name, gs in MOODS},
        "written_by": f"hm-recsys {__version__} (hm_recsys.data.movielens)",
    }
    tmp = out / "conversion.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "conversion.json")
    return result


def _volume_outliers(week_rows: dict[dt.date, int], last_day: dt.date) -> list[dict]:
    """Weeks whose row count lies outside the history validator's default volume band (rows over the
    median of the weeks before it), computed as ``validate.weekly_volume_frame`` does (a last week cut
    short by ``last_day`` is not judged); [] if none."""
    import statistics

    from hm_recsys.data.validate import ValidationConfig

    cfg = ValidationConfig()
    lo, hi = cfg.volume_band
    weeks = sorted(week_rows)
    found = []
    for i, w in enumerate(weeks):
        prev = [week_rows[p] for p in weeks[max(0, i - cfg.history_weeks) : i]]
        if len(prev) < cfg.history_weeks or w + dt.timedelta(days=6) > last_day:
            continue
        ratio = week_rows[w] / statistics.median(prev)
        if not lo <= ratio <= hi:
            found.append({"week": w.isoformat(), "rows": week_rows[w], "ratio": round(ratio, 2),
                          "history_weeks": cfg.history_weeks, "band": [lo, hi]})
    return found


# ==========================================================================
# Fetching the wheel (the only networked path)
# ==========================================================================
def fetch_wheel(cache: Path, runner=subprocess.run) -> Path:
    """The recbole wheel in ``cache``, downloaded with pip if it is not there yet.

    Runs ``python -m pip download --no-deps --only-binary=:all: recbole==1.2.1 -d <cache>``:
    a wheel only, so nothing is built or executed. ``runner`` is for tests.
    """
    cache = Path(cache)
    wheel = cache / WHEEL_NAME
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"recbole=={RECBOLE_VERSION}", "-d", str(cache)]
    proc = runner(cmd, check=False)
    if proc.returncode != 0:
        raise MovieLensError(str(cache), f"`{' '.join(cmd)}` failed with exit status {proc.returncode}")
    if not wheel.is_file():
        raise MovieLensError(str(cache), f"pip download finished but {WHEEL_NAME} is not there")
    return wheel


# ==========================================================================
# CLI: hm-recsys convert movielens ...
# ==========================================================================


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hm-recsys convert",
        description="Convert a public dataset into the three H&M files (a real dev set). "
        "movielens: MovieLens-100k from the recbole 1.2.1 wheel (see docs/real-dev-set.md).",
    )
    p.add_argument("dataset", choices=["movielens"], help="the dataset to convert")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, metavar="PATH",
                     help=f"{WHEEL_NAME} (read with zipfile, never executed), or a folder holding "
                     f"{', '.join(FILES.values())}")
    src.add_argument("--fetch", action="store_true",
                     help=f"download {WHEEL_NAME} with pip into the cache first (the only networked path)")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help="--fetch: where the wheel is kept (default: $HM_RECSYS_HOME/cache/recbole)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--min-rating", type=int, default=4, metavar="N", help="ratings >= N become purchases (default: 4)")
    p.add_argument("--last-day", type=iso_date, default=dt.date(2020, 9, 22), metavar="YYYY-MM-DD",
                   help="the last purchase day after the shift (default: 2020-09-22)")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``hm-recsys convert movielens``: write MovieLens-100k as H&M files; print a summary."""
    args = _parser().parse_args(argv)
    try:
        if args.fetch:
            cache = args.cache
            if cache is None:
                from hm_recsys.config import Settings

                cache = Settings.from_env().home / "cache" / "recbole"
            source = fetch_wheel(cache)
        else:
            source = args.wheel
        res = convert_movielens(source, args.out, min_rating=args.min_rating, last_day=args.last_day,
                                progress=not args.no_progress)
    except MovieLensError as exc:
        print(f"hm-recsys convert: error: {exc}", file=sys.stderr)
        return 2
    r, d = res["rows"], res["dates"]
    buf = io.StringIO()
    buf.write(
        f"wrote {args.out}: {r['customers']:,} customers, {r['articles']:,} articles, {r['transactions']:,} "
        f"transaction rows (ratings >= {args.min_rating} of {r['ratings']:,}; {d['first']}..{d['last']}, "
        f"{d['weeks']} H&M weeks, {res['online_share']:.1%} online)\n"
        f"source sha256 {res['source']['sha256']}; details in {Path(args.out) / 'conversion.json'}\n"
        "last weeks:  week        rows  buyers\n"
    )
    for wk, v in list(res["weeks"].items())[-6:]:
        buf.write(f"             {wk}  {v['rows']:>5,}  {v['buyers']:>6,}\n")
    for v in res["volume_outliers"]:
        buf.write(
            f"note: week {v['week']} holds {v['ratio']}x the median of the {v['history_weeks']} weeks before it "
            f"(real behaviour); `hm-recsys validate --history` rejects that with its default band "
            f"{tuple(v['band'])}: pass --volume-band {v['band'][0]} {max(6, int(v['ratio']) + 1)}\n"
        )
    print(buf.getvalue(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
