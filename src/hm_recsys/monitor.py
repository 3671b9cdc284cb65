"""Live quality and drift of the champion, week by week, in one MLflow monitoring run per model version.

Every accepted drop is the ground truth for what was served during its week.
``live_quality`` finds each ingested week W that the champion served and has
not been scored yet, takes the served state that was live then (the
version's newest published state with ``as_of <= W``: a refresh after each
drop publishes ``as_of == W``), and scores what it answers for the customers
who bought in W (``ServedState.predictions``: the ``/recommend`` code path)
next to every heuristic baseline computed as of W on the same customers.

MLflow: run ``monitor v<version>`` (tag ``monitor_version``) in the project's
experiment; metrics ``live.recall_at_12``, ``live.map_at_12``,
``live.<baseline>.recall_at_12``, ``live.best_baseline.recall_at_12``,
``live.n_customers`` and the drop's drift statistics ``drift.<metric>``, all
with step = the week's ordinal (weeks since Wednesday 1969-12-31) so the UI charts
them week by week; ``plots/live_quality.png`` (served vs baselines per
week) and ``drift/<week>.png``. The version's tag ``live_quality_weeks``
lists the weeks scored (idempotent reruns). A week where the champion falls
below the best baseline is a warning; it fails the run only when asked
(``HM_RECSYS_LIVE_QUALITY_FAIL=1`` or ``fail_below_baseline=True``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hm_recsys.config import Settings
from hm_recsys.data.warehouse import Warehouse

MONITOR_TAG = "monitor_version"
SCORED_TAG = "live_quality_weeks"
WEEK_EPOCH = dt.date(1969, 12, 31)  # a Wednesday, as every H&M week start: step <-> week is exact


class LiveQualityBelowBaseline(RuntimeError):
    """The champion served worse than the best heuristic in a week (raised only when configured)."""


def week_step(week: dt.date) -> int:
    """The MLflow step of an H&M week (a Wednesday): weeks since Wednesday 1969-12-31."""
    return (week - WEEK_EPOCH).days // 7


def step_week(step: int) -> dt.date:
    """The H&M week (its Wednesday) of an MLflow step: the inverse of ``week_step``."""
    return WEEK_EPOCH + dt.timedelta(weeks=step)


def monitor_run(settings: Settings, version: str) -> tuple[str, str]:
    """``(run_id, experiment_id)`` of a model version's monitoring run (created on first use)."""
    import mlflow

    from hm_recsys import tracking

    exp_id = tracking.configure(settings)
    runs = mlflow.search_runs(experiment_ids=[exp_id], filter_string=f"tags.{MONITOR_TAG} = '{version}'",
                              output_format="list", order_by=["attributes.start_time ASC"])
    if runs:
        return runs[0].info.run_id, exp_id
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    run = client.create_run(exp_id, run_name=f"monitor v{version}",
                            tags={MONITOR_TAG: str(version), "stage": "monitor"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id, exp_id


def live_quality(settings: Settings | None = None, fail_below_baseline: bool | None = None,
                 weeks: list[dt.date] | None = None) -> dict[str, Any]:
    """Score the champion's live weeks not scored yet; log them to its monitoring run.

    ``weeks``: score exactly these (default: every ingested complete week
    that a published state of the champion served and that is not scored yet).
    Returns ``{"version", "weeks": [{week, as_of, served, best_baseline, ...}], "latest", "run_id"}``.
    """
    from hm_recsys import evaluate as ev
    from hm_recsys.registry import CHAMPION, Registry
    from hm_recsys.served import ServedState
    from hm_recsys.split import Split

    settings = settings or Settings.from_env()
    if fail_below_baseline is None:
        fail_below_baseline = os.environ.get("HM_RECSYS_LIVE_QUALITY_FAIL", "").strip() in ("1", "true", "yes")
    reg = Registry(settings)
    champion = reg.get(CHAMPION)
    if champion is None:
        print("no champion yet: no live quality to measure")
        return {"status": "no-champion", "weeks": []}
    version = champion.version
    states = reg.served_states(version)
    wh = Warehouse(settings.layout.warehouse_dir)
    last = wh.last_complete_week()
    scored = set(json.loads(reg.version(version).tags.get(SCORED_TAG, "[]")))
    if weeks is None:
        weeks = [w for w in wh.weeks() if w <= last and w.isoformat() not in scored
                 and any(s <= w.isoformat() for s in states)]
    if not weeks:
        print(f"version {version}: no new week to score (published states: {states or 'none'})")
        return {"status": "nothing-new", "version": version, "weeks": [], "run_id": None}

    import mlflow

    run_id, experiment_id = monitor_run(settings, version)
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    rows = []
    for week in sorted(weeks):
        live = [s for s in states if s <= week.isoformat()]
        if not live:
            continue
        as_of = live[-1]
        state = ServedState.load(reg.fetch_state(version, as_of).state_dir, expected_version=version, verify=False)
        tx = wh.transactions(week, week + dt.timedelta(weeks=1), columns=["customer_id", "article_id"])
        truth = ev.relevant_sets(tx)
        ids = list(truth.customer_ids)
        models = {"served": state.predictions(ids, 100)}
        models.update(ev.baselines_for_split(wh, Split.ending_at(week, train_weeks=1), k=100, customers=ids,
                                             include_oracle=False, progress=False))
        res, _ = ev.score_all(models, truth, max_k=100)
        best = ev.best_baseline(res)
        row = {"week": week.isoformat(), "as_of": as_of, "customers": len(truth),
               "served_recall_at_12": res["served"]["recall@12"], "served_map_at_12": res["served"]["map@12"],
               "best_baseline": best, "best_baseline_recall_at_12": res[best]["recall@12"],
               "baselines": {b: res[b]["recall@12"] for b in ev.BASELINES}}
        row["below_best_baseline"] = row["served_recall_at_12"] < row["best_baseline_recall_at_12"]
        rows.append(row)
        step = week_step(week)
        metrics = {"live.recall_at_12": row["served_recall_at_12"], "live.recall_at_100": res["served"]["recall@100"],
                   "live.map_at_12": row["served_map_at_12"], "live.n_customers": float(len(truth)),
                   "live.best_baseline.recall_at_12": row["best_baseline_recall_at_12"],
                   "live.state_age_weeks": float((week - dt.date.fromisoformat(as_of)).days // 7),
                   **{f"live.{b.replace('+', '_')}.recall_at_12": v for b, v in row["baselines"].items()}}
        for k, v in metrics.items():
            client.log_metric(run_id, k, v, step=step)
        drift = drift_of_week(settings, week)
        if drift is not None:
            log_drift(client, run_id, week, drift)
            row["drift_verdict"] = drift["report"].get("verdict")
        flag = "BELOW the best baseline" if row["below_best_baseline"] else "above the best baseline"
        print(f"live quality, week {week} (state as of {as_of}, {len(truth):,} buyers): served Recall@12 "
              f"{row['served_recall_at_12']:.4f}, MAP@12 {row['served_map_at_12']:.4f}; best heuristic {best} "
              f"{row['best_baseline_recall_at_12']:.4f}: {flag}"
              + (f"; drift {row['drift_verdict']}" if drift is not None else ""))
    client.set_model_version_tag(reg.name, version, SCORED_TAG,
                                 json.dumps(sorted(scored | {r["week"] for r in rows})))
    plot = plot_live(client, run_id, version)
    latest = rows[-1] if rows else None
    if latest:
        client.set_tag(run_id, "live.latest", f"week {latest['week']}: served R@12 {latest['served_recall_at_12']:.4f} "
                                              f"vs {latest['best_baseline']} {latest['best_baseline_recall_at_12']:.4f}")
    below = [r for r in rows if r["below_best_baseline"]]
    if below:
        msg = (f"WARNING: the champion v{version} served below the best heuristic in "
               + ", ".join(f"week {r['week']} ({r['served_recall_at_12']:.4f} < {r['best_baseline']} "
                           f"{r['best_baseline_recall_at_12']:.4f})" for r in below))
        print(msg)
        if fail_below_baseline:
            raise LiveQualityBelowBaseline(msg)
    return {"status": "scored", "version": version, "weeks": rows, "latest": latest, "run_id": run_id,
            "experiment_id": experiment_id, "plot": plot}


def drift_of_week(settings: Settings, week: dt.date) -> dict | None:
    """The drift section and plot path of the accepted drop of ``week``, if one was validated."""
    folder = settings.layout.drop_reports_dir
    if not folder.is_dir():
        return None
    for rep in sorted(folder.glob("*/report.json")):
        try:
            doc = json.loads(rep.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        drift = doc.get("drift") or {}
        if drift.get("week") == week.isoformat():
            plot = rep.parent / "drift.png"
            return {"report": drift, "plot": plot if plot.exists() else None}
    return None


def log_drift(client, run_id: str, week: dt.date, drift: Mapping[str, Any]) -> None:
    """Drift statistics of a week's drop as metrics (step = week) and its plot as ``drift/<week>.png``."""
    report = drift["report"]
    step = week_step(week)
    levels = {"ok": 0.0, "warn": 1.0, "drift": 2.0}
    for name, m in (report.get("metrics") or {}).items():
        value = m.get("value")
        if isinstance(value, (int, float)):
            client.log_metric(run_id, f"drift.{name}", float(value), step=step)
        if m.get("verdict") in levels:
            client.log_metric(run_id, f"drift.{name}.level", levels[m["verdict"]], step=step)
    if report.get("verdict") in levels:
        client.log_metric(run_id, "drift.level", levels[report["verdict"]], step=step)
    if drift.get("plot") is not None:
        client.log_artifact(run_id, str(drift["plot"]), f"drift/{week.isoformat()}")


def plot_live(client, run_id: str, version: str) -> str | None:
    """``plots/live_quality.png`` of the run: served vs every baseline's Recall@12, one point per week."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hm_recsys.evaluate import BASELINES

    series = {"served": "live.recall_at_12", **{b: f"live.{b.replace('+', '_')}.recall_at_12" for b in BASELINES}}
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for label, key in series.items():
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if not hist:
            continue
        x = [step_week(m.step) for m in hist]
        style = {"linewidth": 2.5, "color": "black", "marker": "o"} if label == "served" else {"linestyle": "--",
                                                                                                "marker": "."}
        ax.plot(x, [m.value for m in hist], label=label, **style)
        drawn = True
    if not drawn:
        return None
    ax.set_title(f"live Recall@12 of the served state, champion v{version}, per week")
    ax.set_xlabel("week (start)")
    ax.set_ylabel("Recall@12 (buyers of the week)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.autofmt_xdate()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "live_quality.png"
        fig.savefig(path, format="png")
        client.log_artifact(run_id, str(path), "plots")
    return "plots/live_quality.png"
