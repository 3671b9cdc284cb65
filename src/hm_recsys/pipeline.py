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
import sys
from collections.abc import Mapping
from pathlib import Path

from hm_recsys.config import Settings
from hm_recsys.data.warehouse import Warehouse
from hm_recsys.fsutil import file_sha256, staged_dir
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

    # An existing folder without a manifest is a previous attempt that died: staged_dir replaces it.
    with staged_dir(dst_root) as tmp:
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
            digest.update(f"{d.relative_to(tmp)}\0{file_sha256(d)}\n".encode())
        out = {
            "split": split.to_dict(),
            "warehouse": str(dst_root),
            "data_hash": digest.hexdigest(),
            "files": len(files),
        }
        (tmp / SNAPSHOT_MANIFEST).write_text(json.dumps(out, indent=2))
    print(f"snapshot: {out['files']} files, data hash {out['data_hash'][:12]} at {dst_root}")
    return out


# -- train ---------------------------------------------------------------------------
def _overrides(params: Mapping) -> list[str]:
    out = [str(o).strip() for o in (params.get("overrides") or []) if str(o).strip()]
    if params.get("epochs"):
        out.append(f"train.epochs={int(params['epochs'])}")
    return out


def _finished_run(settings: Settings, run_id: str):
    """The finished MLflow training run an earlier attempt of this pipeline run made, if any."""
    import mlflow

    from hm_recsys import tracking

    exp_id = tracking.configure(settings)
    runs = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.airflow_run_id = '{run_id}' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return runs[0] if runs else None


def train(snapshot: Mapping, params: Mapping, run_id: str, settings: Settings | None = None,
          progress: bool = False) -> dict:
    """Train on the snapshot and log the run; a retry reuses a finished run of the same pipeline run."""
    import mlflow

    from hm_recsys import train as training
    from hm_recsys.registry import BUNDLE_ARTIFACT

    settings = settings or Settings.from_env()
    split = Split.from_dict(snapshot["split"])
    done = _finished_run(settings, run_id)
    if done is not None:
        mlflow_run_id = done.info.run_id
        bundle_dir = settings.layout.bundle_dir(mlflow_run_id)
        print(f"reusing finished MLflow run {mlflow_run_id} of this pipeline run")
        model_uri = done.data.tags.get("model_uri", "")
    else:
        config = training.load_config(params.get("config"), overrides=_overrides(params))
        result = training.run_training(
            settings, config, split=split, run_name=f"retrain {run_key(run_id)}",
            tags={"airflow_run_id": run_id, "snapshot_sha256": snapshot["data_hash"]},
            progress=progress, warehouse=snapshot["warehouse"],
        )
        print(result.table)
        mlflow_run_id, bundle_dir, model_uri = result.run_id, result.bundle_dir, result.model_uri
        with mlflow.start_run(run_id=mlflow_run_id):
            # The bundle also as a plain run artifact: what Registry.fetch downloads for serving.
            mlflow.log_artifacts(str(bundle_dir), BUNDLE_ARTIFACT)
            mlflow.set_tag("model_uri", model_uri)
    return {
        "mlflow_run_id": mlflow_run_id,
        "bundle_dir": str(bundle_dir),
        "model_uri": model_uri,
        "split": split.to_dict(),
        "warehouse": snapshot["warehouse"],
        "data_hash": snapshot["data_hash"],
    }


# -- register ------------------------------------------------------------------------
def register(trained: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Register the run's model (alias challenger); the Airflow run id makes it idempotent."""
    from hm_recsys.registry import Registry

    reg = Registry(settings)
    split = Split.from_dict(trained["split"])
    v = reg.register(
        trained["mlflow_run_id"],
        model_uri=trained.get("model_uri") or None,
        idempotency_key=run_id,
        tags={
            "airflow_run_id": run_id,
            "data_window": split.describe(),
            "holdout_start": split.holdout_start.isoformat(),
            "data_sha256": trained["data_hash"],
            "bundle_artifact": "bundle",
        },
    )
    print(f"registered {reg.name} version {v.version} (alias challenger) from run {trained['mlflow_run_id']}")
    return {**trained, "version": v.version}


# -- build_index -----------------------------------------------------------------------
def build_index(registered: Mapping, run_id: str, settings: Settings | None = None,
                min_recall: float = 0.98) -> dict:
    """Build the version's ScaNN index, log it with the version's run, cache both locally."""
    import mlflow

    from hm_recsys import bundle, evaluate
    from hm_recsys.index import IndexFailure, build_index as build, verify_index
    from hm_recsys.registry import INDEX_ARTIFACT, Registry

    settings = settings or Settings.from_env()
    reg = Registry(settings)
    version = str(registered["version"])
    local = settings.layout.model_dir(version)
    index_dir = local / "index"
    try:
        manifest = verify_index(index_dir, expected_model_version=version)
        print(f"index for version {version} already built and verified")
    except IndexFailure:
        rec = bundle.load(registered["bundle_dir"])
        split = Split.from_dict(registered["split"])
        truth = evaluate.holdout_truth(Warehouse(registered["warehouse"]), split)
        queries = rec.customer_embeddings(list(truth.customer_ids))
        manifest = build(rec.article_ids, rec.article_embeddings(), index_dir, model_version=version,
                         eval_queries=queries, min_recall=min_recall)
        print(f"index: {manifest.n_articles:,} articles, recall@12 vs exact {manifest.recall_at_12_vs_exact:.4f}")
    if not (local / "bundle").exists():
        shutil.copytree(registered["bundle_dir"], local / "bundle")
    with mlflow.start_run(run_id=registered["mlflow_run_id"]):
        mlflow.log_artifacts(str(index_dir), INDEX_ARTIFACT)
        mlflow.log_metric("index_recall_at_12_vs_exact", manifest.recall_at_12_vs_exact)
    reg.tag(version, {"index_recall_at_12_vs_exact": manifest.recall_at_12_vs_exact,
                      "index_sha256": manifest.embedding_sha256, "index_artifact": INDEX_ARTIFACT})
    return {**registered, "index_dir": str(index_dir), "index_recall": manifest.recall_at_12_vs_exact}


# -- evaluate (the gate) -------------------------------------------------------------------
def _served_predictions(bundle_dir: Path, index_dir: Path, version: str, warehouse: Warehouse, split: Split,
                        customers: list[str], k: int = 100) -> dict[str, list[str]]:
    """Rankings exactly as serving would produce them: bundle -> customer tower -> the version's index.

    Customer histories are replayed up to the holdout start, so an older
    champion sees the same information as the challenger.
    """
    from hm_recsys import bundle, evaluate
    from hm_recsys.index import load_index

    rec = bundle.load(bundle_dir)
    if rec.as_of != split.holdout_start:
        rec = rec.with_history(warehouse, split.holdout_start, progress=False)
    index, _ = load_index(index_dir, expected_model_version=version, expected_dim=rec.dim)
    rows, _ = index.search(rec.customer_embeddings(customers), k)
    return evaluate.predictions_from_index(customers, index.article_ids, rows)


def evaluate(indexed: Mapping, params: Mapping, run_id: str | None = None, settings: Settings | None = None) -> dict:
    """Challenger vs champion vs popularity (vs oracle) on the same holdout; record the gate's decision."""
    import mlflow

    from hm_recsys import evaluate as ev
    from hm_recsys.gate import GateConfig, decide
    from hm_recsys.registry import CHAMPION, Registry

    settings = settings or Settings.from_env()
    reg = Registry(settings)
    version = str(indexed["version"])
    split = Split.from_dict(indexed["split"])
    wh = Warehouse(indexed["warehouse"])
    truth = ev.holdout_truth(wh, split)
    customers = list(truth.customer_ids)

    models: dict[str, dict[str, list[str]]] = {
        f"challenger v{version}": _served_predictions(Path(indexed["bundle_dir"]), Path(indexed["index_dir"]),
                                                      version, wh, split, customers),
    }
    champion = reg.get(CHAMPION)
    if champion is not None and champion.version != version:
        files = reg.fetch(champion.version)
        models[f"champion v{champion.version}"] = _served_predictions(
            files.bundle_dir, files.index_dir, champion.version, wh, split, customers)
    else:
        champion = None
    models.update(ev.baselines_for_split(wh, split, k=100, customers=customers, progress=False))
    catalogue = ev.warehouse_catalogue_size(wh)
    results, _ = ev.score_all(models, truth, catalogue_size=catalogue, max_k=100)

    per = {name: ev.per_customer_metrics(models[name], truth, k=12).recall for name in models}
    force = (params.get("force_reason") or "").strip() if params.get("force_promote") else None
    decision = decide(
        per[f"challenger v{version}"],
        per[f"champion v{champion.version}"] if champion else None,
        popularity_recall=results[ev.POPULARITY]["recall@12"],
        config=GateConfig(min_lift=float(params.get("gate_margin", GateConfig.min_lift))),
        force_reason=force,
    )
    week = f"{split.holdout_start}..{split.holdout_end - dt.timedelta(days=1)}"
    table = ev.comparison_table(results, title=f"gate on holdout week {week}: {len(truth):,} scored customers, "
                                                "models served through their ScaNN indexes")
    print(table)
    print(f"gate decision: {decision.reason}")

    reg.tag(version, {**decision.as_tags(), "gate.champion_version": champion.version if champion else "",
                      "gate.holdout_week": split.holdout_start.isoformat()})
    with mlflow.start_run(run_id=indexed["mlflow_run_id"]) as run:
        for name, res in results.items():
            key = "challenger" if name.startswith("challenger") else "champion" if name.startswith("champion") else name
            for metric in ("recall@12", "recall@100", "map@12"):
                mlflow.log_metric(f"gate.{key.replace('+', '_')}.{metric.replace('@', '_at_')}", res[metric])
        mlflow.set_tags({"gate.decision": "promote" if decision.promote else "keep", "gate.reason": decision.reason})
        mlflow.log_text(table + "\n\n" + decision.reason + "\n", "gate/comparison.txt")
        experiment_id = run.info.experiment_id
    return {
        "version": version,
        "promote": decision.promote,
        "reason": decision.reason,
        "champion_version": champion.version if champion else None,
        "challenger_recall": decision.challenger_recall,
        "champion_recall": decision.champion_recall,
        "popularity_recall": decision.popularity_recall,
        "mlflow_run_id": indexed["mlflow_run_id"],
        "experiment_id": experiment_id,
        "table": table,
    }


# -- deploy ---------------------------------------------------------------------------
def deploy(promoted: Mapping, settings: Settings | None = None) -> dict:
    """Build the Bento for the new champion and switch a running service to it."""
    from hm_recsys import deploy as deployment

    # HM_RECSYS_DEPLOY_BENTO=0 skips `bentoml build` (the service switch still happens):
    # for test runs of the DAG, where the Bento build is covered by the service's own tests.
    build = os.environ.get("HM_RECSYS_DEPLOY_BENTO", "1") != "0"
    out = deployment.deploy(str(promoted["version"]), settings or Settings.from_env(), build=build)
    print(f"deployed version {out['version']}: bento {out.get('bento')}, service {out['service']['status']}")
    return {"version": out["version"], "bento": out.get("bento"), "service": out["service"]["status"]}


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


# -- the same flow without Airflow -------------------------------------------------------
def retrain(params: Mapping, run_id: str, deploy_after: bool = True, progress: bool = True) -> dict:
    """check -> snapshot -> train -> register -> index -> gate -> promote (+ deploy) or keep."""
    checked = check_data(params, run_id)
    snap = build_snapshot(checked, run_id)
    indexed = build_index(register(train(snap, params, run_id, progress=progress), run_id), run_id)
    decision = evaluate(indexed, params, run_id)
    if decision["promote"]:
        promoted = promote(decision)
        if deploy_after:
            deploy(promoted)
    else:
        keep_champion(decision)
    return decision


def _common_gate_args(p) -> None:
    p.add_argument("--gate-margin", type=float, default=0.02,
                   help="relative Recall@12 lift over the champion needed to promote (default 0.02)")
    p.add_argument("--force-reason", help="promote whatever the gate says, recording this reason")


def retrain_main(argv: list[str] | None = None) -> int:
    """``hm-recsys retrain``: the retraining DAG's flow as one command."""
    import argparse
    import uuid

    p = argparse.ArgumentParser(prog="hm-recsys retrain", description=retrain.__doc__)
    p.add_argument("--train-weeks", type=int, default=12)
    p.add_argument("--epochs", type=int)
    p.add_argument("--holdout-week", help="YYYY-MM-DD, any day of the week (default: last complete week)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="model config override (repeatable), e.g. --set train.temperature=0.5")
    p.add_argument("--run-id", help="idempotency key: rerunning with the same id reuses finished steps "
                                    "(default: a new id)")
    p.add_argument("--no-deploy", action="store_true", help="promote without building/deploying a Bento")
    _common_gate_args(p)
    a = p.parse_args(argv)
    params = {"train_weeks": a.train_weeks, "epochs": a.epochs, "holdout_week": a.holdout_week,
              "overrides": a.overrides, "gate_margin": a.gate_margin,
              "force_promote": a.force_reason is not None, "force_reason": a.force_reason}
    try:
        decision = retrain(params, a.run_id or f"cli-{uuid.uuid4().hex[:12]}", deploy_after=not a.no_deploy)
    except PipelineError as e:
        print(f"hm-recsys retrain: {e}", file=sys.stderr)
        return 1
    return 0 if decision["promote"] else 3  # 3: trained fine, the gate kept the champion


def gate_main(argv: list[str] | None = None) -> int:
    """``hm-recsys gate``: score a registered version against the champion and print the decision.

    Both are served through their own ScaNN indexes on the same holdout week,
    next to popularity (and the oracle on generated data). The decision and its
    reason are tagged on the version. ``--promote`` also acts on it.
    Exit status: 0 promote, 3 keep the champion, 1 error.
    """
    import argparse

    from hm_recsys.registry import CHALLENGER, Registry, RegistryError

    p = argparse.ArgumentParser(prog="hm-recsys gate", description=gate_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", help="model version to judge (default: the 'challenger' alias)")
    p.add_argument("--holdout-week", help="YYYY-MM-DD, any day of the week (default: the week the version "
                                          "was gated on at training, else the warehouse's last complete week)")
    p.add_argument("--promote", action="store_true", help="promote the version if the gate says so")
    _common_gate_args(p)
    a = p.parse_args(argv)
    settings = Settings.from_env()
    reg = Registry(settings)
    try:
        info = reg.version(a.version) if a.version else reg.get(CHALLENGER)
        if info is None:
            raise RegistryError("no version has the 'challenger' alias yet; pass --version")
        files = reg.fetch(info.version)
        wh = Warehouse(settings.layout.warehouse_dir)
        holdout = a.holdout_week or info.tags.get("holdout_start")
        split = Split.from_warehouse(wh, train_weeks=1, holdout_week=dt.date.fromisoformat(holdout) if holdout else None)
    except (RegistryError, ValueError) as e:
        print(f"hm-recsys gate: {e}", file=sys.stderr)
        return 1
    indexed = {"version": info.version, "split": split.to_dict(), "warehouse": str(wh.root),
               "bundle_dir": str(files.bundle_dir), "index_dir": str(files.index_dir), "mlflow_run_id": info.run_id}
    params = {"gate_margin": a.gate_margin, "force_promote": a.force_reason is not None, "force_reason": a.force_reason}
    decision = evaluate(indexed, params, settings=settings)
    if decision["promote"] and a.promote:
        promote(decision, settings)
    return 0 if decision["promote"] else 3


def promote_main(argv: list[str] | None = None) -> int:
    """``hm-recsys promote --version V --reason TEXT``: manual promotion (bypasses the gate, recorded)."""
    import argparse

    from hm_recsys.registry import Registry

    p = argparse.ArgumentParser(prog="hm-recsys promote", description=promote_main.__doc__)
    p.add_argument("--version", required=True)
    p.add_argument("--reason", required=True, help="why this version is promoted by hand (recorded as a tag)")
    a = p.parse_args(argv)
    reg = Registry()
    aliases = reg.promote(a.version)
    reg.tag(a.version, {"promoted": "true", "gate.forced": "True", "gate.reason": f"manual: {a.reason}"})
    print(json.dumps(aliases))
    return 0


def rollback_main(argv: list[str] | None = None) -> int:
    """``hm-recsys rollback``: make the previous champion the champion again."""
    import argparse

    from hm_recsys.registry import Registry, RegistryError

    p = argparse.ArgumentParser(prog="hm-recsys rollback", description=rollback_main.__doc__)
    p.add_argument("--deploy", action="store_true", help="also switch a running service to it")
    a = p.parse_args(argv)
    try:
        aliases = Registry().rollback()
    except RegistryError as e:
        print(f"hm-recsys rollback: {e}", file=sys.stderr)
        return 1
    print(json.dumps(aliases))
    if a.deploy:
        deploy({"version": aliases["champion"]})
    return 0


# -- incoming drops (the ingestion DAG) -----------------------------------------------------
def process_drops(run_id: str, run_date: dt.date) -> list[dict]:
    """Validate every incoming drop; ingest the accepted, quarantine the rejected. One outcome per drop."""
    from hm_recsys.data.drops import validate_incoming

    result = validate_incoming(run_date)
    for d in result["drops"]:
        print(f"{d['status'].upper():8} {d['file']}: {d['summary']}")
    if not result["drops"]:
        print("no drops in the incoming folder")
    keep = ("file", "sha256", "week", "status", "rows", "ingest", "moved_to", "quarantine", "report", "summary")
    return [{k: d.get(k) for k in keep} for d in result["drops"]]


def fail_on_rejects(outcomes: list[Mapping]) -> None:
    """Raise, naming each quarantined drop and why, if any drop was rejected."""
    rejected = [o for o in outcomes if o["status"] == "rejected"]
    if rejected:
        lines = "\n".join(f"- {o['file']} -> {o['quarantine']}: {o['summary']}" for o in rejected)
        raise PipelineError(f"{len(rejected)} drop(s) rejected and quarantined:\n{lines}")
