"""The pipeline's steps, one function per Airflow task (and per CLI verb).

Each step is a transaction over explicit inputs: it takes small JSON-able
dicts (ids, paths, the run's params), reads and writes fixed locations derived
from them, and returns a small dict for the next step. Nothing here reads
"now" or "latest": the split comes from the params or the warehouse, and each
step is safe to retry (it finds and returns what an earlier attempt made).

The DAG files call these functions and nothing else; so do the CLI verbs, so
the whole flow also runs without Airflow.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from hm_recsys.config import Settings
from hm_recsys.data.warehouse import Warehouse
from hm_recsys.split import Split

SNAPSHOT_MANIFEST = "snapshot.json"


class PipelineError(RuntimeError):
    """A step cannot go on; the message says why and what to do."""


def run_key(run_id: str) -> str:
    """A file-name-safe form of an Airflow (or CLI) run id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_") or "run"


def run_date(context: Mapping) -> dt.date:
    """The date a run is "as of": its data interval end, else its logical date, else when it was queued.

    Airflow 3 manual runs may have no logical date; then the run's own
    creation time is the reference, never the wall clock of a retry.
    """
    for key in ("data_interval_end", "logical_date"):
        value = context.get(key)
        if value is not None:
            return value.date()
    dag_run = context.get("dag_run")
    for attr in ("run_after", "queued_at", "start_date"):
        value = getattr(dag_run, attr, None)
        if value is not None:
            return value.date()
    raise PipelineError("the run has no data interval, logical date or queue time to date it")


# -- check_data -------------------------------------------------------------------
def check_data(params: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Derive the split from the params and the warehouse; fail early if weeks are missing."""
    settings = settings or Settings.from_env()
    wh = Warehouse(settings.layout.warehouse_dir)
    holdout = params.get("holdout_week")
    try:
        split = Split.from_warehouse(
            wh,
            train_weeks=int(params.get("train_weeks") or 12),
            holdout_week=dt.date.fromisoformat(holdout) if holdout else None,
        )
    except ValueError as e:
        raise PipelineError(f"cannot train: {e}") from e
    if params.get("force_promote") and not (params.get("force_reason") or "").strip():
        raise PipelineError("force_promote is set but force_reason is empty: say why the gate is overridden")
    print(f"split: {split.describe()}")
    return {"split": split.to_dict(), "warehouse": str(wh.root)}


# -- build_snapshot ----------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # warehouse files are immutable once committed: a hard link is a free copy
    except OSError:
        shutil.copy2(src, dst)


def build_snapshot(checked: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Freeze the split's partitions into ``runs/<run>/snapshot`` (itself a warehouse).

    Drops ingested after this point do not change what this run trains and
    scores on. Returns the snapshot path and a content hash of its files.
    Idempotent: an existing complete snapshot is returned as is.
    """
    settings = settings or Settings.from_env()
    split = Split.from_dict(checked["split"])
    src = Warehouse(checked["warehouse"])
    dst_root = settings.layout.run_dir(run_key(run_id)) / "snapshot"
    manifest_path = dst_root / SNAPSHOT_MANIFEST
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())

    dst_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".snapshot.", dir=dst_root.parent))
    try:
        dst = Warehouse(tmp)
        files: list[tuple[Path, Path]] = [
            (src.paths.articles, dst.paths.articles),
            (src.paths.customers, dst.paths.customers),
        ]
        for week in split.all_weeks():
            for part in src.part_files(week):
                files.append((part, dst.paths.week_dir(week) / part.name))
        if src.paths.oracle_dir.exists():
            for f in sorted(src.paths.oracle_dir.rglob("*")):
                if f.is_file():
                    files.append((f, dst.paths.oracle_dir / f.relative_to(src.paths.oracle_dir)))
        digest = hashlib.sha256()
        for s, d in files:
            _link_or_copy(s, d)
            digest.update(f"{d.relative_to(tmp)}\0{_sha256(d)}\n".encode())
        out = {
            "split": split.to_dict(),
            "warehouse": str(dst_root),
            "data_hash": digest.hexdigest(),
            "files": len(files),
        }
        (tmp / SNAPSHOT_MANIFEST).write_text(json.dumps(out, indent=2))
        if dst_root.exists():  # a previous attempt died before writing its manifest
            shutil.rmtree(dst_root)
        os.replace(tmp, dst_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"snapshot: {out['files']} files, data hash {out['data_hash'][:12]} at {dst_root}")
    return out


# -- promote / keep / report ---------------------------------------------------------
def promote(decision: Mapping, settings: Settings | None = None) -> dict:
    """Move ``champion`` to the decided version; idempotent (a retry finds it done)."""
    from hm_recsys.registry import Registry

    if not decision.get("promote"):
        raise PipelineError(f"the gate did not promote version {decision.get('version')}: {decision.get('reason')}")
    reg = Registry(settings)
    aliases = reg.promote(decision["version"])
    reg.tag(decision["version"], {"promoted": "true"})
    print(f"promoted version {decision['version']}: aliases now {aliases}")
    return {"version": str(decision["version"]), "aliases": aliases}


def keep_champion(decision: Mapping) -> dict:
    """The gate said no: nothing changes. The reason is already on the version's tags."""
    print(f"keeping the champion; version {decision['version']} not promoted: {decision['reason']}")
    return {"version": str(decision["version"]), "promoted": False, "reason": decision["reason"]}


def report(decision: Mapping) -> dict:
    """Print the comparison table and where to look."""
    print(decision.get("table", ""))
    print(f"decision: {'PROMOTE' if decision['promote'] else 'KEEP CHAMPION'} — {decision['reason']}")
    ui = os.environ.get("HM_RECSYS_MLFLOW_UI", "http://127.0.0.1:5000")
    print(f"MLflow run: {ui}/#/experiments/{decision.get('experiment_id', '')}/runs/{decision.get('mlflow_run_id', '')}")
    return {"version": decision["version"], "promote": decision["promote"], "reason": decision["reason"]}
