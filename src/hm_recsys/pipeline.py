"""The pipeline's steps, one function per Airflow task (and per CLI verb).

Each step is a transaction over explicit inputs: it takes small JSON-able
dicts (ids, paths, the run's params), reads and writes fixed locations derived
from them, and returns a small dict for the next step. Paths in those dicts
are relative to the shared data root (``Layout.to_shared``), so the next step
finds the same files on whichever worker host it runs; models and served
states travel through MLflow. Nothing here reads
"now" or "latest": the split comes from the params or the warehouse, and each
step is safe to retry (it finds and returns what an earlier attempt made).

The DAG files call these functions and nothing else; so do the CLI verbs, so
the whole flow also runs without Airflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from hm_recsys.config import Settings
from hm_recsys.data.warehouse import Warehouse
from hm_recsys.fsutil import file_sha256, staged_dir
from hm_recsys.split import Split

SNAPSHOT_MANIFEST = "snapshot.json"
TRAINED_UNTIL_TAG = "trained_until"


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
def _config(params: Mapping):
    from hm_recsys import train as training

    overrides = _overrides(params)
    if params.get("train_weeks"):
        overrides.append(f"train.train_weeks={int(params['train_weeks'])}")
    return training.load_config(params.get("config"), overrides=overrides)


def check_data(params: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Derive the split from the params, the model config and the warehouse; fail early if data is missing.

    The features read the history lookback (``features.history_weeks``)
    before the training window: where the warehouse starts later, the shorter
    lookback is printed and recorded (``lookback``), and ``hm-recsys train``
    on the same warehouse sees exactly the same. A gap inside the window the
    features read is an error.
    """
    from hm_recsys import train as training

    settings = settings or Settings.from_env()
    wh = Warehouse(settings.layout.warehouse_dir)
    holdout = params.get("holdout_week")
    try:
        config = _config(params)
        split = training.resolve_split(wh, config, dt.date.fromisoformat(holdout) if holdout else None)
    except ValueError as e:
        raise PipelineError(f"cannot train: {e}") from e
    if params.get("force_promote") and not (params.get("force_reason") or "").strip():
        raise PipelineError("force_promote is set but force_reason is empty: say why the gate is overridden")
    lookback = feature_lookback(wh, split, config.features.history_weeks)
    print(f"split: {split.describe()}")
    if lookback["weeks_available"] < lookback["weeks_wanted"]:
        print(f"note: the features look back {lookback['weeks_wanted']} weeks before the training window, the "
              f"warehouse holds {lookback['weeks_available']} (it starts {lookback['first_week']}); "
              f"recorded as the run's lookback")
    return {"split": split.to_dict(), "warehouse": settings.layout.to_shared(wh.root), "lookback": lookback}


def feature_lookback(wh: Warehouse, split: Split, history_weeks: int) -> dict:
    """What the features can read before ``split.train_start``; raises on a gap in the weeks they read."""
    weeks = [w for w in wh.weeks() if w < split.holdout_end]
    want_from = split.train_start - dt.timedelta(weeks=history_weeks)
    first = max(min(weeks), want_from) if weeks else split.train_start
    expected = []
    w = first
    while w < split.holdout_end:
        expected.append(w)
        w += dt.timedelta(weeks=1)
    have = set(weeks)
    gaps = [w for w in expected if w not in have]
    if gaps:
        raise PipelineError(f"cannot train: the warehouse lacks weeks {', '.join(map(str, gaps[:5]))}"
                            f"{' ...' if len(gaps) > 5 else ''} inside the window the features read "
                            f"[{first}, {split.holdout_end}) (history lookback {history_weeks} weeks + the split); "
                            f"ingest them first")
    available = (split.train_start - first).days // 7
    return {"weeks_wanted": history_weeks, "weeks_available": available, "first_week": first.isoformat()}


# -- build_snapshot ----------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # warehouse files are immutable once committed: a hard link is a free copy
    except OSError:
        shutil.copy2(src, dst)


def build_snapshot(checked: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Freeze every partition the run reads into ``runs/<run>/snapshot`` (itself a warehouse).

    That is every week before the holdout's end: the split's weeks, the
    features' history lookback, and the older weeks the article statistics
    (first sale, mean price) and the baselines read. So a model trained by the
    DAG or ``hm-recsys retrain`` sees exactly what ``hm-recsys train`` sees on
    the warehouse. Drops ingested after this point do not change what this run
    trains and scores on. Returns the snapshot path and a content hash of its
    files. Idempotent: an existing complete snapshot is returned as is.
    """
    settings = settings or Settings.from_env()
    split = Split.from_dict(checked["split"])
    src = Warehouse(settings.layout.from_shared(checked["warehouse"]))
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
        for week in [w for w in src.weeks() if w < split.holdout_end]:
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
            "warehouse": settings.layout.to_shared(dst_root),
            "data_hash": digest.hexdigest(),
            "files": len(files),
            "lookback": checked.get("lookback"),
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
    """The finished MLflow training run an earlier attempt of this pipeline run made, if any.

    An attempt that died without ending its run (its worker was killed, its
    host lost) left it RUNNING for ever: such runs are closed as KILLED here,
    so the experiment shows one finished run per pipeline run, not ghosts.
    """
    import mlflow

    from hm_recsys import tracking

    exp_id = tracking.configure(settings)
    runs = mlflow.search_runs(
        experiment_ids=[exp_id], filter_string=f"tags.airflow_run_id = '{run_id}'", output_format="list")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    for r in runs:
        if r.info.status == "RUNNING":
            print(f"closing MLflow run {r.info.run_id} of an earlier attempt that never ended (KILLED)")
            mlflow.MlflowClient(settings.mlflow_tracking_uri).set_terminated(r.info.run_id, "KILLED")
    return finished[0] if finished else None


def train(snapshot: Mapping, params: Mapping, run_id: str, settings: Settings | None = None,
          progress: bool = False) -> dict:
    """Train on the snapshot and log the run; a retry reuses a finished run of the same pipeline run."""
    import mlflow

    from hm_recsys import train as training
    from hm_recsys.registry import BUNDLE_ARTIFACT, flatten_download

    settings = settings or Settings.from_env()
    split = Split.from_dict(snapshot["split"])
    done = _finished_run(settings, run_id)
    if done is not None:
        mlflow_run_id = done.info.run_id
        bundle_dir = settings.layout.bundle_dir(mlflow_run_id)
        print(f"reusing finished MLflow run {mlflow_run_id} of this pipeline run")
        if not bundle_dir.is_dir():  # the run's artifact is the source of truth
            with staged_dir(bundle_dir) as tmp:
                mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path=BUNDLE_ARTIFACT,
                                                    dst_path=str(tmp), tracking_uri=settings.mlflow_tracking_uri)
                flatten_download(tmp, BUNDLE_ARTIFACT)
        model_uri = done.data.tags.get("model_uri", "")
    else:
        config = training.load_config(params.get("config"), overrides=_overrides(params))
        result = training.run_training(
            settings, config, split=split, run_name=f"retrain {run_key(run_id)}",
            tags={"airflow_run_id": run_id, "snapshot_sha256": snapshot["data_hash"]},
            progress=progress, warehouse=settings.layout.from_shared(snapshot["warehouse"]),
            evaluate_holdout=False,  # the gate scores the holdout through the served index (evaluate)
        )
        mlflow_run_id, bundle_dir, model_uri = result.run_id, result.bundle_dir, result.model_uri
        with mlflow.start_run(run_id=mlflow_run_id):
            # The bundle also as a plain run artifact: what Registry.fetch downloads for serving.
            mlflow.log_artifacts(str(bundle_dir), BUNDLE_ARTIFACT)
            mlflow.set_tag("model_uri", model_uri)
    return {
        "mlflow_run_id": mlflow_run_id,
        "bundle_dir": settings.layout.to_shared(bundle_dir),
        "model_uri": model_uri,
        "split": split.to_dict(),
        "warehouse": snapshot["warehouse"],
        "data_hash": snapshot["data_hash"],
    }


# -- register ------------------------------------------------------------------------
@contextlib.contextmanager
def _tracking_server(settings: Settings, doing: str) -> Iterator[None]:
    """Turn "MLflow does not answer" into one clear error naming the server (the task's retry is the remedy)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        text = str(e)
        if not any(s in text for s in ("Max retries exceeded", "Connection refused", "Connection aborted",
                                       "Read timed out", "503 Server Error", "502 Server Error")):
            raise
        raise PipelineError(f"cannot {doing}: the MLflow tracking server {settings.mlflow_tracking_uri} does not "
                            f"answer ({text.splitlines()[0][:300]}). Start the server (or fix MLFLOW_TRACKING_URI) "
                            "and retry the task: a retry cannot register twice (the version is created with "
                            "the Airflow run id as its key, in one request).") from e


def register(trained: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Register the run's model (alias challenger); the Airflow run id makes it idempotent."""
    from hm_recsys.registry import Registry

    settings = settings or Settings.from_env()
    split = Split.from_dict(trained["split"])
    with _tracking_server(settings, "register the model version"):
        v = Registry(settings).register(
            trained["mlflow_run_id"],
            model_uri=trained.get("model_uri") or None,
            idempotency_key=run_id,
            tags={
                "airflow_run_id": run_id,
                "data_window": split.describe(),
                "holdout_start": split.holdout_start.isoformat(),
                # the towers and the fusion learnt from transactions strictly before this date
                TRAINED_UNTIL_TAG: split.holdout_start.isoformat(),
                "data_sha256": trained["data_hash"],
                "bundle_artifact": "bundle",
            },
        )
    print(f"registered {settings.registered_model_name} version {v.version} (alias challenger) "
          f"from run {trained['mlflow_run_id']}")
    return {**trained, "version": v.version}


# -- build_index: the challenger's served state for the gate ----------------------------
def _gate_state(bundle_dir: Path, version: str, warehouse: Warehouse, split: Split, truth, out_dir: Path):
    """A version's served state as of the holdout's start, for the holdout's buyers (reused if built already).

    Its index's search setting is chosen on ``truth`` (the holdout week's
    ``evaluate.Truth``): the cheapest that loses at most 1% of what exact
    search finds for those buyers (``index.build_index``, rule ``holdout``).
    """
    from hm_recsys import bundle
    from hm_recsys.index import IndexRule
    from hm_recsys.served import ServedState, StateError, build_state

    try:
        return ServedState.load(out_dir, expected_version=version, expected_as_of=split.holdout_start)
    except StateError:
        pass
    config, fusion = bundle.retrieval(bundle_dir)
    return build_state(bundle.load(bundle_dir), warehouse, split.holdout_start, version, out_dir, config, fusion,
                       customers=list(truth.customer_ids), truth=truth, index_rule=IndexRule.from_env(),
                       progress=False)


def index_summary(index_facts: Mapping) -> str:
    """One line for the task log: how a state's index search setting was chosen, and what it measured."""
    tuning = index_facts.get("tuning") or {}
    if not tuning:  # a state built before the setting was recorded
        return f"index recall@12 vs exact {index_facts['recall_at_12_vs_exact']:.4f}"
    return f"index setting by rule {tuning['floor_kind']!r}: {tuning['reason']}"


def build_index(registered: Mapping, run_id: str, settings: Settings | None = None) -> dict:
    """Build the challenger's served state as of the holdout's start: features, candidate tables, ScaNN index.

    It is what the gate scores. The index's search setting is chosen on the
    holdout week's truth (the cheapest whose holdout Recall@12 is >= 0.99 x
    exact search's; else nothing is built) and
    recorded on the version (tag ``index_search``), so the states served
    later for this version start from it (``publish_state``). A retry finds a
    verified state and reuses it.
    """
    from hm_recsys import evaluate as ev
    from hm_recsys.index import carry_payload
    from hm_recsys.registry import INDEX_SEARCH_TAG, Registry
    from hm_recsys.served import describe

    settings = settings or Settings.from_env()
    version = str(registered["version"])
    split = Split.from_dict(registered["split"])
    wh = Warehouse(settings.layout.from_shared(registered["warehouse"]))
    truth = ev.holdout_truth(wh, split)
    out = settings.layout.run_dir(run_key(run_id)) / "gate" / f"v{version}"
    state = _gate_state(settings.layout.from_shared(registered["bundle_dir"]), version, wh, split, truth, out)
    facts = describe(state)
    print(f"served state of version {version} as of {state.as_of}: {facts['n_recommendable_articles']:,} "
          f"recommendable articles; {index_summary(facts['index'])}; fusion {facts['fusion']}")
    payload = carry_payload(facts["index"])
    if payload is not None:
        payload["as_of"] = state.as_of.isoformat()
        with _tracking_server(settings, "record the index search setting on the model version"):
            Registry(settings).tag(version, {INDEX_SEARCH_TAG: json.dumps(payload, sort_keys=True)})
        print(f"version {version}: tag {INDEX_SEARCH_TAG} = {json.dumps(payload, sort_keys=True)} "
              f"(its later served states start from this setting)")
    tuning = facts["index"].get("tuning") or {}
    return {**registered, "state_dir": settings.layout.to_shared(out),
            "index_recall": facts["index"]["recall_at_12_vs_exact"], "index_floor": tuning.get("floor_kind")}


# -- evaluate (the gate) -------------------------------------------------------------------
def champion_trained_until(info) -> dt.date | None:
    """The date before which a version's weights and fusion learnt (its tags), None if unknown."""
    value = info.tags.get(TRAINED_UNTIL_TAG) or info.tags.get("holdout_start")
    return dt.date.fromisoformat(value) if value else None


def evaluate(indexed: Mapping, params: Mapping, run_id: str | None = None, settings: Settings | None = None) -> dict:
    """Challenger vs champion vs every heuristic (vs oracle) on the same holdout; record the gate's decision.

    Both models are scored as served at the holdout's start: a served state
    of each (its own weights, fusion and index, features replayed to that
    date) through ``ServedState.predictions``, the code path of ``/recommend``.
    A champion whose training data reaches into the holdout week cannot be
    judged on it: that is an error, not a comparison.
    """
    import mlflow

    from hm_recsys import evaluate as ev
    from hm_recsys import tracking
    from hm_recsys.fusion import Fusion
    from hm_recsys.gate import GateConfig, decide
    from hm_recsys.registry import CHAMPION, Registry
    from hm_recsys.served import ServedState
    from hm_recsys.training.run import MODEL_NAME, SERVED

    settings = settings or Settings.from_env()
    reg = Registry(settings)
    version = str(indexed["version"])
    split = Split.from_dict(indexed["split"])
    wh = Warehouse(settings.layout.from_shared(indexed["warehouse"]))
    truth = ev.holdout_truth(wh, split)
    customers = list(truth.customer_ids)
    state_dir = settings.layout.from_shared(indexed["state_dir"])
    challenger = ServedState.load(state_dir, expected_version=version, expected_as_of=split.holdout_start)
    name = f"challenger v{version}"
    towers = f"v{version} towers alone"
    models: dict[str, dict[str, list[str]]] = {
        name: challenger.predictions(customers, 100),
        towers: challenger.predictions(customers, 100, fusion=Fusion.single("two_tower"),
                                       config=dataclasses.replace(challenger.config, sources=("two_tower",))),
    }
    champion = reg.get(CHAMPION)
    if champion is not None and champion.version != version:
        until = champion_trained_until(champion)
        if until is not None and until > split.holdout_start:
            raise PipelineError(
                f"cannot judge version {version} against champion v{champion.version} on the holdout week "
                f"{split.holdout_start}: the champion learnt from data up to {until}, which reaches into that "
                f"week. Pick a later holdout week (holdout_week param / --holdout-week).")
        files = reg.fetch(champion.version)
        scratch = state_dir.parent / f"champion-v{champion.version}"
        state = _gate_state(files.bundle_dir, champion.version, wh, split, truth, scratch)
        models[f"champion v{champion.version}"] = state.predictions(customers, 100)
    else:
        champion = None
    models.update(ev.baselines_for_split(wh, split, k=100, customers=customers, progress=False))
    catalogue = ev.warehouse_catalogue_size(wh)
    results, curves = ev.score_all(models, truth, catalogue_size=catalogue, max_k=100)

    per = {n: ev.per_customer_metrics(models[n], truth, k=12).recall for n in models}
    force = (params.get("force_reason") or "").strip() if params.get("force_promote") else None
    decision = decide(
        per[name],
        per[f"champion v{champion.version}"] if champion else None,
        baselines={b: results[b]["recall@12"] for b in ev.BASELINES if b in results},
        config=GateConfig(min_lift=float(params.get("gate_margin", GateConfig.min_lift))),
        force_reason=force,
    )
    week = f"{split.holdout_start}..{split.holdout_end - dt.timedelta(days=1)}"
    table = ev.comparison_table(results, title=f"gate on holdout week {week}: {len(truth):,} scored customers, "
                                                "models as served (candidate sources, fusion, ScaNN index)")
    print(table)
    print(f"gate decision: {decision.reason}")

    reg.tag(version, {**decision.as_tags(), "gate.champion_version": champion.version if champion else "",
                      "gate.holdout_week": split.holdout_start.isoformat()})
    with mlflow.start_run(run_id=indexed["mlflow_run_id"]) as run:
        for model, res in results.items():
            if model == towers:
                continue
            key = "challenger" if model.startswith("challenger") else "champion" if model.startswith("champion") \
                else model
            for metric in ("recall@12", "recall@100", "map@12"):
                mlflow.log_metric(f"gate.{key.replace('+', '_')}.{metric.replace('@', '_at_')}", res[metric])
        # The run's headline holdout metrics (its training left the holdout to this gate): what the version
        # serves, the towers alone, every baseline (and the oracle), as `hm-recsys train` logs them.
        own = {SERVED: results[name], MODEL_NAME: results[towers],
               **{m: r for m, r in results.items() if m in ev.BASELINES or m == ev.ORACLE}}
        tracking.log_results(own, best_epoch=None, model_name=SERVED)
        tracking.log_recall_plot({SERVED: curves[name], MODEL_NAME: curves[towers],
                                  **{m: c for m, c in curves.items() if m in own}}, title=f"holdout week {week}")
        mlflow.log_text(table + "\n", "metrics_table.txt")
        mlflow.set_tags({"gate.decision": "promote" if decision.promote else "keep", "gate.reason": decision.reason,
                         "gate.rule": decision.rule})
        mlflow.log_text(table + "\n\n" + decision.reason + "\n", "gate/comparison.txt")
        experiment_id = run.info.experiment_id
    return {
        "version": version,
        "promote": decision.promote,
        "reason": decision.reason,
        "rule": decision.rule,
        "champion_version": champion.version if champion else None,
        "challenger_recall": decision.challenger_recall,
        "champion_recall": decision.champion_recall,
        "best_baseline": decision.best_baseline,
        "best_baseline_recall": decision.best_baseline_recall,
        "mlflow_run_id": indexed["mlflow_run_id"],
        "experiment_id": experiment_id,
        "table": table,
    }


# -- served states: build, publish, refresh ---------------------------------------------
def newest_as_of(wh: Warehouse) -> dt.date:
    """The date a state "as of the newest ingested week" is computed for: the day after that week ends."""
    return wh.last_complete_week() + dt.timedelta(weeks=1)


def publish_state(version: str, as_of: dt.date | None = None, settings: Settings | None = None,
                  progress: bool = False) -> dict:
    """Build version's served state as of ``as_of`` (default: newest) from the warehouse and publish it.

    One writer at a time: the build and the publication hold the served-state
    lock, and a state is only built when the version has none at least as
    new (an older as_of never replaces a newer one; a retry finds it done).
    There is no truth for the weeks after ``as_of`` yet: the index starts from
    the search setting chosen on the holdout's truth at the gate (the
    version's ``index_search`` tag), widened only if its recall@12 vs exact
    here falls more than ``IndexRule.carry_tolerance`` below the gate's
    (rule ``carried``); a version without the tag gets recall@12 vs exact >=
    0.98 (rule ``recall_vs_exact``).
    Returns ``{"version", "as_of", "status": built | current, "seconds", ...}``.
    """
    import time

    from hm_recsys import bundle
    from hm_recsys.index import IndexRule
    from hm_recsys.registry import Registry
    from hm_recsys.served import build_state, describe

    settings = settings or Settings.from_env()
    reg = Registry(settings)
    wh = Warehouse(settings.layout.warehouse_dir)
    as_of = as_of or newest_as_of(wh)
    version = str(version)
    t0 = time.perf_counter()
    with reg.lock("served-state-build"):
        newest = reg.served_as_of(version)
        if newest is not None and newest >= as_of.isoformat():
            print(f"version {version} already has a served state as of {newest} (>= {as_of}): nothing to build")
            return {"version": version, "as_of": newest, "status": "current", "seconds": 0.0}
        files = reg.fetch(version)
        config, fusion = bundle.retrieval(files.bundle_dir)
        out = settings.layout.state_dir(version, as_of.isoformat())
        state = build_state(bundle.load(files.bundle_dir), wh, as_of, version, out, config, fusion, progress=progress,
                            index_search=_carried_search(reg, version), index_rule=IndexRule.from_env())
        published = reg.publish_state(version, out)
    facts = describe(state)
    seconds = round(time.perf_counter() - t0, 1)
    print(f"served state of version {version} as of {as_of}: {facts['n_customers']:,} customers "
          f"({facts['n_customers_with_history']:,} with a history), {facts['n_recommendable_articles']:,} "
          f"recommendable articles; {index_summary(facts['index'])}; built and published in {seconds} s")
    return {"version": version, "as_of": as_of.isoformat(), "status": "built", "seconds": seconds,
            "served_as_of": published["served_as_of"], "build_seconds": state.manifest.get("seconds")}


def _carried_search(reg, version: str):
    """The version's ``index_search`` tag as an ``index.SearchSetting``; None if it has none (or a bad one)."""
    from hm_recsys.index import SearchSetting
    from hm_recsys.registry import INDEX_SEARCH_TAG

    raw = reg.version(version).tags.get(INDEX_SEARCH_TAG)
    if not raw:
        print(f"version {version} has no {INDEX_SEARCH_TAG} tag (no index setting chosen on truth at its gate): "
              "the index is tuned to recall@12 vs exact")
        return None
    try:
        return SearchSetting.from_json(raw)
    except ValueError as e:
        print(f"version {version}: ignoring its {INDEX_SEARCH_TAG} tag ({e}): the index is tuned to recall@12 vs exact")
        return None


def switch(version: str, as_of: str, url: str | None = None) -> dict:
    """Ask a running local service to load (version, as_of) and wait until ``/metadata`` says so."""
    from hm_recsys import deploy as deployment

    token = os.environ.get("HM_RECSYS_ADMIN_TOKEN")
    out = deployment.switch_service(str(version), url or deployment.default_url(), token, as_of=as_of)
    print(f"service {out['url']}: {out['status']} (version {version} as of {as_of})")
    return out


def refresh(settings: Settings | None = None, as_of: dt.date | None = None, switch_service: bool = True,
            url: str | None = None) -> dict:
    """Refresh without retraining: the champion's served state as of the newest week, published and swapped in.

    With the champion's weights and fusion fixed, rebuilds histories, article
    statistics, customer and article embeddings, candidate tables and the
    ScaNN index (recall floor re-verified) as of ``as_of`` (default: the
    newest ingested week), publishes it (``served/<as_of>/`` of the version's
    MLflow run) and makes a running local service load it. No champion: nothing to do.
    """
    from hm_recsys.registry import CHAMPION, Registry

    settings = settings or Settings.from_env()
    champion = Registry(settings).get(CHAMPION)
    if champion is None:
        print("no champion yet: nothing to refresh (hm_retrain promotes one)")
        return {"status": "no-champion"}
    out = publish_state(champion.version, as_of, settings)
    if switch_service:
        out["service"] = switch(champion.version, out["as_of"], url)["status"]
    return out


# -- deploy ---------------------------------------------------------------------------
def deploy(promoted: Mapping, settings: Settings | None = None) -> dict:
    """Serve the new champion as of the NEWEST week: publish its state, build the Bento, switch the service."""
    from hm_recsys import deploy as deployment

    settings = settings or Settings.from_env()
    state = publish_state(str(promoted["version"]), settings=settings)
    # HM_RECSYS_DEPLOY_BENTO=0 skips `bentoml build` (the service switch still happens):
    # for test runs of the DAG, where the Bento build is covered by the service's own tests.
    build = os.environ.get("HM_RECSYS_DEPLOY_BENTO", "1") != "0"
    out = deployment.deploy(str(promoted["version"]), settings, build=build)
    print(f"deployed version {out['version']} as of {out['as_of']}: bento {out.get('bento')}, "
          f"service {out['service']['status']}")
    return {"version": out["version"], "as_of": out["as_of"], "bento": out.get("bento"),
            "service": out["service"]["status"], "state": state["status"]}


# -- promote / keep / report ---------------------------------------------------------
def promote(decision: Mapping, settings: Settings | None = None) -> dict:
    """Move ``champion`` to the decided version: compare-and-set on the champion the gate judged.

    If the alias moved since the gate (a rollback, another promotion), the
    promotion fails loudly and nothing changes. Idempotent: a retry finds it done.
    """
    from hm_recsys.registry import ChampionMoved, Registry

    if not decision.get("promote"):
        raise PipelineError(f"the gate did not promote version {decision.get('version')}: {decision.get('reason')}")
    reg = Registry(settings)
    try:
        aliases = reg.promote(decision["version"], expected_champion=decision.get("champion_version"))
    except ChampionMoved as e:
        raise PipelineError(str(e)) from e
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
        registered = {"version": info.version, "split": split.to_dict(), "warehouse": str(wh.root),
                      "bundle_dir": str(files.bundle_dir), "mlflow_run_id": info.run_id}
        params = {"gate_margin": a.gate_margin, "force_promote": a.force_reason is not None,
                  "force_reason": a.force_reason}
        decision = evaluate(build_index(registered, f"gate-v{info.version}-{split.holdout_start}", settings), params,
                            settings=settings)
        if decision["promote"] and a.promote:
            promote(decision, settings)
    except (RegistryError, ValueError, PipelineError) as e:
        print(f"hm-recsys gate: {e}", file=sys.stderr)
        return 1
    return 0 if decision["promote"] else 3


def live_quality(params: Mapping | None = None, settings: Settings | None = None) -> dict:
    """Score the served state that was live in each newly ingested week (``hm_recsys.monitor``)."""
    from hm_recsys import monitor

    params = params or {}
    fail = params.get("fail_on_low_quality")
    out = monitor.live_quality(settings, fail_below_baseline=None if fail is None else bool(fail))
    keep = ("week", "as_of", "customers", "served_recall_at_12", "best_baseline", "best_baseline_recall_at_12",
            "below_best_baseline", "drift_verdict")
    # monitor_*: the plugin's "Live quality" link opens this run's chart in MLflow
    return {"status": out["status"], "version": out.get("version"), "monitor_run_id": out.get("run_id"),
            "monitor_experiment_id": out.get("experiment_id"),
            "weeks": [{k: w.get(k) for k in keep} for w in out["weeks"]]}


def refresh_main(argv: list[str] | None = None) -> int:
    """``hm-recsys refresh``: the hm_refresh DAG as one command."""
    import argparse

    from hm_recsys.cli import iso_date

    p = argparse.ArgumentParser(
        prog="hm-recsys refresh",
        description="Refresh the served state without retraining: score the state that served each newly "
                    "ingested week (live quality, logged to the champion's monitoring run in MLflow), then rebuild "
                    "the champion's served state as of the newest week (histories, embeddings, candidate tables, "
                    "ScaNN index), publish it and hot-swap it into a running service.")
    p.add_argument("--as-of", type=iso_date, metavar="YYYY-MM-DD",
                   help="a Wednesday (default: the day after the newest ingested week)")
    p.add_argument("--no-switch", action="store_true", help="publish only; do not ask a running service to load it")
    p.add_argument("--url", help="the running service (default http://127.0.0.1:$HM_RECSYS_SERVE_PORT, port 3000)")
    p.add_argument("--no-live-quality", action="store_true", help="skip scoring the weeks already served")
    p.add_argument("--fail-on-low-quality", action="store_true",
                   help="exit 1 if the champion served below the best heuristic in a scored week")
    a = p.parse_args(argv)
    from hm_recsys import deploy as deployment
    from hm_recsys.monitor import LiveQualityBelowBaseline
    from hm_recsys.registry import RegistryError
    from hm_recsys.served import StateError

    try:
        if not a.no_live_quality:
            live_quality({"fail_on_low_quality": a.fail_on_low_quality})
        out = refresh(as_of=a.as_of, switch_service=not a.no_switch, url=a.url)
    except (PipelineError, RegistryError, StateError, ValueError, deployment.DeployError,
            LiveQualityBelowBaseline) as e:
        print(f"hm-recsys refresh: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, default=str))
    return 0


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
    keep = ("file", "sha256", "week", "status", "rows", "ingest", "moved_to", "quarantine", "report", "summary",
            "drift_verdict", "drift_report", "drift_plot")
    layout = Settings.from_env().layout

    def portable(key: str, value):  # paths as the data root sees them: the same on every worker host
        if key in ("file", "moved_to", "quarantine", "report", "drift_report", "drift_plot") and value:
            with contextlib.suppress(ValueError):
                return layout.to_shared(value)
        return value

    return [{k: portable(k, d.get(k)) for k in keep} for d in result["drops"]]


def fail_on_rejects(outcomes: list[Mapping]) -> None:
    """Raise, naming each quarantined drop and why, if any drop was rejected."""
    rejected = [o for o in outcomes if o["status"] == "rejected"]
    if rejected:
        lines = "\n".join(f"- {o['file']} -> {o['quarantine']}: {o['summary']}" for o in rejected)
        raise PipelineError(f"{len(rejected)} drop(s) rejected and quarantined (paths under the data root "
                            f"{Settings.from_env().layout.shared}):\n{lines}")
