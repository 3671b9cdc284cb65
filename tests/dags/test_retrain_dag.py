"""The retraining DAG run for real with ``dag.test()`` on tiny data: every gate rule, and parity.

Real Airflow (migrated sqlite DB, the DAG from the configured dags folder),
real MLflow (sqlite), real training, a real ScaNN index. One tiny dataset is
shared by the runs, in order: a model whose served answer loses to a
heuristic is refused with no champion to compare with (the floor); a good
model promotes and is deployed as of the newest week; its training equals
``hm-recsys train`` and ``hm-recsys retrain`` on the same data (parity); a
starved model is refused; a bad drop in the incoming folder stops a run
before training.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The model of tests/unit/test_train.py::tiny_config, as DAG params. The features look back 8 weeks
# before the training window: a snapshot of only the split's weeks would change what they see.
TINY = [
    "features.history_weeks=8", "features.history_length=8", "features.postal_buckets=64",
    "model.embedding_dim=8", "model.customer_layers=[32]", "model.article_layers=[32]", "model.output_dim=16",
    "train.batch_size=256", "train.uniform_negatives=64", "train.temperature=0.1", "train.sparse_lr=0.02",
    "train.valid_max_customers=0", "train.threads=1", "train.patience=4",
]
TRAIN_WEEKS = 28
GOOD = [*TINY, "train.lr=0.005", "train.epochs=8"]
# towers that learnt nothing, served alone: their answer loses to every heuristic
STARVED = [*TINY, "train.lr=0.0000001", "train.sparse_lr=0.0000001", "train.epochs=1",
           "retrieval.sources=['two_tower']"]


@pytest.fixture(scope="module")
def retrain_env(airflow_home, tiny_warehouse_ro, tiny_raw):
    """The tiny warehouse placed as the runtime folder's warehouse; HM_RECSYS_HOME = airflow_home."""
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    assert layout.home == airflow_home
    shutil.copytree(tiny_warehouse_ro, layout.warehouse_dir)
    return layout


@pytest.fixture(scope="module")
def dag(retrain_env):
    from airflow.dag_processing.dagbag import DagBag

    from .conftest import DAGS

    return DagBag(dag_folder=str(DAGS)).dags["hm_retrain"]


def _states(dr) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def test_a_model_that_loses_to_a_heuristic_is_refused_even_without_a_champion(dag, retrain_env, monkeypatch):
    from hm_recsys.registry import CHALLENGER, Registry

    monkeypatch.setenv("HM_RECSYS_DEPLOY_BENTO", "0")
    run = dag.test(run_conf={"train_weeks": TRAIN_WEEKS, "overrides": STARVED, "gate_margin": 0.0})
    s = _states(run)
    assert s["keep_champion"] == "success" and s["promote"] == "skipped" and s["deploy"] == "skipped", s
    reg = Registry()
    assert reg.aliases() == {CHALLENGER: "1"}  # no champion: nothing served
    tags = reg.version("1").tags
    assert tags["gate.rule"] == "floor" and tags["gate.promote"] == "False"
    assert tags["gate.reason"].startswith("refused by the floor: recall@12") and "vs best heuristic" in tags["gate.reason"]


def test_first_good_run_promotes_and_serves_the_newest_week_second_is_refused(dag, retrain_env, monkeypatch):
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.registry import CHALLENGER, CHAMPION, Registry
    from hm_recsys.served import ServedState

    monkeypatch.setenv("HM_RECSYS_DEPLOY_BENTO", "0")  # the Bento build is tested with the service
    first = dag.test(run_conf={"train_weeks": TRAIN_WEEKS, "overrides": GOOD, "gate_margin": 0.0})
    s1 = _states(first)
    assert s1["promote"] == "success" and s1["deploy"] == "success", s1
    assert s1["keep_champion"] == "skipped" and s1["report"] == "success"
    reg = Registry()
    assert reg.aliases() == {CHALLENGER: "2", CHAMPION: "2"}
    v2 = reg.version("2")
    assert v2.tags["gate.promote"] == "True" and v2.tags["gate.rule"] == "no-champion", v2.tags["gate.reason"]
    assert v2.tags["airflow_run_id"] == first.run_id
    # deploy serves as of the NEWEST week, not the gated holdout's start
    newest = Warehouse(retrain_env.warehouse_dir).last_complete_week() + dt.timedelta(weeks=1)
    assert reg.served_as_of("2") == newest.isoformat() and v2.tags["holdout_start"] < newest.isoformat()
    state = ServedState.load(reg.fetch_state("2").state_dir, expected_version="2", expected_as_of=newest)
    assert state.n_customers > 0 and state.index_rows.size > 0

    second = dag.test(run_conf={"train_weeks": TRAIN_WEEKS, "overrides": STARVED, "gate_margin": 0.0})
    s2 = _states(second)
    assert s2["keep_champion"] == "success" and s2["promote"] == "skipped" and s2["deploy"] == "skipped", s2
    assert reg.aliases() == {CHALLENGER: "3", CHAMPION: "2"}
    reason = reg.version("3").tags["gate.reason"]
    assert reason.startswith("keep champion (rule: floor):"), reason
    assert "lift" in reason and "CI of the gain" in reason  # the champion comparison is reported too


def test_parity_dag_cli_train_and_retrain_learn_the_same_model(dag, retrain_env, tmp_path):
    """Same data, seed and config: the DAG's model == `hm-recsys train`'s == `hm-recsys retrain`'s.

    The same weights to the last bit, the same validation metrics every epoch, identical feature state
    (vocabularies, histories, article facts) and fusion. The DAG and `retrain` train on their snapshot,
    `train` on the warehouse itself. The pipeline's train leaves the holdout to its gate, which logs
    the same headline metrics to the run as `hm-recsys train` does.
    """
    import hashlib
    import json

    import mlflow
    import numpy as np
    import pandas as pd

    from hm_recsys import pipeline
    from hm_recsys import train as T
    from hm_recsys.config import Settings
    from hm_recsys.registry import Registry

    reg = Registry()
    dag_bundle = reg.fetch("2").bundle_dir  # the DAG run above
    params = {"train_weeks": TRAIN_WEEKS, "overrides": GOOD}
    config = T.load_config(None, [*GOOD, f"train.train_weeks={TRAIN_WEEKS}"])
    cli = T.run_training(Settings.from_env(), config, progress=False)  # = hm-recsys train
    checked = pipeline.check_data(params, run_id="parity-retrain")
    retrained = pipeline.train(pipeline.build_snapshot(checked, "parity-retrain"), params, "parity-retrain")
    assert cli.split.to_dict() == checked["split"]

    def facts(folder):
        feats = folder / "features"
        with np.load(feats / "history.npz") as z:
            hist = {k: z[k].tolist() for k in z.files}
        return {
            "weights": hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest(),
            "epochs": [{k: v for k, v in e.items() if k not in ("seconds", "examples_per_second")}  # not timings
                       for e in json.loads((folder / "metrics.json").read_text())["epochs"]],
            "valid": {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items()
                      if k in ("best_epoch", "valid")},
            "state": (feats / "state.json").read_text(),
            "vocabularies": pd.read_parquet(feats / "vocabularies.parquet").to_dict("list"),
            "articles": pd.read_parquet(feats / "articles.parquet").astype(str).to_dict("list"),  # NaN == NaN
            "history": hist,
            "fusion": (folder / "fusion.json").read_text(),
            "window": {k: v for k, v in json.loads((folder / "data_window.json").read_text()).items()},
        }

    want = facts(cli.bundle_dir)
    assert json.loads((cli.bundle_dir / "metrics.json").read_text())["holdout"]["served"]["recall@12"] > 0
    # the DAG's run: the gate scored the holdout through the served index and logged it as `train` does
    run = mlflow.MlflowClient(Settings.from_env().mlflow_tracking_uri).get_run(reg.version("2").run_id)
    assert run.data.tags["holdout_evaluation"] == T.HOLDOUT_BY_CALLER
    m = run.data.metrics
    assert m["recall_at_12"] == pytest.approx(m["gate.challenger.recall_at_12"])
    assert {"two-tower.recall_at_12", "lift_vs_best_baseline.recall_at_12", "best_epoch"} <= set(m)
    # XCom carries paths relative to the shared data root: the same files on any worker host
    assert not Path(retrained["bundle_dir"]).is_absolute() and not Path(retrained["warehouse"]).is_absolute()
    for other in (dag_bundle, Settings.from_env().layout.from_shared(retrained["bundle_dir"])):
        got = facts(other)
        for key in want:
            assert got[key] == want[key], f"{other}: {key} differs from hm-recsys train's"
    assert want["window"]["history_weeks"] == 8 and want["history"]["days_ago"]
    assert max(want["history"]["days_ago"]) > 7 * 2  # histories reach back before the training window


def test_gate_cli_judges_a_version_and_rollback_restores_the_champion(dag, retrain_env, capsys):
    """After the two runs above: `hm-recsys gate` re-judges v2, a forced promotion is recorded, rollback undoes it."""
    from hm_recsys import cli
    from hm_recsys.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry

    reg = Registry()
    aliases = reg.aliases()
    assert (aliases[CHAMPION], aliases[CHALLENGER]) == ("2", "3"), "runs after the tests above"
    capsys.readouterr()
    assert cli.main(["gate", "--version", "3", "--gate-margin", "0", "--promote"]) == 3
    out = capsys.readouterr().out
    assert "challenger v3" in out and "champion v2" in out and "trending+decayed-repurchase" in out
    assert "gate decision: keep champion (rule: floor):" in out
    assert reg.aliases()[CHAMPION] == "2"  # --promote acts only on a promote decision

    # a holdout week the champion learnt from cannot judge it: an error, not a comparison
    early = reg.version("2").tags["holdout_start"]
    capsys.readouterr()
    old_week = (dt.date.fromisoformat(early) - dt.timedelta(weeks=3)).isoformat()
    assert cli.main(["gate", "--version", "3", "--holdout-week", old_week]) == 1
    err = capsys.readouterr().err
    assert "champion learnt from data up to" in err and "reaches into that week" in err

    assert cli.main(["gate", "--version", "3", "--promote", "--force-reason", "test: override the gate"]) == 0
    assert reg.aliases()[CHAMPION] == "3" and reg.aliases()[PREVIOUS] == "2"
    tags = reg.version("3").tags
    assert tags["gate.forced"] == "True" and "test: override the gate" in tags["gate.reason"]

    assert cli.main(["rollback"]) == 0
    assert reg.aliases()[CHAMPION] == "2"


def test_rejected_drop_stops_the_run_before_training(dag, retrain_env, tiny_raw):
    incoming = retrain_env.incoming_dir
    incoming.mkdir(parents=True, exist_ok=True)
    bad = incoming / "transactions_2020-09-23.csv"
    payload = b"t_dat,customer_id,article_id,price,sales_channel_id\n2020-09-23,nothex,0108775015,0.05,2\n"
    bad.write_bytes(payload)
    run = dag.test(run_conf={"train_weeks": TRAIN_WEEKS, "overrides": GOOD})
    s = _states(run)
    assert s["validate_incoming"] == "failed", s
    assert s["check_data"] == "upstream_failed" and s["train"] == "upstream_failed"
    assert not bad.exists()
    # the drop itself sits at the top of its quarantine folder, byte for byte, next to its report
    quarantined = list(retrain_env.quarantine_dir.glob("*/transactions_2020-09-23.csv"))
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == payload
    assert (quarantined[0].parent / "report.json").exists()
