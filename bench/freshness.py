"""Benchmark: what refreshing the served state buys, replaying weekly drops through the production path.

    .venv/bin/python bench/freshness.py --data small                      # generated H&M-format data
    .venv/bin/python bench/freshness.py --data movielens --wheel /path/recbole-1.2.1-py3-none-any.whl
    .venv/bin/python bench/freshness.py --data small --weeks 4 --set train.epochs=5 --out /tmp/fresh-small

The dataset is made once with its last ``--weeks`` H&M weeks held back as
weekly drop files (``bench/_datasets.warehouse_for(..., drop_weeks=N)``);
everything else happens in a fresh runtime folder, ``<out>/home``
(``HM_RECSYS_HOME``: warehouse copy, sqlite MLflow, BentoML home), rebuilt
on every run:

1. ONE model is trained on the history, holdout = the history's last
   complete week, with the functions ``hm-recsys train`` runs
   (``train.resolve_split``, ``prepare``, ``fit``, ``fit_fusion``; config from
   ``--set`` overrides). Its bundle (with the fusion) is logged as an MLflow
   run's ``bundle/``, registered, its served state as of the holdout's start
   is published (``pipeline.publish_state``: what the gate scored) and it is
   promoted to champion.
2. The real service (``hm-recsys serve`` on a free 127.0.0.1 port, admin
   token set, alias polling slowed to 600 s so every switch comes from the
   reload request) serves that champion.
3. For each drop week W, in order:

   * REFRESH as of W's start, which needs only the weeks before W (the history
     and the previous drops): ``pipeline.publish_state`` (build + verify +
     publish to MLflow, timed), then ``pipeline.switch``
     (``deploy.switch_service``: ``POST /admin/reload``, then ``/metadata``
     polled until three reads say (version, W)). wrk posts ``/recommend``
     rotating over customer ids the whole time, in two windows: one around
     the publication, one around the switch; non-2xx answers and socket
     errors are counted as failed requests. After the switch, the service's
     answers for a sample of customers are compared with the refreshed
     state's (the one code path: ``ServedState.recommend``).
   * INGEST the drop through the production path
     (``hm_recsys.data.drops.process_incoming`` on the runtime's incoming /
     processed / quarantine folders; a rejected drop stops the benchmark).
   * SCORE W's buyers (everyone with a purchase in W; their relevant set is
     what they bought in W) with ``ServedState.predictions`` (what
     ``/recommend`` answers): FROZEN = the state as of the training holdout's
     start (what the service served before refreshes existed), REFRESHED =
     the state as of W's start; and every heuristic baseline as of W
     (``evaluate.baselines_for_split`` on ``Split.ending_at(W, 1)``), the best
     of them (highest Recall@12 that week) for reference.

It prints a per-week table (buyers, frozen / refreshed Recall@12 and their
ratio, best heuristic, refresh wall time, requests and failed requests under
load), pooled figures over all customer-weeks (with a paired bootstrap 95% CI
of refreshed / frozen), and the swap-under-load table (switch seconds, p50 /
p99 during the publication and during the swap, against a steady window
before any refresh). ``freshness.txt``, ``freshness.json`` and
``freshness.png`` go to ``--out``; one MLflow run (in the runtime folder's
sqlite store) holds the per-week metrics (step = week index), the pooled
figures, the plot and the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _datasets import DATASETS, plot_weekly, warehouse_for  # noqa: E402
from _load import ServiceProcess, Wrk, write_rotation_script  # noqa: E402

from hm_recsys import evaluate as ev  # noqa: E402
from hm_recsys import train  # noqa: E402
from hm_recsys.split import WEEK  # noqa: E402

# The real dev set's week of 2020-08-26 holds 5.41x the median rows of the four weeks before it (new users
# rating dozens of movies at once; docs/real-dev-set.md). The default volume band (0.2..5.0) rejects it.
MOVIELENS_VOLUME_BAND = (0.2, 6.0)
# ... and most of each drop week's rows there come from users never seen before (shares 0.97, 0.80, 0.61, 0.50
# in the four weeks after 2020-08-19: a user rates movies in a burst when joining); the default 0.0..0.5 rejects them.
MOVIELENS_NEW_CUSTOMER_SHARE = (0.0, 1.0)
FROZEN, REFRESHED = "frozen", "refreshed"


# ---------------------------------------------------------------------------
# The model: trained once, registered, published as of the holdout's start, promoted
# ---------------------------------------------------------------------------
def train_and_register(settings, wh, config, holdout: dt.date, data: str) -> tuple[str, object, dict]:
    """Train on the history (holdout = ``holdout``), register the bundle; returns (version, split, facts)."""
    from hm_recsys import bundle

    t0 = time.perf_counter()
    split = train.resolve_split(wh, config, holdout)
    scratch = settings.layout.runs_dir / "freshness-train"
    print(f"training one model: {split.describe()}", flush=True)
    try:
        prep = train.prepare(wh, split, config, scratch / "shards", progress=False)
        model, logs, best = train.fit(prep, config, progress=False)
        fusion = train.fit_fusion(model, prep, config, wh, scratch, "freshness", progress=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
    full = {"features": config.features.to_dict(), "model": model.config.to_dict(),
            "train": dataclasses.asdict(config.train), "retrieval": config.retrieval.to_dict()}
    facts = {"split": split.describe(), "valid_weeks": split.valid_weeks, "best_epoch": best,
             "epochs_run": len(logs), "early_stopping": train.early_stopping(prep, config),
             "fusion": fusion.describe(), "train_seconds": round(time.perf_counter() - t0, 1)}
    bundle_dir = bundle.save(settings.layout.runs_dir / "freshness-bundle", rec, full, prep.data_window,
                             {"note": "bench/freshness.py model", **facts}, fusion=fusion)
    version = register(settings, bundle_dir, split, f"freshness {data}: model", config)
    print(f"model version {version}: trained in {facts['train_seconds']} s (best epoch {best} of {len(logs)}, "
          f"valid weeks {split.valid_weeks}); fusion {facts['fusion']}", flush=True)
    return version, split, facts


def register(settings, bundle_dir: Path, split, run_name: str, config) -> str:
    """Log ``bundle_dir`` as a run's ``bundle/`` and register it as a version, tagged as ``pipeline.register`` does.

    No pyfunc flavour is logged (the service fetches ``bundle/`` and the
    served states, never the pyfunc; logging one costs ~15 s of dependency
    inference): ``model/MLmodel`` is a placeholder, as in the serving tests.
    """
    import mlflow

    from hm_recsys import tracking
    from hm_recsys.pipeline import TRAINED_UNTIL_TAG
    from hm_recsys.registry import BUNDLE_ARTIFACT, Registry

    exp_id = tracking.configure(settings)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                          tags={"stage": "bench-freshness-model", "split": split.describe()}) as run:
        tracking.log_params({"config": config.to_dict(), "split": split.to_dict()})
        mlflow.log_artifacts(str(bundle_dir), BUNDLE_ARTIFACT)
        mlflow.log_text("bench/freshness.py logs no pyfunc model; the service reads bundle/ and served/",
                        "model/MLmodel")
    info = Registry(settings).register(run.info.run_id, tags={
        "data_window": split.describe(), "holdout_start": split.holdout_start.isoformat(),
        TRAINED_UNTIL_TAG: split.holdout_start.isoformat(), "bundle_artifact": BUNDLE_ARTIFACT})
    return info.version


# ---------------------------------------------------------------------------
# Drops
# ---------------------------------------------------------------------------
def ingest_drop(layout, drop: Path, week: dt.date, vconfig) -> dict:
    """Put the drop in ``incoming/`` and run the production validation + ingestion on it."""
    from hm_recsys.data.drops import process_incoming

    layout.incoming_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(drop, layout.incoming_dir / drop.name)
    t0 = time.perf_counter()
    result = process_incoming(layout.incoming_dir, layout.warehouse_dir, layout.processed_dir,
                              layout.quarantine_dir, week + WEEK, config=vconfig,
                              reports_dir=layout.drop_reports_dir)
    (out,) = [d for d in result["drops"] if d["file"] == drop.name]
    out = {k: out.get(k) for k in ("file", "status", "rows", "ingest", "drift_verdict", "summary")}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if out["status"] != "accepted" or out["ingest"] != "ingested":
        raise SystemExit(f"drop {drop.name} was not ingested ({out['status']}, {out['ingest']}): {out['summary']}")
    return out


# ---------------------------------------------------------------------------
# Scoring one week
# ---------------------------------------------------------------------------
def score_week(wh, week: dt.date, states: dict, config) -> tuple[dict, dict, object]:
    """Recall@12 etc. of each state and every heuristic as of ``week`` on its buyers; (results, per-customer, truth)."""
    from hm_recsys.split import Split

    split = Split.ending_at(week, train_weeks=1)
    truth = ev.holdout_truth(wh, split)
    ids = list(truth.customer_ids)
    excl = config.train.exclude_purchased
    models = {name: s.predictions(ids, 100, excl) for name, s in states.items()}
    models.update(ev.baselines_for_split(wh, split, k=100, exclude_purchased=excl, customers=ids,
                                         include_oracle=False, progress=False))
    results, _ = ev.score_all(models, truth, max_k=100)
    per = {n: ev.per_customer_metrics(models[n], truth, k=12).recall for n in models}
    return results, per, truth


def buyer_groups(wh, truth, frozen_as_of: dt.date, week: dt.date) -> dict[str, np.ndarray]:
    """Masks over ``truth.customer_ids`` (sorted): who the refresh can know better than the frozen state.

    ``returning``: bought before the frozen state's as_of; ``recent``: first
    bought in ``[frozen_as_of, week)`` (only the refreshed state has their
    purchases); ``new``: first purchase in ``week`` (no state has a history).
    """
    first = wh.transactions(wh.weeks()[0], week, columns=["customer_id", "t_dat"])
    first = first.groupby(first["customer_id"].astype(str), observed=True)["t_dat"].min()
    when = first.reindex(truth.customer_ids)
    import pandas as pd

    before = (when < pd.Timestamp(frozen_as_of)).to_numpy()
    seen = when.notna().to_numpy()
    return {"returning": before, "recent": seen & ~before, "new": ~seen}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def week_table(rows: list[dict], title: str) -> str:
    hdr = (f"{'week':<11}{'buyers':>7}{'frozen':>9}{'refreshed':>11}{'ratio':>8}  {'best heuristic':<30}"
           f"{'refresh s':>10}{'requests':>10}{'failed':>8}")
    lines = [title, hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(f"{r['week']:<11}{r['buyers']:>7}{r['frozen_recall_at_12']:>9.4f}"
                     f"{r['refreshed_recall_at_12']:>11.4f}{r['ratio']:>7.2f}x  "
                     f"{r['best_heuristic'] + ' ' + format(r['best_heuristic_recall_at_12'], '.4f'):<30}"
                     f"{r['refresh_seconds']:>10.1f}{r['requests']:>10,}{r['failed']:>8}")
    return "\n".join(lines)


def group_table(rows: list[dict], title: str) -> str:
    """Recall@12 of each state per buyer group (``buyer_groups``) and the paired CI of the week's ratio."""
    hdr = (f"{'week':<11}{'ratio 95% CI':>16}{'better':>8}{'worse':>7}  " + "".join(
        f"{g + ' n / frozen / refreshed':>36}" for g in ("returning", "recent", "new")))
    lines = [title, hdr, "-" * len(hdr)]
    for r in rows:
        cells = []
        for g in ("returning", "recent", "new"):
            x = r["groups"][g]
            cells.append(f"{x['buyers']:>12} / {x['frozen']:.4f} / {x['refreshed']:.4f}" if x["buyers"]
                         else f"{0:>12} /      - /      -")
        ci = "[{:.2f}, {:.2f}]".format(*r["ratio_ci95"])
        lines.append(f"{r['week']:<11}{ci:>16}{r['customers_better']:>8}{r['customers_worse']:>7}  "
                     + "".join(f"{c:>36}" for c in cells))
    return "\n".join(lines)


def swap_table(rows: list[dict], steady: dict, title: str) -> str:
    hdr = (f"{'refresh as of':<14}{'switch s':>9}{'reload s':>9}  {'window':<8}{'seconds':>8}{'requests':>10}"
           f"{'req/s':>8}"
           f"{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'failed':>8}")
    lines = [title, hdr, "-" * len(hdr),
             f"{'(none)':<14}{'':>9}{'':>9}  {'steady':<8}{steady['seconds']:>8.1f}{steady['requests']:>10,}"
             f"{steady['rps']:>8.0f}{steady['p50_ms']:>8.2f}{steady['p99_ms']:>8.2f}{steady['max_ms']:>8.1f}"
             f"{steady['failed']:>8}"]
    for r in rows:
        for i, (name, w) in enumerate((("publish", r["load_publish"]), ("swap", r["load_swap"]))):
            rs = f"{r['reload_seconds']:.2f}" if r["reload_seconds"] is not None else "?"
            head = f"{r['week']:<14}{r['switch_seconds']:>9.2f}{rs:>9}" if i == 0 else f"{'':<14}{'':>18}"
            lines.append(f"{head}  {name:<8}{w['seconds']:>8.1f}{w['requests']:>10,}{w['rps']:>8.0f}"
                         f"{w['p50_ms']:>8.2f}{w['p99_ms']:>8.2f}{w['max_ms']:>8.1f}{w['failed']:>8}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    series = {
        "frozen (as of the training holdout)": (col("frozen_recall_at_12"), {}),
        "refreshed (as of the week's start)": (col("refreshed_recall_at_12"), {"linewidth": 2.5, "color": "black"}),
        "best heuristic that week": (col("best_heuristic_recall_at_12"), {"marker": "s", "linestyle": "--"}),
    }
    return plot_weekly([r["week"] for r in rows], series, path, title, "drop week (start)",
                       "Recall@12 on the week's buyers")


def log_mlflow(settings, data: str, report: dict, files: list[Path]) -> str:
    import mlflow

    from hm_recsys import tracking

    exp_id = tracking.configure(settings)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"freshness {data} ({len(report['weeks'])} weeks)",
                          tags={"stage": "bench-freshness", "model_version": report["model_version"]}) as run:
        mlflow.log_params({"data": data, "weeks": ",".join(r["week"] for r in report["weeks"]),
                           "training_holdout": report["training_holdout"], "overrides": str(report["overrides"]),
                           "validation": str(report["validation"])[:500], "load_tool": report["load"]["tool"],
                           "concurrency": report["load"]["connections"], "cpu_cores": report["cpu_cores"]})
        for step, r in enumerate(report["weeks"]):
            mlflow.log_metrics({
                "frozen_recall_at_12": r["frozen_recall_at_12"], "refreshed_recall_at_12": r["refreshed_recall_at_12"],
                "refreshed_over_frozen": r["ratio"], "best_heuristic_recall_at_12": r["best_heuristic_recall_at_12"],
                "frozen_map_at_12": r["frozen_map_at_12"], "refreshed_map_at_12": r["refreshed_map_at_12"],
                "buyers": r["buyers"], "refresh_seconds": r["refresh_seconds"], "switch_seconds": r["switch_seconds"],
                "requests": r["requests"], "failed_requests": r["failed"],
                "swap_p50_ms": r["load_swap"]["p50_ms"], "swap_p99_ms": r["load_swap"]["p99_ms"],
                "publish_p50_ms": r["load_publish"]["p50_ms"], "publish_p99_ms": r["load_publish"]["p99_ms"],
            }, step=step)
            if r["reload_seconds"] is not None:
                mlflow.log_metric("reload_seconds", r["reload_seconds"], step=step)
        p = report["pooled"]
        mlflow.log_metrics({f"pooled.{k}": v for k, v in p.items() if isinstance(v, (int, float))})
        for f in files:
            mlflow.log_artifact(str(f), "plots" if f.suffix == ".png" else None)
        return run.info.run_id


# ---------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=DATASETS, default="small")
    p.add_argument("--wheel", type=Path, help="recbole-1.2.1-py3-none-any.whl (MovieLens-100k inside)")
    p.add_argument("--fetch", action="store_true", help="download the recbole wheel from the package registry")
    p.add_argument("--weeks", type=int, default=4, help="weekly drops replayed (default 4)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="model config override, as for hm-recsys train")
    p.add_argument("--volume-band", type=float, nargs=2, metavar=("LO", "HI"),
                   help=f"drop validation volume band (default: ValidationConfig's; {MOVIELENS_VOLUME_BAND} "
                        f"for movielens, whose real week of 2020-08-26 is 5.4x the weeks before it)")
    p.add_argument("--new-customer-share", type=float, nargs=2, metavar=("LO", "HI"),
                   help=f"drop validation band of the share of rows from never-seen customers (default: "
                        f"ValidationConfig's; {MOVIELENS_NEW_CUSTOMER_SHARE} for movielens, where new users are "
                        f"most of each week's rows)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--steady-seconds", type=float, default=10.0, help="load window before any refresh (default 10)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds of load before and after each switch inside the swap window (default 2)")
    p.add_argument("--parity", type=int, default=20, help="customers whose HTTP answers are compared (default 20)")
    p.add_argument("--cache", type=Path, help="where datasets are made once (default $HM_RECSYS_HOME/bench-data)")
    p.add_argument("--out", type=Path, help="results and the runtime folder <out>/home "
                                            "(default $HM_RECSYS_HOME/bench/freshness-<data>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the benchmark's MLflow run")
    a = p.parse_args()
    if a.weeks < 1:
        p.error("--weeks must be >= 1")
    if a.threads < 1 or a.concurrency < a.threads:
        p.error("need 1 <= --threads <= --concurrency")

    from hm_recsys.config import Settings

    caller_home = Settings.from_env().home
    out = (a.out or caller_home / "bench" / f"freshness-{a.data}").resolve()
    cache = (a.cache or caller_home / "bench-data").resolve()
    t_start = time.perf_counter()
    src_wh = warehouse_for(a.data, cache, a.wheel, a.fetch, drop_weeks=a.weeks)
    drops = sorted((src_wh.parent / "raw" / "drops").glob("transactions_*.csv"))
    weeks = [dt.date.fromisoformat(d.stem.removeprefix("transactions_")) for d in drops]

    # A fresh runtime folder: nothing of the caller's MLflow, registry or BentoML is read or written.
    home = out / "home"
    shutil.rmtree(home, ignore_errors=True)
    for k in [k for k in os.environ if k.startswith(("HM_RECSYS_", "MLFLOW_", "BENTOML_"))]:
        del os.environ[k]
    token = secrets.token_hex(16)
    os.environ.update({"HM_RECSYS_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
                       "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "GLOG_minloglevel": "2",
                       "HM_RECSYS_ADMIN_TOKEN": token, "PYTHONUNBUFFERED": "1"})
    settings = Settings.from_env()
    layout = settings.layout
    shutil.copytree(src_wh, layout.warehouse_dir)

    from hm_recsys import pipeline
    from hm_recsys.data.validate import ValidationConfig
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.gate import paired_bootstrap_ratio_ci
    from hm_recsys.registry import Registry
    from hm_recsys.served import ServedState
    from hm_recsys.serving import serve_env

    wh = Warehouse(layout.warehouse_dir)
    holdout = wh.last_complete_week()
    if weeks != [holdout + (i + 1) * WEEK for i in range(a.weeks)]:
        raise SystemExit(f"the drops {weeks} are not the {a.weeks} weeks right after the history's last complete "
                         f"week {holdout}")
    ml = a.data == "movielens"
    default_v = ValidationConfig()
    vconfig = ValidationConfig(
        volume_band=tuple(a.volume_band) if a.volume_band else MOVIELENS_VOLUME_BAND if ml else default_v.volume_band,
        new_customer_share=tuple(a.new_customer_share) if a.new_customer_share
        else MOVIELENS_NEW_CUSTOMER_SHARE if ml else default_v.new_customer_share)
    notes = []
    if vconfig.volume_band != default_v.volume_band:
        notes.append(f"drop validation: volume band {vconfig.volume_band} x the median of the "
                     f"{vconfig.history_weeks} weeks before each drop instead of the default {default_v.volume_band}"
                     + (": admits the real 5.4x week of 2020-08-26 (a wave of new MovieLens users)" if ml else ""))
    if vconfig.new_customer_share != default_v.new_customer_share:
        notes.append(f"drop validation: new-customer share band {vconfig.new_customer_share} instead of the default "
                     f"{default_v.new_customer_share}" + (": on MovieLens 50-97% of each drop week's rows come from "
                                                          "users never seen before (they rate in a burst on joining)"
                                                          if ml else ""))
    config = train.load_config(None, a.overrides)
    cores = os.cpu_count()
    print(f"{a.data}: history up to week {holdout} ({wh.root}), drops {', '.join(map(str, weeks))}; runtime folder "
          f"{home}; {cores} CPU cores" + (f"; overrides {a.overrides}" if a.overrides else ""), flush=True)
    for n in notes:
        print(n, flush=True)

    # 1. one model, its state as of the holdout's start (what the gate scored), champion
    version, split, train_facts = train_and_register(settings, wh, config, holdout, a.data)
    frozen_pub = pipeline.publish_state(version, holdout, settings)
    Registry(settings).promote(version)
    frozen = ServedState.load(layout.state_dir(version, holdout.isoformat()), expected_version=version,
                              expected_as_of=holdout)
    at_training, _, t_truth = score_week(wh, holdout, {FROZEN: frozen}, config)
    best_t = ev.best_baseline(at_training)
    print(f"at training (the gate's view): holdout {holdout}, {len(t_truth)} buyers: served Recall@12 "
          f"{at_training[FROZEN]['recall@12']:.4f}, best heuristic {best_t} {at_training[best_t]['recall@12']:.4f}",
          flush=True)

    # 2. the real service, serving the champion's frozen state
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = serve_env(settings, base=dict(os.environ), HM_RECSYS_SERVE_POLL_SECONDS="600")
    srv = ServiceProcess(env, logs / "service.log")
    rows: list[dict] = []
    pooled_per: dict[str, list[np.ndarray]] = {}
    wrk = None
    try:
        srv.wait_ready()
        import httpx

        meta = httpx.get(f"{srv.url}/metadata", timeout=10).json()
        if (meta["model_version"], meta["as_of"]) != (version, holdout.isoformat()):
            raise SystemExit(f"the service serves {meta['model_version']} as of {meta['as_of']}, "
                             f"not {version} as of {holdout}")
        rng = np.random.default_rng(0)
        known = np.asarray(wh.customers()["customer_id"].astype(str))
        pick = known[rng.choice(known.size, size=min(2000, known.size), replace=False)].tolist()
        unknown = ["%064x" % int(rng.integers(0, 2**62)) for _ in range(max(1, len(pick) // 10))]
        ids = pick + unknown
        rng.shuffle(ids)
        script = write_rotation_script(out / "rotate_customers.lua", ids)
        wrk = Wrk(srv.url, script, a.threads, a.concurrency, logs / "wrk.log")
        load_desc = (f"wrk -t {a.threads} -c {a.concurrency} POST /recommend (top_k 12) rotating over {len(ids):,} "
                     f"customer ids ({len(unknown)} unknown = cold start); service pid {srv.pid} (1 worker); "
                     f"{cores} CPU cores shared by wrk, the service and the refresh")
        print(f"service {srv.url} serving v{version} as of {holdout}; load: {load_desc}", flush=True)
        load_before = os.getloadavg()[0]
        w = wrk.start()
        time.sleep(a.steady_seconds)
        steady = w.stop()
        print(f"steady (no refresh): {steady['requests']:,} requests in {steady['seconds']:.1f} s, p50 "
              f"{steady['p50_ms']:.2f} ms, p99 {steady['p99_ms']:.2f} ms, failed {steady['failed']}", flush=True)

        # 3. each drop week: refresh as of its start under load, ingest the drop, score its buyers
        for i, (week, drop) in enumerate(zip(weeks, drops)):
            w = wrk.start()
            t0 = time.perf_counter()
            pub = pipeline.publish_state(version, week, settings)
            refresh_s = time.perf_counter() - t0
            load_pub = w.stop()
            w = wrk.start()
            time.sleep(a.settle)
            sw = pipeline.switch(version, week.isoformat(), srv.url)
            time.sleep(a.settle)
            load_swap = w.stop()
            if sw["status"] != "switched":
                raise SystemExit(f"the switch to v{version} as of {week} did not happen: {sw}")
            # the worker's own time to fetch, verify and load the state before the swap (switch_service's
            # seconds also hold its confirmations: three consecutive /metadata reads 0.5 s apart)
            last = (httpx.get(f"{srv.url}/metadata", timeout=10).json().get("reloader") or {}).get("last") or {}
            swapped = last.get("status") == "swapped" and last.get("as_of") == week.isoformat()
            reload_s = last.get("seconds") if swapped else None
            refreshed = ServedState.load(layout.state_dir(version, week.isoformat()), expected_version=version,
                                         expected_as_of=week)
            in_state = set(refreshed.customer_index)
            sample = [c for c in pick if c in in_state][:a.parity]
            same = 0
            for c in sample:
                got = httpx.post(f"{srv.url}/recommend", json={"customer_id": c, "top_k": 12}, timeout=10).json()
                want = [r for r, _ in refreshed.recommend([c], 12)[0]]
                same += [r["article_id"] for r in got["recommendations"]] == want and got["as_of"] == week.isoformat()
            drop_out = ingest_drop(layout, drop, week, vconfig)
            wh = Warehouse(layout.warehouse_dir)
            res, per, truth = score_week(wh, week, {FROZEN: frozen, REFRESHED: refreshed}, config)
            best = ev.best_baseline(res)
            for n, v in per.items():
                pooled_per.setdefault(n, []).append(v)
            lo, hi = paired_bootstrap_ratio_ci(per[REFRESHED], per[FROZEN], n_bootstrap=2000, seed=0)
            diff = per[REFRESHED] - per[FROZEN]
            groups = {g: {"buyers": int(m.sum()), "frozen": float(per[FROZEN][m].mean()) if m.any() else None,
                          "refreshed": float(per[REFRESHED][m].mean()) if m.any() else None}
                      for g, m in buyer_groups(wh, truth, holdout, week).items()}
            row = {
                "week": week.isoformat(), "buyers": len(truth), "frozen_as_of": holdout.isoformat(),
                "frozen_age_weeks": (week - holdout).days // 7, "refreshed_as_of": week.isoformat(),
                "frozen_recall_at_12": res[FROZEN]["recall@12"], "refreshed_recall_at_12": res[REFRESHED]["recall@12"],
                "ratio": res[REFRESHED]["recall@12"] / max(res[FROZEN]["recall@12"], 1e-12),
                "ratio_ci95": [lo, hi], "customers_better": int((diff > 0).sum()),
                "customers_worse": int((diff < 0).sum()), "groups": groups,
                "frozen_map_at_12": res[FROZEN]["map@12"], "refreshed_map_at_12": res[REFRESHED]["map@12"],
                "frozen_recall_at_100": res[FROZEN]["recall@100"],
                "refreshed_recall_at_100": res[REFRESHED]["recall@100"],
                "best_heuristic": best, "best_heuristic_recall_at_12": res[best]["recall@12"],
                "heuristics_recall_at_12": {b: res[b]["recall@12"] for b in ev.BASELINES},
                "refresh_seconds": round(refresh_s, 1), "refresh_build": pub.get("build_seconds"),
                "switch_seconds": sw.get("seconds"), "switch_status": sw["status"], "reload_seconds": reload_s,
                "load_publish": load_pub, "load_swap": load_swap,
                "requests": load_pub["requests"] + load_swap["requests"],
                "failed": load_pub["failed"] + load_swap["failed"],
                "parity": f"{same}/{len(sample)}", "drop": drop_out,
            }
            rows.append(row)
            print(f"week {week}: {len(truth)} buyers; frozen (as of {holdout}) {row['frozen_recall_at_12']:.4f}, "
                  f"refreshed (as of {week}) {row['refreshed_recall_at_12']:.4f} ({row['ratio']:.2f}x), {best} "
                  f"{row['best_heuristic_recall_at_12']:.4f}; refresh {refresh_s:.1f} s, switch "
                  f"{sw.get('seconds')} s; {row['requests']:,} requests, {row['failed']} failed; service == "
                  f"refreshed state for {same}/{len(sample)} customers; drop {drop_out['rows']:,} rows "
                  f"{drop_out['status']} (drift {drop_out['drift_verdict']})", flush=True)
        final_meta = httpx.get(f"{srv.url}/metadata", timeout=10).json()
        load_after = os.getloadavg()[0]
    finally:
        if wrk is not None:
            wrk.kill()  # a window left open by an error
        srv.stop()

    # 4. pooled figures and the report
    cat = {n: np.concatenate(v) for n, v in pooled_per.items()}
    best_pooled = max(ev.BASELINES, key=lambda b: cat[b].mean())
    lo, hi = paired_bootstrap_ratio_ci(cat[REFRESHED], cat[FROZEN], n_bootstrap=2000, seed=0)
    n_cw = int(cat[FROZEN].size)
    pooled = {"customer_weeks": n_cw, "frozen_recall_at_12": float(cat[FROZEN].mean()),
              "refreshed_recall_at_12": float(cat[REFRESHED].mean()),
              "ratio": float(cat[REFRESHED].mean() / max(cat[FROZEN].mean(), 1e-12)), "ratio_ci95_low": lo,
              "ratio_ci95_high": hi, "best_heuristic": best_pooled,
              "best_heuristic_recall_at_12": float(cat[best_pooled].mean()),
              "refreshed_over_best_heuristic": float(cat[REFRESHED].mean() / max(cat[best_pooled].mean(), 1e-12)),
              "frozen_over_best_heuristic": float(cat[FROZEN].mean() / max(cat[best_pooled].mean(), 1e-12)),
              "requests": sum(r["requests"] for r in rows), "failed": sum(r["failed"] for r in rows),
              "refresh_seconds_mean": float(np.mean([r["refresh_seconds"] for r in rows])),
              "switch_seconds_max": float(max(r["switch_seconds"] for r in rows))}
    worse = [r for r in rows if r["refreshed_recall_at_12"] < r["frozen_recall_at_12"]]
    scale = (f"{a.data}: {len(wh.customers()):,} customers, {len(wh.articles()):,} articles; model v{version} "
             f"trained once on {split.describe()}")
    title = (f"FRESHNESS ({scale}); frozen = state as of {holdout} (the training holdout's start), refreshed = "
             f"state as of each week's start; Recall@12 on the week's buyers")
    table = week_table(rows, title)
    groups_txt = group_table(rows, "WHERE IT COMES FROM: paired bootstrap 95% CI of refreshed / frozen per week, "
                                   "buyers whose Recall@12 went up / down, and Recall@12 per buyer group (returning: "
                                   f"bought before {holdout}; recent: first bought between {holdout} and the "
                                   "week; new: first purchase in the week)")
    pooled_txt = (f"POOLED over {len(rows)} weeks, {n_cw:,} customer-weeks: frozen "
                  f"{pooled['frozen_recall_at_12']:.4f}, refreshed {pooled['refreshed_recall_at_12']:.4f}: "
                  f"refreshed / frozen {pooled['ratio']:.3f}x "
                  f"(paired bootstrap 95% CI [{lo:.3f}, {hi:.3f}]); best heuristic ({best_pooled}) "
                  f"{pooled['best_heuristic_recall_at_12']:.4f}: refreshed / best heuristic "
                  f"{pooled['refreshed_over_best_heuristic']:.3f}x, frozen / best heuristic "
                  f"{pooled['frozen_over_best_heuristic']:.3f}x")
    verdict = ("refreshed >= frozen in every week" if not worse else
               "refreshed < frozen in week(s) " + ", ".join(
                   f"{r['week']} ({r['refreshed_recall_at_12']:.4f} < {r['frozen_recall_at_12']:.4f}, "
                   f"{r['buyers']} buyers, ratio 95% CI [{r['ratio_ci95'][0]:.2f}, {r['ratio_ci95'][1]:.2f}]"
                   f"{': within noise' if r['ratio_ci95'][1] >= 1 else ': significant'})" for r in worse))
    swaps = swap_table(rows, steady, f"SWAPS UNDER LOAD: {load_desc}; 'publish' = build + publish of the refreshed "
                                     f"state, 'swap' = {a.settle:g} s + switch_service (reload, 3 confirmations) "
                                     f"+ {a.settle:g} s")
    load_txt = (f"under load: {pooled['requests']:,} requests during {len(rows)} refreshes, {pooled['failed']} failed "
                f"(non-2xx or socket errors); switch {min(r['switch_seconds'] for r in rows):.2f}.."
                f"{pooled['switch_seconds_max']:.2f} s; service answers == refreshed state for "
                + ", ".join(r["parity"] for r in rows) + " sampled customers; finally serving v"
                f"{final_meta['model_version']} as of {final_meta['as_of']}; 1-min load average {load_before:.1f} "
                f"before the load, {load_after:.1f} after the last refresh (on {cores} cores: anything else running "
                f"on the machine is in the latencies)")
    wall = time.perf_counter() - t_start
    timing = (f"wall time: training {train_facts['train_seconds']} s, frozen state {frozen_pub['seconds']} s, "
              f"refresh (build + publish) " + ", ".join(f"{r['refresh_seconds']:.1f}" for r in rows)
              + f" s, drops validated + ingested " + ", ".join(f"{r['drop']['seconds']:.1f}" for r in rows)
              + f" s; whole benchmark {wall:.0f} s")
    text = "\n".join([table, "", pooled_txt, verdict, "", groups_txt, "", swaps, load_txt, timing, *notes])
    print("\n" + text, flush=True)

    report = {"data": a.data, "overrides": a.overrides, "model_version": version,
              "training_holdout": holdout.isoformat(),
              "training": train_facts,
              "at_training": {"buyers": len(t_truth), "served_recall_at_12": at_training[FROZEN]["recall@12"],
                              "best_heuristic": best_t,
                              "best_heuristic_recall_at_12": at_training[best_t]["recall@12"]},
              "validation": vconfig.to_dict(), "validation_notes": notes, "cpu_cores": cores,
              "scale": {"customers": len(wh.customers()), "articles": len(wh.articles())},
              "load": {"tool": "wrk", "threads": a.threads, "connections": a.concurrency, "ids": len(ids),
                       "unknown_ids": len(unknown), "steady": steady,
                       "load_average_before": load_before, "load_average_after": load_after, "description": load_desc},
              "frozen_state_seconds": frozen_pub["seconds"], "weeks": rows, "pooled": pooled, "verdict": verdict,
              "refreshed_below_frozen": [r["week"] for r in worse], "wall_seconds": round(wall, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "freshness.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "freshness.txt").write_text(text + "\n")
    png = plot(rows, out / "freshness.png", f"{a.data}: frozen vs refreshed served state, Recall@12 per drop week")
    print(f"\nwritten: {out / 'freshness.txt'}, {out / 'freshness.json'}, {png}")
    if not a.no_mlflow:
        run_id = log_mlflow(settings, a.data, report, [png, out / "freshness.txt", out / "freshness.json"])
        print(f"MLflow: run {run_id} ({settings.mlflow_tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
