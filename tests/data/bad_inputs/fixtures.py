"""Session data shared by the validation tests: the tiny dataset with 4 weekly drops, and its history warehouse.

Built once per test session (a few seconds), whichever test module asks first;
tests copy the warehouse before mutating it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

SEED = 7
DROP_WEEKS = 4


@dataclass(frozen=True)
class TinyDrops:
    raw: Path  # articles.csv, customers.csv, transactions_train.csv (history), drops/, oracle/
    warehouse: Path  # the history ingested (read-only: copy before mutating)

    @property
    def drops(self) -> list[Path]:
        return sorted((self.raw / "drops").glob("transactions_*.csv"))

    @property
    def hidden_week(self) -> Path:
        return self.raw / "oracle" / "future_transactions.csv"

    def warehouse_copy(self, dst: Path) -> Path:
        shutil.copytree(self.warehouse, dst)
        return dst


_CACHE: dict[str, TinyDrops] = {}


def tiny_drops(tmp_path_factory) -> TinyDrops:
    if "tiny" not in _CACHE:
        from hm_recsys.data.ingest import ingest_history
        from hm_recsys.data.synthetic import generate

        raw = tmp_path_factory.mktemp("tiny_drops_raw")
        generate(raw, scale="tiny", seed=SEED, progress=False, drop_weeks=DROP_WEEKS)
        wh = tmp_path_factory.mktemp("tiny_drops_wh") / "warehouse"
        ingest_history(raw, wh, progress=False)
        _CACHE["tiny"] = TinyDrops(raw, wh)
    return _CACHE["tiny"]
