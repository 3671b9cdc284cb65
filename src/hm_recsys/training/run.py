"""One training run, in order, logged to one MLflow run; and ``hm-recsys train``.

1. Split (``hm_recsys.split.Split``): ``train_weeks`` training weeks, the
   validation week(s) (early stopping, the fusion's fit), the holdout week
   (final metrics). ``resolve_split``.
2. ``training.dataset.prepare``: weekly example shards, fitted features,
   validation weeks.
3. ``training.fit.fit``: the towers, with early stopping; then
   ``training.fit.fit_fusion``: the fusion of candidate sources.
4. Evaluate on the holdout week as served (``holdout_models``: histories as
   of its start, the same code path as ``/recommend``), next to the
   towers alone, every heuristic baseline and, on generated data, the oracle
   (``hm_recsys.evaluate``). The pipeline skips this step
   (``evaluate_holdout=False``): its gate scores the same holdout through the
   served index and logs those figures to this run (``pipeline.evaluate``).
5. Write the bundle (``hm_recsys.bundle``) and log params, per-epoch metrics,
   final metrics, plots and the pyfunc model to MLflow (``hm_recsys.tracking``).

The config (``training.config.Config``) is read from a TOML file with
``--set section.key=value`` overrides and saved with every model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hm_recsys.training.config import Config, load_config
from hm_recsys.training.dataset import prepare
from hm_recsys.training.fit import early_stopping, fit, fit_fusion, recommender

if TYPE_CHECKING:
    from hm_recsys.bundle import Recommender
    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.fusion import Fusion
    from hm_recsys.split import Split

MODEL_NAME = "two-tower"  # the towers alone, through the served index
SERVED = "served"  # what /recommend answers: every candidate source, fused
# The bundle's holdout metrics and the run's tag when the caller scores the holdout (the pipeline's gate).
HOLDOUT_BY_CALLER = "scored by the gate (pipeline.evaluate), through the served index, logged to this run"


@dataclass
class TrainResult:
    """What a training run produced.

    ``metrics``: holdout results by model name (``served``: what ``/recommend``
    answers; ``two-tower``: the towers alone; every ``evaluate.BASELINES``; and
    ``oracle`` when the data has one), each ``evaluate.evaluate_rankings``' dict;
    empty when the run did not evaluate the holdout (``evaluate_holdout=False``).
    ``table``: the comparison table text. ``seconds``: wall time of
    ``prepare``, ``fit``, ``fusion``, ``evaluate``, ``log`` (bundle + MLflow) and ``total``.
    """

    run_id: str
    bundle_dir: Path
    metrics: dict[str, dict[str, float]]
    split: Split
    table: str = ""
    model_uri: str = ""
    best_epoch: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage


def holdout_models(rec: Recommender, fusion: Fusion, config: Config, warehouse: Warehouse, split: Split,
                   out_dir: Path, label: str, progress: bool = True) -> tuple[dict[str, dict[str, list[str]]], Any]:
    """Rankings of the holdout's buyers: served (fused), the towers alone, every baseline (+ oracle).

    The served and tower rows go through a served state as of the holdout's
    start (``served.build_state``: the same code path as ``/recommend``);
    returns ``(models, truth)``.
    """
    from hm_recsys import evaluate
    from hm_recsys.fusion import Fusion
    from hm_recsys.served import build_state

    tc = config.train
    truth = evaluate.holdout_truth(warehouse, split)
    ids = list(truth.customer_ids)
    state = build_state(rec, warehouse, split.holdout_start, label, out_dir, config.retrieval, fusion, customers=ids,
                        progress=progress)
    towers = dataclasses.replace(config.retrieval, sources=("two_tower",))
    models = {SERVED: state.predictions(ids, tc.eval_k, tc.exclude_purchased),
              MODEL_NAME: state.predictions(ids, tc.eval_k, tc.exclude_purchased, fusion=Fusion.single("two_tower"),
                                            config=towers)}
    models.update(evaluate.baselines_for_split(warehouse, split, k=tc.eval_k, exclude_purchased=tc.exclude_purchased,
                                               customers=truth.customer_ids, progress=progress))
    return models, truth


def resolve_split(warehouse: Warehouse, config: Config, holdout_week: dt.date | None = None) -> Split:
    """The training split for ``config`` (validation weeks chosen as ``train.valid_weeks`` says)."""
    from hm_recsys.split import Split

    tc = config.train
    return Split.for_training(warehouse, tc.train_weeks, holdout_week, tc.valid_weeks, tc.min_valid_customers,
                              tc.max_valid_weeks)


def run_training(settings: Settings, config: Config, split: Split | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, progress: bool = True,
                 warehouse: Warehouse | Path | str | None = None, evaluate_holdout: bool = True) -> TrainResult:
    """Train the towers, fit the fusion, evaluate as served, write the bundle and log it all to one MLflow run.

    ``warehouse`` defaults to ``settings.layout.warehouse_dir``; ``split`` to
    ``resolve_split(warehouse, config)``. The bundle lands in
    ``settings.layout.bundle_dir(run_id)``. ``evaluate_holdout=False`` skips
    step 4 (the run is tagged ``holdout_evaluation``): for a caller that
    scores the holdout itself, as the pipeline's gate does, through the index
    it will serve, and logs that to this run (``tracking.log_results``).
    """
    import mlflow

    from hm_recsys import bundle, evaluate, tracking
    from hm_recsys.data.warehouse import Warehouse

    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse(warehouse or settings.layout.warehouse_dir)
    if split is None:
        split = resolve_split(warehouse, config)
    elif split.train_weeks != config.train.train_weeks:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, train_weeks=split.train_weeks))
    tracking.configure(settings)
    clock = {"start": time.perf_counter()}
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        run_id = run.info.run_id
        scratch = settings.layout.train_scratch_dir(run_id)
        label = f"run-{run_id[:12]}"  # the version label of this run's scratch states
        try:
            mlflow.set_tags({"split": split.describe(), "stage": "train", "model": MODEL_NAME,
                             "valid_weeks": str(split.valid_weeks)})
            tracking.log_params({"config": config.to_dict(), "split": split.to_dict()})
            prep = prepare(warehouse, split, config, scratch, progress)
            clock["prepare"] = time.perf_counter()
            mlflow.set_tag("data_sha256", prep.data_window["data_sha256"])
            tracking.log_params({"data": {k: v for k, v in prep.data_window.items() if k != "split"},
                                 "vocab": prep.state.cardinalities()})
            stopping = early_stopping(prep, config)
            mlflow.set_tag("early_stopping", "on" if stopping else
                           f"off: {prep.data_window['n_valid_customer_weeks']} validation customer-weeks < "
                           f"train.min_valid_customers {config.train.min_valid_customers}; "
                           f"{config.train.epochs} epochs, last kept")
            if not stopping and progress:
                print(f"early stopping off: {prep.data_window['n_valid_customer_weeks']} validation customer-weeks "
                      f"< {config.train.min_valid_customers}; training {config.train.epochs} epochs", flush=True)
            model, logs, best_epoch = fit(prep, config, progress, on_epoch=tracking.log_epoch)
            clock["fit"] = time.perf_counter()
            fusion = fit_fusion(model, prep, config, warehouse, scratch, label, progress)
            tracking.log_fusion(fusion)
            clock["fusion"] = time.perf_counter()
            rec = recommender(model, prep, prep.end_history, prep.end_raw)
            if evaluate_holdout:
                models, truth = holdout_models(rec, fusion, config, warehouse, split, scratch / "holdout-state",
                                               label, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tc = config.train
        week = f"{split.holdout_start}..{split.holdout_end - dt.timedelta(days=1)}"
        results: dict[str, dict[str, float]] = {}
        curves: dict = {}
        table = ""
        if evaluate_holdout:
            results, curves = evaluate.score_all(models, truth, catalogue_size=prep.tables.n_articles,
                                                 max_k=tc.eval_k)
            table = evaluate.comparison_table(results, title=f"holdout week {week}: {len(truth):,} scored "
                                                             f"customers ({SERVED} = what /recommend answers)")
            example_ids = list(truth.customer_ids[:2])
        else:
            mlflow.set_tag("holdout_evaluation", HOLDOUT_BY_CALLER)
            example_ids = [c for vw in prep.valid for c in sorted(vw.truth)][:2]
        clock["evaluate"] = time.perf_counter()
        metrics = {
            "holdout": results if evaluate_holdout else HOLDOUT_BY_CALLER,
            "best_epoch": best_epoch,
            "valid": logs[best_epoch - 1].valid,
            "epochs": [{"epoch": e.epoch, "train_loss": e.train_loss, "seconds": e.seconds,
                        "examples_per_second": e.examples_per_second, **{f"valid_{k}": v for k, v in e.valid.items()}}
                       for e in logs],
            "fusion": fusion.to_dict(),
        }
        full_config = {"features": config.features.to_dict(), "model": model.config.to_dict(),
                       "train": dataclasses.asdict(config.train), "retrieval": config.retrieval.to_dict()}
        bundle_dir = bundle.save(settings.layout.bundle_dir(run_id), rec, full_config, prep.data_window, metrics,
                                 fusion=fusion)
        if evaluate_holdout:
            tracking.log_results(results, best_epoch, model_name=SERVED)
            mlflow.log_text(table + "\n", "metrics_table.txt")
        else:
            mlflow.log_metric("best_epoch", float(best_epoch))
        tracking.log_plots(logs, curves, title=f"holdout week {week}")
        mlflow.log_dict(prep.data_window, "data_window.json")
        info = tracking.log_model(bundle_dir, example_ids=example_ids)
        clock["log"] = time.perf_counter()
        stages = ["start", "prepare", "fit", "fusion", "evaluate", "log"]
        seconds = {b: clock[b] - clock[a] for a, b in zip(stages, stages[1:])}
        seconds["total"] = clock["log"] - clock["start"]
        mlflow.log_metrics({f"seconds.{k}": v for k, v in seconds.items()})
    return TrainResult(run_id, bundle_dir, results, split, table, info.model_uri, best_epoch, seconds)


def main(argv: list[str] | None = None) -> int:
    """``hm-recsys train``."""
    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse

    from hm_recsys.cli import iso_date

    p = argparse.ArgumentParser(
        prog="hm-recsys train",
        description="Train the two towers on a time split (train weeks, validation week(s), holdout week), "
                    "fit the fusion of candidate sources on the validation weeks, score what the service would "
                    "answer against every heuristic baseline and the oracle, write the model bundle and log the "
                    "run to MLflow.",
    )
    p.add_argument("--config", type=Path, help="TOML schema file (default: built-in defaults, "
                                               "documented in configs/two_tower.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one option, value in TOML syntax (repeatable), e.g. --set train.temperature=0.1")
    p.add_argument("--train-weeks", type=int, help="training weeks (= --set train.train_weeks=N)")
    p.add_argument("--holdout-week", type=iso_date, metavar="YYYY-MM-DD",
                   help="a day in the holdout week (default: the last complete week in the warehouse)")
    p.add_argument("--epochs", type=int, help="maximum epochs (= --set train.epochs=N)")
    p.add_argument("--seed", type=int, help="random seed (= --set train.seed=N)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--warehouse", type=Path, help="warehouse folder (default $HM_RECSYS_HOME/data/warehouse)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    a = p.parse_args(argv)
    overrides = list(a.overrides)
    for flag, key in (("train_weeks", "train_weeks"), ("epochs", "epochs"), ("seed", "seed")):
        if getattr(a, flag) is not None:
            overrides.append(f"train.{key}={getattr(a, flag)}")
    settings = Settings.from_env()
    try:
        config = load_config(a.config, overrides)
        warehouse = Warehouse(a.warehouse or settings.layout.warehouse_dir)
        split = resolve_split(warehouse, config, a.holdout_week)
        print(f"split: {split.describe()}", flush=True)
        result = run_training(settings, config, split=split, run_name=a.run_name, progress=not a.no_progress,
                              warehouse=warehouse)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # WarehouseEmpty is a RuntimeError
        print(f"hm-recsys train: {e}", file=sys.stderr)
        return 1
    print(result.table)
    print(f"best epoch: {result.best_epoch}; wall time: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    print(f"mlflow run: {result.run_id} ({settings.mlflow_tracking_uri})")
    print(f"model: {result.model_uri}")
    print(f"bundle: {result.bundle_dir}")
    print(json.dumps({"run_id": result.run_id, "bundle_dir": str(result.bundle_dir)}))
    return 0
