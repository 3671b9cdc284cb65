"""Read side of the Parquet warehouse that ``hm_recsys.data.ingest`` writes.

Every later stage (snapshot, features, training, evaluation, validation's
"recent weeks" statistics) reads the warehouse through this class, never by
globbing files itself.

Physical types (compact, exact round trip to the H&M CSVs):

=================  =========================  ====================================
table / column     Parquet                    pandas (as returned here)
=================  =========================  ====================================
t_dat              date32                     datetime64[s]
customer_id        dictionary<string>         category
article_id         dictionary<string>         category (10-char zero-padded)
price              float64                    float64 (exact: the CSV's value)
sales_channel_id   int8                       int8
=================  =========================  ====================================

Articles: ``article_id``/``product_code``/``colour_group_code`` strings, the
``*_no``/``*_id`` columns int32, names as category, ``detail_desc`` string
with nulls. Customers: ``FN``/``Active`` float32 (1.0 or NaN), ``age`` nullable
UInt8, the status columns as strings that keep the literal "None" apart from
the empty string.

Consistency: ingestion makes a batch of files visible through a rename
journal (``_commit.json``). While one is present a commit is half applied
(it crashed): every read raises ``WarehouseInterrupted`` until the next
``hm-recsys ingest`` rolls it forward.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path

from hm_recsys.data.schema import week_start
from hm_recsys.layout import WarehouseLayout


class WarehouseEmpty(RuntimeError):
    """The warehouse has no transactions yet: run ``hm-recsys ingest`` first."""


class WarehouseInterrupted(RuntimeError):
    """An ingest crashed while committing; the files are a mix of before and after."""


class Warehouse:
    def __init__(self, root: Path | str):
        self.paths = WarehouseLayout(Path(root))

    @property
    def root(self) -> Path:
        return self.paths.root

    def _check_committed(self) -> None:
        if self.paths.commit_journal.exists():
            raise WarehouseInterrupted(
                f"{self.paths.root}: an ingest was interrupted while committing "
                f"({self.paths.commit_journal.name} present); run any `hm-recsys ingest` to finish it"
            )

    def drops(self) -> dict[str, dict]:
        """The drops ledger ``{sha256: {"source", "rows", "weeks", "parts", "ingested_at"}}``, in ingestion order."""
        import json

        self._check_committed()
        ledger = self.paths.drops_ledger
        return json.loads(ledger.read_text(encoding="utf-8")) if ledger.exists() else {}

    # -- partitions ---------------------------------------------------------
    def weeks(self) -> list[dt.date]:
        """Sorted week labels (Wednesdays) that have at least one committed part file.

        Temporary files from an interrupted write (``*.tmp``) are not parts
        and are never visible here.
        """
        self._check_committed()
        tdir = self.paths.transactions_dir
        if not tdir.exists():
            return []
        out = []
        for d in tdir.iterdir():
            if d.is_dir() and d.name.startswith("week=") and any(d.glob("part-*.parquet")):
                out.append(dt.date.fromisoformat(d.name.removeprefix("week=")))
        return sorted(out)

    def part_files(self, week: dt.date) -> list[Path]:
        self._check_committed()
        return sorted(self.paths.week_dir(week).glob("part-*.parquet"))

    def last_date(self) -> dt.date:
        """The last transaction date in the warehouse."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        weeks = self.weeks()
        if not weeks:
            raise WarehouseEmpty(f"no transactions under {self.paths.transactions_dir}; run `hm-recsys ingest`")
        last = None
        for f in self.part_files(weeks[-1]):
            m = pc.max(pq.read_table(f, columns=["t_dat"])["t_dat"]).as_py()
            last = m if last is None or (m is not None and m > last) else last
        return last

    def last_complete_week(self) -> dt.date:
        """The latest week whose Tuesday is covered by the data: the default holdout."""
        last = self.last_date()
        ws = week_start(last)
        if last == ws + dt.timedelta(days=6):
            return ws
        return ws - dt.timedelta(days=7)

    # -- tables --------------------------------------------------------------
    def transactions(
        self,
        start: dt.date,
        end: dt.date,
        columns: Sequence[str] | None = None,
    ):
        """Transactions with ``start <= t_dat < end`` as one DataFrame."""
        import pandas as pd

        frames = [df for _, df in self.iter_weeks(start, end, columns)]
        if not frames:
            return self._empty_transactions(columns)
        out = pd.concat(frames, ignore_index=True)
        for c in ("customer_id", "article_id"):
            if c in out.columns and out[c].dtype != "category":
                out[c] = out[c].astype("category")
        return out

    def iter_weeks(
        self,
        start: dt.date,
        end: dt.date,
        columns: Sequence[str] | None = None,
    ) -> Iterator[tuple[dt.date, object]]:
        """Yield ``(week, DataFrame)`` one H&M week at a time, rows limited to ``[start, end)``.

        Memory stays bounded by one week, whatever the window.
        """
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = list(columns) if columns is not None else None
        read_cols = None if cols is None else sorted(set(cols) | {"t_dat"}, key=lambda c: (c != "t_dat", c))
        first = week_start(start)
        for week in self.weeks():
            if week < first or week >= end:
                continue
            tables = [pq.read_table(f, columns=read_cols) for f in self.part_files(week)]
            table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
            # date32 would come back as Python date objects; the documented dtype is datetime64[s].
            df = table.to_pandas(date_as_object=False)
            df["t_dat"] = df["t_dat"].astype("datetime64[s]")
            t = df["t_dat"]
            df = df[(t >= pd.Timestamp(start)) & (t < pd.Timestamp(end))]
            if cols is not None:
                df = df[cols]
            yield week, df.reset_index(drop=True)

    def articles(self):
        """One row per article (105,542 on the real data); types as in the module doc."""
        import pyarrow.parquet as pq

        self._check_committed()
        return pq.read_table(self.paths.articles).to_pandas()

    def customers(self):
        """One row per customer; ``age`` as nullable UInt8 (Arrow's default would turn it into float64)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._check_committed()
        return pq.read_table(self.paths.customers).to_pandas(types_mapper={pa.uint8(): pd.UInt8Dtype()}.get)

    def _empty_transactions(self, columns):
        import pandas as pd

        df = pd.DataFrame(
            {
                "t_dat": pd.Series([], dtype="datetime64[s]"),
                "customer_id": pd.Series([], dtype="category"),
                "article_id": pd.Series([], dtype="category"),
                "price": pd.Series([], dtype="float64"),
                "sales_channel_id": pd.Series([], dtype="int8"),
            }
        )
        return df if columns is None else df[list(columns)]
