"""The retraining DAG run for real with ``dag.test()`` on tiny data: both gate branches.

Real Airflow (migrated sqlite DB, the DAG from the configured dags folder),
real MLflow (sqlite), real training, a real ScaNN index. One tiny dataset is
shared by the runs, in order: the first run promotes (no champion yet), the
second, deliberately starved of learning, is refused by the gate, and a bad
drop in the incoming folder stops a third before training.
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The model of tests/unit/test_train.py::tiny_config, as DAG params.
TINY = [
    "features.history_weeks=8", "features.history_length=8", "features.postal_buckets=64",
    "model.embedding_dim=8", "model.customer_layers=[32]", "model.article_layers=[32]", "model.output_dim=16",
    "train.batch_size=256", "train.uniform_negatives=64", "train.temperature=0.1", "train.sparse_lr=0.02",
    "train.valid_max_customers=0", "train.threads=1", "train.patience=4",
]
GOOD = [*TINY, "train.lr=0.005", "train.epochs=4"]
STARVED = [*TINY, "train.lr=0.0000001", "train.sparse_lr=0.0000001", "train.epochs=1"]


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


def test_first_run_promotes_second_is_refused(dag, retrain_env, monkeypatch):
    from hm_recsys.registry import CHALLENGER, CHAMPION, Registry

    monkeypatch.setenv("HM_RECSYS_DEPLOY_BENTO", "0")  # the Bento build is tested with the service
    first = dag.test(run_conf={"train_weeks": 8, "overrides": GOOD, "gate_margin": 0.0})
    s1 = _states(first)
    assert s1["promote"] == "success" and s1["deploy"] == "success", s1
    assert s1["keep_champion"] == "skipped" and s1["report"] == "success"
    reg = Registry()
    assert reg.aliases() == {CHALLENGER: "1", CHAMPION: "1"}
    v1 = reg.version("1")
    assert v1.tags["gate.promote"] == "True" and "no champion yet" in v1.tags["gate.reason"]
    assert v1.tags["airflow_run_id"] == first.run_id

    second = dag.test(run_conf={"train_weeks": 8, "overrides": STARVED, "gate_margin": 0.0})
    s2 = _states(second)
    assert s2["keep_champion"] == "success" and s2["promote"] == "skipped" and s2["deploy"] == "skipped", s2
    assert reg.aliases() == {CHALLENGER: "2", CHAMPION: "1"}
    reason = reg.version("2").tags["gate.reason"]
    assert reason.startswith("keep champion:"), reason


def test_gate_cli_judges_a_version_and_rollback_restores_the_champion(dag, retrain_env, capsys):
    """After the two runs above: `hm-recsys gate` re-judges v2, a forced promotion is recorded, rollback undoes it."""
    from hm_recsys import cli
    from hm_recsys.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry

    reg = Registry()
    assert reg.aliases() == {CHALLENGER: "2", CHAMPION: "1"}, "runs after test_first_run_promotes_second_is_refused"
    capsys.readouterr()
    assert cli.main(["gate", "--version", "2", "--gate-margin", "0", "--promote"]) == 3
    out = capsys.readouterr().out
    assert "challenger v2" in out and "champion v1" in out and "popularity" in out
    assert "gate decision: keep champion:" in out
    assert reg.aliases() == {CHALLENGER: "2", CHAMPION: "1"}  # --promote acts only on a promote decision

    assert cli.main(["gate", "--version", "2", "--promote", "--force-reason", "test: override the gate"]) == 0
    assert reg.aliases() == {CHALLENGER: "2", CHAMPION: "2", PREVIOUS: "1"}
    tags = reg.version("2").tags
    assert tags["gate.forced"] == "True" and "test: override the gate" in tags["gate.reason"]

    assert cli.main(["rollback"]) == 0
    assert reg.aliases()[CHAMPION] == "1"


def test_rejected_drop_stops_the_run_before_training(dag, retrain_env, tiny_raw):
    incoming = retrain_env.incoming_dir
    incoming.mkdir(parents=True, exist_ok=True)
    bad = incoming / "transactions_2020-09-23.csv"
    payload = b"t_dat,customer_id,article_id,price,sales_channel_id\n2020-09-23,nothex,0108775015,0.05,2\n"
    bad.write_bytes(payload)
    run = dag.test(run_conf={"train_weeks": 8, "overrides": GOOD})
    s = _states(run)
    assert s["validate_incoming"] == "failed", s
    assert s["check_data"] == "upstream_failed" and s["train"] == "upstream_failed"
    assert not bad.exists()
    # the drop itself sits at the top of its quarantine folder, byte for byte, next to its report
    quarantined = list(retrain_env.quarantine_dir.glob("*/transactions_2020-09-23.csv"))
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == payload
    assert (quarantined[0].parent / "report.json").exists()
