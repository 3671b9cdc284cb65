"""The one place that knows where things live under the runtime folder.

No other module builds these paths from strings: ask a ``Layout``. Keeping the
contract here means moving a folder is a one-line change, and tests can point
a whole run at a temporary directory by building ``Layout(tmp_path)``.

::

    $HM_RECSYS_HOME/
      data/raw/                       the three H&M CSVs (generated or real Kaggle)
      data/raw/oracle/                generator-only truth (never mixed into the CSVs)
      data/incoming/                  weekly transaction drops waiting to be processed
      data/quarantine/<drop>/         rejected drops, byte for byte, with their reports
      data/processed/                 accepted drops, kept for audit
      data/validation/history/        report of the last validation of the initial history
      data/validation/drops/<drop>/   report.json + drift.png of each accepted drop (rejected: in quarantine/<drop>/)
      data/warehouse/
        articles.parquet
        customers.parquet
        transactions/week=YYYY-MM-DD/part-<source>.parquet
        oracle/                       copy of raw/oracle at ingest time (if present)
        _drops.json                   ledger of ingested sources by content hash
        _commit.json                  rename journal of an ingest being committed (roll-forward on crash)
        _ingest.lock                  flock held by a running ingest
      mlflow/                         sqlite DB + artifacts (embedded default)
      airflow/                        AIRFLOW_HOME (DB, logs)
      bentoml/                        BENTOML_HOME
      runs/                           scratch space for stage outputs, keyed by run id
      locks/                          flock files: one writer of the registry's aliases / served states
      models/<version>/bundle/        local copies of registered versions (fetched from MLflow)
      models/<version>/served/<as_of>/  served states of a version (built here or fetched from MLflow)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths under the runtime folder ``home``; ``data_root`` moves the parts hosts share.

    On one machine both are the same folder. With workers on several hosts
    (CeleryExecutor, docs/operations.md) ``data_root`` is the one shared
    folder: ``data/`` (incoming drops, warehouse, quarantine, reports),
    ``runs/`` (a pipeline run's snapshot and gate states, which later tasks of
    the run read on whichever worker they land) and ``locks/``. Everything
    else under ``home`` is private to the host: caches of what MLflow serves
    (``models/``), Airflow's and BentoML's homes, the embedded sqlite MLflow.
    """

    home: Path
    data_root: Path | None = None

    @property
    def shared(self) -> Path:
        """The folder every host sees: ``data_root``, or ``home`` on a single machine."""
        return self.data_root or self.home

    def to_shared(self, path: str | Path) -> str:
        """``path`` relative to the shared root, for XCom: it names the same file on every host."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.shared.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not under the shared data root {self.shared}; only paths there "
                             "mean the same on another worker") from None

    def from_shared(self, path: str | Path) -> Path:
        """The local path of a ``to_shared`` path (an absolute path is returned as is)."""
        path = Path(path)
        return path if path.is_absolute() else self.shared / path

    # -- data -------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.shared / "data"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def processed_dir(self) -> Path:
        return self.data_dir / "processed"

    @property
    def warehouse_dir(self) -> Path:
        return self.data_dir / "warehouse"

    @property
    def validation_dir(self) -> Path:
        """Reports of ``hm-recsys validate --history`` (``history/report.json`` + ``data_docs/``)."""
        return self.data_dir / "validation"

    # -- services ---------------------------------------------------------
    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def runs_dir(self) -> Path:
        return self.shared / "runs"

    @property
    def locks_dir(self) -> Path:
        """``flock`` files of the registry's writers; shared, so writers on two hosts exclude each other."""
        return self.shared / "locks"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def model_dir(self, version: str) -> Path:
        """Local copy of one registered version: ``bundle/`` and ``served/<as_of>/``."""
        return self.models_dir / str(version)

    def state_dir(self, version: str, as_of) -> Path:
        """Local copy of one served state of a version (``hm_recsys.served``), as of an ISO date."""
        return self.model_dir(version) / "served" / str(as_of)

    def run_dir(self, run_id: str) -> Path:
        """Scratch folder for one pipeline run (snapshot, checkpoints, index)."""
        return self.runs_dir / run_id

    def bundle_dir(self, run_id: str) -> Path:
        """The trained-model bundle of an MLflow training run (see ``hm_recsys.bundle``)."""
        return self.run_dir(run_id) / "bundle"

    def train_scratch_dir(self, run_id: str) -> Path:
        """Weekly training shards of a run; deleted when training ends."""
        return self.run_dir(run_id) / "train-shards"

    @property
    def drop_reports_dir(self) -> Path:
        """Reports of accepted drops, one ``<stem>-<sha12>/`` folder each (``report.json``, ``drift.png``)."""
        return self.validation_dir / "drops"


@dataclass(frozen=True)
class WarehouseLayout:
    """Paths inside the Parquet warehouse."""

    root: Path

    @property
    def articles(self) -> Path:
        return self.root / "articles.parquet"

    @property
    def customers(self) -> Path:
        return self.root / "customers.parquet"

    @property
    def transactions_dir(self) -> Path:
        return self.root / "transactions"

    @property
    def oracle_dir(self) -> Path:
        return self.root / "oracle"

    @property
    def drops_ledger(self) -> Path:
        return self.root / "_drops.json"

    @property
    def commit_journal(self) -> Path:
        """Present only while an ingest commits (or after it crashed mid-commit): its rename list."""
        return self.root / "_commit.json"

    @property
    def lock_file(self) -> Path:
        """``flock``-ed by every ingest so two writers never interleave."""
        return self.root / "_ingest.lock"

    def week_dir(self, week_start: dt.date) -> Path:
        return self.transactions_dir / f"week={week_start.isoformat()}"

    def week_part(self, week_start: dt.date, source: str) -> Path:
        """One source's rows for one week. ``source`` is ``history`` or ``drop-<sha12>``."""
        return self.week_dir(week_start) / f"part-{source}.parquet"
