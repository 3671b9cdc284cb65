"""What a drop is compared with: the warehouse's catalogue ids, recent weekly volumes, ids seen before."""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hm_recsys.data import schema
from hm_recsys.data.validation.results import ValidationSetupError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from hm_recsys.data.validation.config import ValidationConfig

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i


def _fixed_width(arr: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes (m, width) uint8, mask (n,))``: the values exactly ``width`` bytes long, as a 2-D view."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = arr.cast(pa.string())
    ok = pc.fill_null(pc.equal(pc.binary_length(arr), width), False)
    mask = ok.to_numpy(zero_copy_only=False)
    if not mask.all():
        arr = arr.filter(ok)
    if len(arr) == 0:
        return np.empty((0, width), np.uint8), mask
    arr = pa.concat_arrays([arr])  # offsets of a fresh array start at 0
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=width * len(arr))
    return data.reshape(len(arr), width), mask


class IdIndex:
    """Positions of ids in a catalogue column, looked up by 64-bit integer keys (fast and exact).

    ``kind="article"``: 10-digit ids, the key is the number itself. ``kind="hex64"``:
    customer ids, the key is the first 16 hex digits; ``positions`` then
    compares the full text of every match, so a lookup is exact. Hashing
    64-char strings is ~20x slower than integers, and the never-seen check
    looks up every id of every past week (16M at full scale).
    """

    def __init__(self, ids: pa.Array, kind: str):
        import pandas as pd
        import pyarrow as pa
        import pyarrow.compute as pc

        self.kind = kind
        self.ids = pc.unique(ids.cast(pa.string()))
        keys, ok = self._keys(self.ids)
        self._ok_pos = np.flatnonzero(ok)  # catalogue positions with a well-formed id
        index = pd.Index(keys)
        self._exact = index.is_unique  # else (two ids share 64 bits): fall back to full strings
        self._index = index if self._exact else pd.Index(self.ids.filter(pa.array(ok)).to_pandas())

    def __len__(self) -> int:
        return len(self.ids)

    def _keys(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(keys of the well-formed values, mask of the well-formed values)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.kind == "article":
            ok = pc.fill_null(pc.match_substring_regex(values.cast(pa.string()), schema.ARTICLE_ID.pattern), False)
            mask = ok.to_numpy(zero_copy_only=False)
            keys = pc.cast(values.filter(ok), pa.int64()).to_numpy(zero_copy_only=False)
            return keys, mask
        raw, mask = _fixed_width(values, 64)
        nib = _HEX_VALUE[raw[:, :16]]
        hexok = (nib != 255).all(axis=1)
        if not hexok.all():
            mask[np.flatnonzero(mask)[~hexok]] = False
            nib = nib[hexok]
        keys = np.zeros(len(nib), dtype=np.uint64)
        for j in range(16):
            keys = (keys << np.uint64(4)) | nib[:, j].astype(np.uint64)
        return keys, mask

    def positions(self, values, verify: bool = True) -> np.ndarray:
        """Catalogue position of each value, -1 when absent or malformed. ``verify=False`` skips the
        full-text comparison (only for ids already known to come from the catalogue)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        values = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        out = np.full(len(values), -1, dtype=np.int64)
        if self._exact:
            keys, mask = self._keys(values)
            pos = self._index.get_indexer(keys)
        else:
            mask = np.ones(len(values), bool)
            pos = self._index.get_indexer(values.to_pandas())
        found = pos >= 0
        cat = np.full(len(pos), -1, dtype=np.int64)
        cat[found] = self._ok_pos[pos[found]]
        if verify and self.kind == "hex64" and found.any():
            idx = np.flatnonzero(mask)[found]
            same = pc.equal(self.ids.take(pa.array(cat[found])), values.take(pa.array(idx)).cast(pa.string()))
            cat[np.flatnonzero(found)[~same.to_numpy(zero_copy_only=False)]] = -1
        out[np.flatnonzero(mask)] = cat
        return out

    def mark_seen(self, seen: np.ndarray, arrays) -> None:
        """Set ``seen[position]`` for every catalogue id occurring in ``arrays`` (dictionaries of past weeks)."""
        for a in arrays:
            pos = self.positions(a, verify=False)
            seen[pos[pos >= 0]] = True


@dataclass
class DropReference:
    """Reference data for validating a drop (read from the warehouse) or a history batch.

    ``articles``/``customers``: the catalogue ids. ``week_rows``: row counts of
    the warehouse weeks before the declared week (oldest first).
    ``seen_articles``/``seen_customers``: per catalogue position, whether the id
    occurs in any transaction before the declared week; ``None`` when there are
    fewer than ``history_weeks`` weeks of it. ``loaded_parts``: part files
    already in the declared week.
    """

    articles: IdIndex
    customers: IdIndex
    week_rows: dict[dt.date, int] = field(default_factory=dict)
    seen_articles: np.ndarray | None = None
    seen_customers: np.ndarray | None = None
    loaded_parts: list[Path] = field(default_factory=list)


def _dictionaries(col) -> Iterator[pa.Array]:
    """The distinct values of each chunk of a (dictionary-encoded) column, chunk by chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            # ingestion builds each dictionary from its row group, but a sliced one may hold unused values
            yield chunk.dictionary.take(pc.unique(chunk.indices.drop_null()))
        else:
            yield pc.unique(chunk)


def load_reference(warehouse_dir: Path, week: dt.date | None, config: ValidationConfig) -> DropReference:
    """Read what a drop for ``week`` is compared with (see ``DropReference``).

    Row counts come from Parquet metadata; the seen-before marks read only the
    dictionaries of the two id columns of the earlier weeks. Raises
    ``ValidationSetupError`` when the warehouse has no catalogue yet.
    """
    import pyarrow.parquet as pq

    from hm_recsys.data.warehouse import Warehouse

    wh = Warehouse(warehouse_dir)
    for p in (wh.paths.articles, wh.paths.customers):
        if not p.is_file():
            raise ValidationSetupError(
                f"{p} does not exist: drops are checked against the warehouse's catalogue; "
                "ingest the history first (`hm-recsys ingest --raw`)"
            )
    ref = DropReference(
        articles=IdIndex(pq.read_table(wh.paths.articles, columns=["article_id"]).column(0).combine_chunks(),
                         "article"),
        customers=IdIndex(pq.read_table(wh.paths.customers, columns=["customer_id"]).column(0).combine_chunks(),
                          "hex64"),
    )
    weeks = [w for w in wh.weeks() if week is None or w < week]
    for w in weeks:
        ref.week_rows[w] = sum(pq.ParquetFile(f).metadata.num_rows for f in wh.part_files(w))
    if week is not None:
        ref.loaded_parts = wh.part_files(week)
        if len(weeks) >= config.history_weeks:
            ref.seen_articles = np.zeros(len(ref.articles), dtype=bool)
            ref.seen_customers = np.zeros(len(ref.customers), dtype=bool)
            for f in (f for w in weeks for f in wh.part_files(w)):
                t = pq.read_table(f, columns=["article_id", "customer_id"])
                ref.articles.mark_seen(ref.seen_articles, _dictionaries(t.column("article_id")))
                ref.customers.mark_seen(ref.seen_customers, _dictionaries(t.column("customer_id")))
    return ref


def too_little_history(weeks: int, config: ValidationConfig) -> str:
    return f"the warehouse has {weeks} week(s) before this one; the check needs {config.history_weeks}"


def volume_bounds(ref: DropReference, config: ValidationConfig) -> tuple[tuple[int, int] | None, str]:
    """``((min, max) rows, note)`` for a drop, or ``(None, why skipped)``."""
    weeks = sorted(ref.week_rows)[-config.history_weeks :]
    if len(weeks) < config.history_weeks:
        return None, too_little_history(len(ref.week_rows), config)
    med = statistics.median(ref.week_rows[w] for w in weeks)
    lo, hi = config.volume_band
    return (math.floor(lo * med), math.ceil(hi * med)), (
        f"median of {len(weeks)} weeks {weeks[0]}..{weeks[-1]} = {med:g} rows; band {lo:g}x..{hi:g}x"
    )
