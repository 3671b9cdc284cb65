"""The weekly pipeline on the production topology, and the faults it must survive.

One stack for the module (``scripts/prodstack.sh``: Airflow with the
CeleryExecutor on Postgres + Redis, two Celery workers with their own
runtime folders and hostnames, an MLflow tracking server on Postgres with
proxied artifacts, the service). The tests run in file order on it:

1. a drop goes through ``hm_ingest``, then ``hm_retrain`` runs end to end on
   the workers and the running service answers with the promoted version;
2. a worker is killed (-9, its whole process tree) during ``train``: the
   task is retried on the other worker, one version and one gate state result;
3. the scheduler is restarted mid-run: the run completes;
4. MLflow is down when ``register`` runs: it fails with a clear error, is
   retried once MLflow is back, and exactly one version exists.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from tests.prodstack.conftest import TIMEOUT, ProdStack

pytestmark = [pytest.mark.prodstack, pytest.mark.integration, pytest.mark.slow]

# The tiny model of tests/dags/test_retrain_dag.py, as DAG params.
TINY = [
    "features.history_weeks=8", "features.history_length=8", "features.postal_buckets=64",
    "model.embedding_dim=8", "model.customer_layers=[32]", "model.article_layers=[32]", "model.output_dim=16",
    "train.batch_size=256", "train.uniform_negatives=64", "train.temperature=0.1", "train.sparse_lr=0.02",
    "train.valid_max_customers=0", "train.threads=1", "train.lr=0.005",
]
FAST = {"train_weeks": 28, "overrides": [*TINY, "train.epochs=4"], "gate_margin": 0.0}
# Long enough to be killed mid-way (~40 s a try here): many epochs, no early stop.
SLOW = {"train_weeks": 28, "overrides": [*TINY, "train.epochs=150", "train.patience=1000"], "gate_margin": 0.0}
WORKERS = {"worker-1", "worker-2"}


def _mlflow(stack: ProdStack):
    import mlflow

    return mlflow.MlflowClient(stack.mlflow_url, stack.mlflow_url)


def _versions_of(stack: ProdStack, airflow_run_id: str) -> list:
    return _mlflow(stack).search_model_versions(f"name='hm-recsys-two-tower' and tags.airflow_run_id='{airflow_run_id}'")


def _training_runs(stack: ProdStack, airflow_run_id: str) -> list:
    client = _mlflow(stack)
    exp = client.get_experiment_by_name("hm-recsys")
    return client.search_runs([exp.experiment_id], f"tags.airflow_run_id = '{airflow_run_id}'")


def _one_gate_state(stack: ProdStack, airflow_run_id: str, version: str) -> None:
    """The run's gate state of its version exists once, complete, and no half-written copy lies beside it."""
    from hm_recsys.pipeline import run_key

    gate = stack.data_root / "runs" / run_key(airflow_run_id) / "gate"
    built = {p.name for p in gate.iterdir()}
    assert f"v{version}" in built and all(b == f"v{version}" or b.startswith("champion-") for b in built), built
    assert (gate / f"v{version}" / "manifest.json").is_file()
    assert not [p for p in gate.parent.rglob("*") if ".tmp" in p.name or p.name.startswith(".staged")]


@pytest.fixture(scope="module")
def data(prodstack: ProdStack, tmp_path_factory) -> dict:
    """Tiny data: the history ingested into the shared warehouse, the last week waiting as a drop."""
    from hm_recsys.data.ingest import ingest_history
    from hm_recsys.data.synthetic import generate

    raw = tmp_path_factory.mktemp("prodstack_raw")
    generate(raw, scale="tiny", seed=7, progress=False, drop_weeks=1)
    (drop,) = sorted((raw / "drops").glob("transactions_*.csv"))
    ingest_history(raw, prodstack.data_root / "data" / "warehouse", progress=False)
    return {"drop": drop, "week": dt.date.fromisoformat(drop.stem.removeprefix("transactions_"))}


def test_drop_then_retrain_end_to_end_on_two_workers_and_the_service_answers_with_the_promoted_version(
        prodstack: ProdStack, data):
    import httpx

    s = prodstack
    s.unpause("hm_ingest", "hm_retrain")
    incoming = s.data_root / "data" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / data["drop"].name).write_bytes(data["drop"].read_bytes())

    t0 = time.monotonic()
    ingest = s.trigger("hm_ingest")
    s.wait_run("hm_ingest", ingest)
    s.timings["hm_ingest"] = time.monotonic() - t0
    (outcome,) = s.xcom("hm_ingest", ingest, "process_drops")
    assert outcome["status"] == "accepted", outcome

    t0 = time.monotonic()
    run = s.trigger("hm_retrain", FAST)
    s.wait_run("hm_retrain", run)
    s.timings["hm_retrain"] = time.monotonic() - t0

    tasks = {**{f"ingest.{k}": v for k, v in s.tasks("hm_ingest", ingest).items()}, **s.tasks("hm_retrain", run)}
    ran = {t: ti["hostname"] for t, ti in tasks.items() if ti["state"] == "success"}
    assert set(ran.values()) == WORKERS, f"tasks ran on {ran}: want both workers"
    assert tasks["promote"]["state"] == "success" and tasks["deploy"]["state"] == "success", tasks
    assert all(ti["try_number"] == 1 for ti in tasks.values() if ti["state"] == "success")

    # XCom holds ids and paths relative to the shared data root: meaningful on any worker host
    trained = s.xcom("hm_retrain", run, "train")
    for key in ("warehouse", "bundle_dir"):
        assert not Path(trained[key]).is_absolute(), trained
    # the workers talked to MLflow over HTTP only: artifacts are proxied, not file paths of the server
    client = _mlflow(s)
    assert client.get_experiment_by_name("hm-recsys").artifact_location.startswith("mlflow-artifacts:")
    (version,) = _versions_of(s, run)
    assert client.get_model_version_by_alias("hm-recsys-two-tower", "champion").version == version.version

    deployed = s.xcom("hm_retrain", run, "deploy")
    meta = httpx.get(f"{s.serve_url}/metadata", timeout=10).json()
    assert str(meta["model_version"]) == version.version and meta["as_of"] == deployed["as_of"], meta
    assert deployed["as_of"] == (data["week"] + dt.timedelta(weeks=1)).isoformat()  # the drop's week included
    # the service fetched its files through MLflow into its own folder, not from a worker's
    assert (s.host("serve") / "models" / version.version / "served" / deployed["as_of"] / "manifest.json").is_file()
    answer = httpx.post(f"{s.serve_url}/recommend", json={"customer_id": "f" * 64, "top_k": 5}, timeout=10)
    assert answer.status_code == 200 and len(answer.json()["recommendations"]) == 5, answer.text
    assert answer.json()["model_version"] == version.version


def test_a_worker_killed_during_train_is_retried_on_the_other_and_leaves_one_version(prodstack: ProdStack, data):
    s = prodstack
    t0 = time.monotonic()
    run = s.trigger("hm_retrain", SLOW)
    ti = s.wait_task("hm_retrain", run, "train", {"running"})
    first = ti["hostname"]
    assert first in WORKERS
    # mid-training: its MLflow run is open and the epochs have begun
    wait_for(lambda: any(r.info.status == "RUNNING" and r.data.metrics for r in _training_runs(s, run)),
             "the training run's first epoch in MLflow", s.diagnosis, TIMEOUT, every=0.5)
    s.kill(first)  # kill -9 of the worker's whole process tree: the host is gone
    s.timings["kill_worker.killed_at"] = time.monotonic() - t0
    s.wait_run("hm_retrain", run)
    s.timings["kill_worker"] = time.monotonic() - t0

    tries = s.tries("hm_retrain", run, "train")
    assert [t["try_number"] for t in tries] == [1, 2], tries
    assert tries[0]["hostname"] == first and tries[1]["hostname"] == (WORKERS - {first}).pop(), tries
    (version,) = _versions_of(s, run)  # exactly one registered version
    runs = _training_runs(s, run)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"], [r.info for r in runs]
    _one_gate_state(s, run, version.version)
    states = json.loads(version.tags.get("served_states", "[]"))
    assert len(states) == len(set(states)) <= 1
    s.script("start")  # brings the killed worker back (the others are left running)
    assert s.alive(first)


def test_the_scheduler_restarted_mid_run_and_the_run_completes(prodstack: ProdStack, data):
    s = prodstack
    t0 = time.monotonic()
    run = s.trigger("hm_retrain", FAST)
    s.wait_task("hm_retrain", run, "train", {"running"})
    s.kill("airflow-scheduler", signal.SIGTERM)
    assert not s.alive("airflow-scheduler")
    s.script("start")  # starts the scheduler again
    s.wait_run("hm_retrain", run)
    s.timings["restart_scheduler"] = time.monotonic() - t0
    (version,) = _versions_of(s, run)
    _one_gate_state(s, run, version.version)
    assert [r.info.status for r in _training_runs(s, run)] == ["FINISHED"]


def test_mlflow_down_during_register_fails_clearly_is_retried_and_registers_once(prodstack: ProdStack, data):
    s = prodstack
    t0 = time.monotonic()
    run = s.trigger("hm_retrain", FAST)
    s.wait_task("hm_retrain", run, "train", {"success"}, every=0.2)
    s.kill("mlflow")
    s.wait_task("hm_retrain", run, "register", {"up_for_retry"})
    log = s.task_log("hm_retrain", run, "register", 1)
    assert "the MLflow tracking server" in log and "does not answer" in log, log[-3000:]
    s.script("start")  # MLflow back
    s.wait_run("hm_retrain", run)
    s.timings["mlflow_down"] = time.monotonic() - t0
    assert [t["try_number"] for t in s.tries("hm_retrain", run, "register")] == [1, 2]
    (version,) = _versions_of(s, run)
    _one_gate_state(s, run, version.version)
    print("prodstack timings (s):", {k: round(v, 1) for k, v in s.timings.items()})
