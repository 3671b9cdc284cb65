"""Benchmark: rolling-origin quality of what the service answers, against every heuristic.

    .venv/bin/python bench/quality.py --data movielens --fetch        # the real dev set (MovieLens-100k)
    .venv/bin/python bench/quality.py --data movielens --wheel /path/recbole-1.2.1-py3-none-any.whl
    .venv/bin/python bench/quality.py --data small                    # generated H&M-format data
    .venv/bin/python bench/quality.py --data small --weeks 4 --seeds 3 --set train.epochs=5

For each of ``--weeks`` consecutive holdout weeks (ending at the last
complete week), the model is trained from scratch on the weeks before it with
the same config (``train.prepare`` / ``fit`` / ``fit_fusion``: what
``hm-recsys train`` and the DAG run), and on the SAME holdout customers it
scores:

* ``served``: what ``/recommend`` answers (``served.ServedState``: every
  candidate source, fused, through the ScaNN index);
* ``two-tower``: the towers alone, through the same index;
* every heuristic baseline (popularity, repurchase+popularity,
  trending+decayed-repurchase) and the oracle on generated data;
* the ablation: each candidate source alone, and the fusion without each source.

It prints per-week and pooled (over all customer-weeks) Recall@12,
Recall@100 and MAP@12, the ratio "served / best heuristic" (the baseline
with the highest pooled Recall@12) with a paired bootstrap 95% CI over
customer-weeks, and the spread over ``--seeds`` seeds on the last week. One
MLflow parent run holds a nested run per week, the pooled figures and a plot
of the per-week Recall@12 (``plots/per_week_recall_at_12.png``); tables and
the JSON land in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _datasets import DATASETS, plot_weekly, warehouse_for  # noqa: E402

from hm_recsys import evaluate as ev  # noqa: E402
from hm_recsys import train  # noqa: E402
from hm_recsys.candidates import SOURCES  # noqa: E402
from hm_recsys.fusion import Fusion  # noqa: E402
from hm_recsys.gate import paired_bootstrap_ratio_ci  # noqa: E402
from hm_recsys.split import WEEK  # noqa: E402

SHOWN = ("recall@12", "recall@100", "map@12")


def one_week(wh, holdout: dt.date, config, scratch: Path, ablation: bool) -> tuple[dict, object, dict]:
    """Train for one holdout week and rank its buyers with every model; returns (models, truth, facts)."""
    from hm_recsys.served import ServedState

    t0 = time.perf_counter()
    split = train.resolve_split(wh, config, holdout)
    prep = train.prepare(wh, split, config, scratch / "shards", progress=False)
    model, logs, best = train.fit(prep, config, progress=False)
    fusion = train.fit_fusion(model, prep, config, wh, scratch, "bench", progress=False)
    rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
    models, truth = train.holdout_models(rec, fusion, config, wh, split, scratch / "holdout", "bench", False)
    if ablation:
        state = ServedState.load(scratch / "holdout", verify=False)
        ids = list(truth.customer_ids)
        r = config.retrieval
        k = config.train.eval_k
        for src in SOURCES:
            models[f"{src} alone"] = state.predictions(ids, k, fusion=Fusion.single(src),
                                                       config=dataclasses.replace(r, sources=(src,)))
            others = tuple(s for s in r.sources if s != src)
            if others:
                models[f"served without {src}"] = state.predictions(
                    ids, k, config=dataclasses.replace(r, sources=others))
    facts = {"split": split.describe(), "valid_weeks": split.valid_weeks, "best_epoch": best,
             "early_stopping": train.early_stopping(prep, config), "fusion": fusion.describe(),
             "fusion_fit": dict(fusion.fitted), "seconds": round(time.perf_counter() - t0, 1)}
    shutil.rmtree(scratch, ignore_errors=True)
    return models, truth, facts


def pooled_table(per_week: list[tuple[dt.date, dict, object]]) -> tuple[dict[str, dict[str, float]], dict]:
    """Pooled metrics over every customer-week, and the per-customer Recall@12 arrays (for CIs)."""
    names = list(per_week[0][1])
    recall12, out = {}, {}
    for name in names:
        r12, r100, ap = [], [], []
        for _, models, truth in per_week:
            m12 = ev.per_customer_metrics(models[name], truth, k=12)
            m100 = ev.per_customer_metrics(models[name], truth, k=100)
            r12.append(m12.recall)
            r100.append(m100.recall)
            ap.append(m12.ap12)
        recall12[name] = np.concatenate(r12)
        out[name] = {"recall@12": float(recall12[name].mean()), "recall@100": float(np.concatenate(r100).mean()),
                     "map@12": float(np.concatenate(ap).mean()), "n_customers": float(recall12[name].size)}
    return out, recall12


def fmt_table(rows: dict[str, dict[str, float]], title: str, keep=None) -> str:
    sel = {k: {m: v[m] for m in (*SHOWN, "n_customers") if m in v} for k, v in rows.items()
           if keep is None or k in keep}
    return ev.comparison_table(sel, title=title)


def plot_weeks(weeks: list[dt.date], per_week: dict[str, list[float]], path: Path, title: str) -> Path:
    styles = {name: {"linewidth": 2.5, "color": "black"} if name == train.SERVED else {"linestyle": "--"}
              for name in per_week}
    return plot_weekly([w.isoformat() for w in weeks], {n: (ys, styles[n]) for n, ys in per_week.items()}, path,
                       title, "holdout week (start)", "Recall@12")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=DATASETS, default="movielens")
    p.add_argument("--wheel", type=Path, help="recbole-1.2.1-py3-none-any.whl (MovieLens-100k inside)")
    p.add_argument("--fetch", action="store_true", help="download the recbole wheel from the package registry")
    p.add_argument("--weeks", type=int, default=4, help="consecutive holdout weeks (default 4)")
    p.add_argument("--last-holdout", type=dt.date.fromisoformat, metavar="YYYY-MM-DD",
                   help="the last holdout week (default: the warehouse's last complete week)")
    p.add_argument("--seeds", type=int, default=3, help="seeds trained on the last week for the spread (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="model config override, as for hm-recsys train (the same for every week)")
    p.add_argument("--no-ablation", action="store_true", help="skip the per-source ablation rows")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("HM_RECSYS_HOME", "var")) / "bench-data",
                   help="where datasets are made once (default $HM_RECSYS_HOME/bench-data)")
    p.add_argument("--out", type=Path, help="write tables and JSON here (default $HM_RECSYS_HOME/bench/quality-<data>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the parent/nested MLflow runs")
    a = p.parse_args()
    if a.weeks < 1 or a.seeds < 1:
        p.error("--weeks and --seeds must be >= 1")
    os.environ.setdefault("GLOG_minloglevel", "2")  # ScaNN's C++ logging

    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse

    settings = Settings.from_env()
    out = a.out or settings.home / "bench" / f"quality-{a.data}"
    out.mkdir(parents=True, exist_ok=True)
    wh = Warehouse(warehouse_for(a.data, a.cache, a.wheel, a.fetch))
    config = train.load_config(None, a.overrides)
    last = a.last_holdout or wh.last_complete_week()
    weeks = [last - (a.weeks - 1 - i) * WEEK for i in range(a.weeks)]
    print(f"{a.data}: warehouse {wh.root}, holdout weeks {', '.join(map(str, weeks))}"
          + (f", overrides {a.overrides}" if a.overrides else ""), flush=True)

    results: list[tuple[dt.date, dict, object]] = []
    facts: dict[str, dict] = {}
    week_tables = []
    for w in weeks:
        models, truth, f = one_week(wh, w, config, out / "scratch", ablation=not a.no_ablation)
        results.append((w, models, truth))
        facts[w.isoformat()] = f
        scores, _ = ev.score_all(models, truth, max_k=100)
        best = ev.best_baseline(scores)
        ratio = scores[train.SERVED]["recall@12"] / max(scores[best]["recall@12"], 1e-12)
        week_tables.append(fmt_table(scores, f"holdout {w}: {len(truth)} customers; served / best heuristic "
                                             f"({best}) = {ratio:.2f}x; valid weeks {f['valid_weeks']}, "
                                             f"early stopping {'on' if f['early_stopping'] else 'off'}, "
                                             f"best epoch {f['best_epoch']}; fusion {f['fusion']}"))
        print(week_tables[-1] + "\n", flush=True)

    pooled, r12 = pooled_table(results)
    best = ev.best_baseline(pooled)
    ratio = pooled[train.SERVED]["recall@12"] / pooled[best]["recall@12"]
    lo, hi = paired_bootstrap_ratio_ci(r12[train.SERVED], r12[best], n_bootstrap=2000, seed=0)
    main_rows = [train.SERVED, train.MODEL_NAME, *ev.BASELINES, ev.ORACLE]
    n_cw = int(pooled[train.SERVED]["n_customers"])
    pooled_txt = fmt_table(pooled, f"POOLED over {len(weeks)} weeks, {n_cw} customer-weeks ({a.data})", main_rows)
    verdict = (f"served / best heuristic ({best}) Recall@12: {ratio:.3f}x, paired bootstrap 95% CI "
               f"[{lo:.3f}, {hi:.3f}] over customer-weeks")
    ablation_txt = ""
    if not a.no_ablation:
        keep = [train.SERVED, train.MODEL_NAME, *(f"{s} alone" for s in SOURCES),
                *(f"served without {s}" for s in SOURCES)]
        ablation_txt = fmt_table(pooled, f"ABLATION, pooled over {len(weeks)} weeks ({a.data})",
                                 [k for k in keep if k in pooled])
    print(pooled_txt, verdict, "", ablation_txt, sep="\n", flush=True)

    # the spread over seeds on the last week
    seed_rows = []
    base_seed = config.train.seed
    for i in range(a.seeds):
        if i == 0:
            models, truth = results[-1][1], results[-1][2]
        else:
            cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=base_seed + i))
            models, truth, _ = one_week(wh, weeks[-1], cfg, out / "scratch", ablation=False)
        s, _ = ev.score_all({k: models[k] for k in (train.SERVED, train.MODEL_NAME, best)}, truth, max_k=100)
        seed_rows.append((base_seed + i, s[train.SERVED]["recall@12"], s[train.MODEL_NAME]["recall@12"],
                          s[best]["recall@12"]))
    served_seeds = np.array([r[1] for r in seed_rows])
    seeds_txt = "\n".join([f"SEEDS on {weeks[-1]} ({len(results[-1][2])} customers): served Recall@12 per seed "
                           + ", ".join(f"{s}: {v:.4f}" for s, v, _, _ in seed_rows),
                           f"  mean {served_seeds.mean():.4f}, std {served_seeds.std(ddof=1) if a.seeds > 1 else 0:.4f}"
                           f", variance {served_seeds.var(ddof=1) if a.seeds > 1 else 0:.6f}; "
                           f"two-tower {', '.join(f'{t:.4f}' for _, _, t, _ in seed_rows)}; "
                           f"{best} {seed_rows[0][3]:.4f}"])
    print("\n" + seeds_txt, flush=True)

    per_week_r12 = {}
    for name in main_rows:
        if name in pooled:
            per_week_r12[name] = [ev.score_all({name: m[name]}, t, max_k=100)[0][name]["recall@12"]
                                  for _, m, t in results]
    plot = plot_weeks(weeks, per_week_r12, out / "per_week_recall_at_12.png",
                      f"{a.data}: Recall@12 per holdout week (served vs heuristics)")
    report = {"data": a.data, "weeks": [w.isoformat() for w in weeks], "overrides": a.overrides,
              "pooled": pooled, "best_baseline": best, "ratio": ratio, "ratio_ci95": [lo, hi],
              "per_week_recall_at_12": per_week_r12, "facts": facts,
              "seeds": [{"seed": s, "served": v, "two_tower": t, "best_baseline": b} for s, v, t, b in seed_rows]}
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "quality.txt").write_text("\n\n".join([*week_tables, pooled_txt, verdict, ablation_txt, seeds_txt]) + "\n")
    print(f"\nwritten: {out / 'quality.txt'}, {out / 'quality.json'}, {plot}")
    if not a.no_mlflow:
        log_mlflow(settings, a.data, weeks, results, pooled, best, ratio, (lo, hi), facts, plot, out)
    return 0


def log_mlflow(settings, data, weeks, results, pooled, best, ratio, ci, facts, plot, out) -> None:
    """One parent run (pooled figures, the plot, the tables), a nested run per week."""
    import mlflow

    from hm_recsys import tracking

    tracking.configure(settings)
    with mlflow.start_run(run_name=f"quality {data} ({len(weeks)} weeks)", tags={"stage": "bench-quality"}) as parent:
        mlflow.log_params({"data": data, "weeks": ",".join(map(str, weeks)), "best_baseline": best})
        for name, res in pooled.items():
            prefix = "" if name == train.SERVED else f"{tracking.metric_key(name).replace(' ', '_')}."
            mlflow.log_metrics({prefix + tracking.metric_key(k): v for k, v in res.items()})
        mlflow.log_metrics({"ratio_vs_best_baseline": ratio, "ratio_ci95_low": ci[0], "ratio_ci95_high": ci[1]})
        mlflow.log_artifact(str(plot), "plots")
        mlflow.log_artifact(str(out / "quality.txt"))
        for step, (w, models, truth) in enumerate(results):
            scores, _ = ev.score_all(models, truth, max_k=100)
            with mlflow.start_run(run_name=f"holdout {w}", nested=True):
                mlflow.log_params({"holdout_week": w.isoformat(), **{k: str(v)[:500] for k, v in facts[w.isoformat()].items()}})
                for name, res in scores.items():
                    prefix = "" if name == train.SERVED else f"{tracking.metric_key(name).replace(' ', '_')}."
                    mlflow.log_metrics({prefix + tracking.metric_key(k): v for k, v in res.items()
                                        if np.isfinite(v)})
            mlflow.log_metric("served_recall_at_12_per_week", scores[train.SERVED]["recall@12"], step=step)
        print(f"MLflow: parent run {parent.info.run_id} ({settings.mlflow_tracking_uri})")


if __name__ == "__main__":
    sys.exit(main())
