"""An accepted drop refreshes the running service through the real Airflow scheduler.

No ``dag.test()``: the local stack as ``scripts/stack.sh`` runs it, four
Airflow processes (api-server, scheduler, dag-processor, triggerer) on
127.0.0.1 with this repo's airflow.cfg, a sqlite MLflow registry and
``hm-recsys serve``, all under one temporary runtime folder and all stopped
by PID (process group) at the end.

The story: the tiny dataset is generated with its last week held back as a
drop file; the history is ingested; a tiny champion serves a state as of
the warehouse's newest week. The drop lands in ``incoming/``, ``hm_ingest`` is
triggered over the REST API and accepts it, its ``hm_recsys_transactions``
Asset event makes the scheduler start ``hm_refresh``, which scores the
drop's week (live quality), rebuilds the champion's state as of that week
and switches the running service to it, while client threads hammer
``/recommend``. The service polls the registry only every 600 s, so the
swap can only come from the DAG's ``switch_service`` task.

``hm_retrain`` stays paused (DAGs are created paused here; the test unpauses
``hm_ingest`` and ``hm_refresh`` only). Unpausing ``hm_ingest`` makes the
scheduler start its latest hourly run at once; it runs on an empty
``incoming/`` and must emit no Asset event, and the test waits for it before
the drop arrives, so the triggered run is the one that takes the drop (or,
should an hour boundary pass meanwhile, possibly the next hourly run: the
test then accepts that one, as long as exactly one run took it). Every
task must succeed at its first try.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hm_recsys.procs import free_port, kill_tree
from tests.dags.conftest import airflow_env
from tests.integration.conftest import Hammer, ServedModels, ServerProcess, publish, tiny_config, wait_for

UNKNOWN = "f" * 64  # a well-formed customer id nobody has

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "test-admin-token-scheduler-0123456789"
TIMEOUT = 300.0  # seconds for each wait on Airflow; the whole test takes well under that
TERMINAL = {"success", "failed"}


# ---------------------------------------------------------------------------
# The Airflow stack: four processes, each in its own process group
# ---------------------------------------------------------------------------
class AirflowStack:
    """``airflow api-server``, ``scheduler``, ``dag-processor`` and ``triggerer``, stopped by PID (group)."""

    PARTS = {
        "api-server": ["api-server"],
        "scheduler": ["scheduler", "--skip-serve-logs"],
        "dag-processor": ["dag-processor"],
        "triggerer": ["triggerer", "--skip-serve-logs"],
    }

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.airflow_home = Path(env["AIRFLOW_HOME"])
        self.url = f"http://127.0.0.1:{env['HM_RECSYS_AIRFLOW_PORT']}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list = []
        self._client = None

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"airflow-{name}.log", "wb")
        self._files.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def migrate(self) -> subprocess.Popen:
        """``airflow db migrate`` in the background (it overlaps with training the champion)."""
        return self._popen("db-migrate", ["db", "migrate"])

    def start(self) -> None:
        for name, args in self.PARTS.items():
            self._popen(name, args)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in reversed(self.procs.values()):
            kill_tree(proc)
        for f in self._files:
            f.close()

    def check_alive(self) -> None:
        for name in self.PARTS:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"airflow {name} exited with {proc.returncode}\n{self.diagnosis()}")

    def wait_healthy(self) -> None:
        import httpx

        def healthy() -> bool:
            self.check_alive()
            try:
                r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["scheduler"]["status"] == "healthy"

        wait_for(healthy, "the Airflow API server and scheduler to be healthy", self.diagnosis)

    @property
    def api(self):
        """An httpx client of the REST API, authenticated as the admin of SimpleAuthManager's password file."""
        import json

        import httpx

        if self._client is None:
            pw_file = self.airflow_home / "simple_auth_manager_passwords.json.generated"
            wait_for(lambda: pw_file.is_file() and pw_file.stat().st_size > 0,
                     "the generated admin password file", self.diagnosis)
            r = httpx.post(f"{self.url}/auth/token", timeout=30,
                           json={"username": "admin", "password": json.loads(pw_file.read_text())["admin"]})
            assert r.status_code == 201, r.text
            self._client = httpx.Client(base_url=f"{self.url}/api/v2", timeout=30,
                                        headers={"Authorization": f"Bearer {r.json()['access_token']}"})
        return self._client

    def get(self, path: str, **params) -> dict:
        r = self.api.get(path, params=params)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns", order_by="run_after")["dag_runs"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """State of each task of a run; a task that needed a retry is named ``<task_id>#<try>``."""
        tis = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"] + ("" if ti["try_number"] <= 1 else f"#{ti['try_number']}"): ti["state"] for ti in tis}

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        import json

        value = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")["value"]
        return json.loads(value) if isinstance(value, str) else value

    def wait_run_done(self, dag_id: str, run_id: str) -> dict:
        def done() -> dict | None:
            self.check_alive()
            run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in TERMINAL else None

        run = wait_for(done, f"{dag_id} run {run_id} to finish", self.diagnosis)
        assert run["state"] == "success", (f"{dag_id} run {run_id}: {run['state']}, tasks "
                                           f"{self.task_states(dag_id, run_id)}\n{self.diagnosis()}")
        return run

    def diagnosis(self) -> str:
        """The tails of every task log and every process log, for a failure message."""
        out = []
        for path in sorted((self.airflow_home / "logs").glob("dag_id=*/**/*.log")):
            out.append(f"--- {path.relative_to(self.airflow_home)}\n{path.read_text(errors='replace')[-3000:]}")
        for path in sorted(self.logs.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2500:]}")
        return "\n".join(out)


# ---------------------------------------------------------------------------
# The scenario, run once; the tests below check its outcome
# ---------------------------------------------------------------------------
@dataclass
class Outcome:
    models: ServedModels  # the runtime folder; versions = (champion, champion): no other version here
    drop_week: dt.date
    before_drop: list[tuple[dict, dict[str, str | None]]]  # hm_ingest runs before the drop, with task states
    triggered: dict  # the hm_ingest run triggered over the REST API once the drop was in incoming/
    acceptors: list[tuple[dict, dict[str, str | None], list[dict]]]  # runs that announced data: tasks, outcomes
    refresh_runs: list[dict]
    refresh_tasks: dict[str, str | None]
    refresh_xcom: dict[str, dict]
    upstream_events: list[dict]
    retrain: dict
    metadata: tuple[dict, dict]  # /metadata before the drop, and after the refresh
    answers: list[tuple[str, str, str, list[str]]]
    failures: list[str]
    customers: list[str]


def _train_champion(home: Path, wh) -> tuple[str, list[str], list[str], dt.date]:
    """A tiny model (tests/integration/conftest.py's recipe) published as of the newest week and promoted."""
    from hm_recsys import bundle, train
    from hm_recsys.config import Settings
    from hm_recsys.registry import Registry
    from hm_recsys.split import Split

    settings = Settings.from_env({"HM_RECSYS_HOME": str(home)})
    cfg = tiny_config(seed=1)
    split = Split.from_warehouse(wh, train_weeks=cfg.train.train_weeks)
    prep = train.prepare(wh, split, cfg, home / "scratch", progress=False)
    model, _, _ = train.fit(prep, cfg, progress=False)
    fusion = train.fit_fusion(model, prep, cfg, wh, home / "scratch", "seed1", progress=False)
    rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
    full = {"features": cfg.features.to_dict(), "model": model.config.to_dict(),
            "train": dataclasses.asdict(cfg.train), "retrieval": cfg.retrieval.to_dict()}
    out = bundle.save(home / "bundles" / "champion", rec, full, prep.data_window,
                      {"holdout": {"served": {"recall@12": 0.0}}, "seed": 1}, fusion=fusion)
    as_of = wh.last_complete_week() + dt.timedelta(weeks=1)  # the newest ingested week, as the pipeline says it
    version = publish(settings, out, "scheduler-test-champion", wh, as_of)
    shutil.rmtree(home / "scratch", ignore_errors=True)
    Registry(settings).promote(version)
    return (version, [str(c) for c in prep.tables.customer_index[:50]], [str(a) for a in prep.tables.article_index],
            as_of)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Outcome:
    import httpx

    from hm_recsys.data.ingest import ingest_history
    from hm_recsys.data.synthetic import generate
    from hm_recsys.data.warehouse import Warehouse

    root = tmp_path_factory.mktemp("scheduler")
    home = root / "var"
    logs = root / "logs"
    for d in (home / "airflow", logs):
        d.mkdir(parents=True)
    raw = root / "raw"
    generate(raw, scale="tiny", seed=7, progress=False, drop_weeks=1)
    (drop,) = sorted((raw / "drops").glob("transactions_*.csv"))
    drop_week = dt.date.fromisoformat(drop.stem.removeprefix("transactions_"))

    # only the runtime folder is known yet (for env()); the rest is filled in once the champion is trained
    models = ServedModels(home, ("", ""), (), (), ("", ""))
    af = {k: v for k, v in airflow_env(home).items() if k.startswith(("HM_RECSYS_", "AIRFLOW"))}
    af.update(
        HM_RECSYS_AIRFLOW_PORT=str(free_port()),
        AIRFLOW__API__SECRET_KEY=secrets.token_urlsafe(32),
        AIRFLOW__CORE__FERNET_KEY=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",  # hm_retrain must never start here
        GX_ANALYTICS_ENABLED="false",
        HM_RECSYS_ADMIN_TOKEN=TOKEN,
    )
    stack = AirflowStack(models.env(**af), logs)
    server = None
    try:
        migrate = stack.migrate()
        ingest_history(raw, home / "data" / "warehouse", progress=False)
        wh = Warehouse(home / "data" / "warehouse")
        assert wh.last_complete_week() + dt.timedelta(weeks=1) == drop_week  # the drop is the next week
        version, known, articles, old_as_of = _train_champion(home, wh)
        new_as_of = drop_week + dt.timedelta(weeks=1)
        models = dataclasses.replace(models, versions=(version, version), known_customers=tuple(known),
                                     article_ids=tuple(articles), as_of=(old_as_of.isoformat(), new_as_of.isoformat()))
        # the service is started (and its port chosen) before Airflow, whose switch task must talk to it;
        # polling every 600 s: the swap must come from hm_refresh's switch_service task
        server = ServerProcess(models.env(HM_RECSYS_ADMIN_TOKEN=TOKEN, HM_RECSYS_SERVE_POLL_SECONDS="600"),
                               logs / "service.log")
        stack.env["HM_RECSYS_SERVE_PORT"] = str(server.port)
        assert migrate.wait(timeout=TIMEOUT) == 0, stack.diagnosis()
        stack.start()
        server.wait_ready(timeout=TIMEOUT)
        before = httpx.get(f"{server.url}/metadata", timeout=10).json()

        stack.wait_healthy()
        wait_for(lambda: all(stack.api.get(f"/dags/{d}").status_code == 200
                             for d in ("hm_ingest", "hm_refresh", "hm_retrain")),
                 "the dag-processor to register the DAGs", stack.diagnosis)
        for dag_id in ("hm_refresh", "hm_ingest"):
            r = stack.api.patch(f"/dags/{dag_id}", json={"is_paused": False})
            assert r.status_code == 200 and r.json()["is_paused"] is False, r.text
        # unpausing starts hm_ingest's latest hourly run: on an empty incoming/, before the drop arrives
        before_drop = []
        for run in wait_for(lambda: stack.runs("hm_ingest"), "hm_ingest's scheduled run", stack.diagnosis):
            run = stack.wait_run_done("hm_ingest", run["dag_run_id"])
            before_drop.append((run, stack.task_states("hm_ingest", run["dag_run_id"])))

        incoming = models.settings.layout.incoming_dir
        incoming.mkdir(parents=True, exist_ok=True)
        shutil.copy2(drop, incoming / drop.name)
        ids = [*known[:20], UNKNOWN]
        with Hammer(server.url, ids, clients=3) as hammer:
            r = stack.api.post("/dags/hm_ingest/dagRuns", json={"logical_date": None, "note": "a drop arrived"})
            assert r.status_code == 200, r.text
            triggered = stack.wait_run_done("hm_ingest", r.json()["dag_run_id"])
            refresh = wait_for(lambda: stack.runs("hm_refresh"), "the Asset to trigger hm_refresh", stack.diagnosis)
            refresh_run = stack.wait_run_done("hm_refresh", refresh[-1]["dag_run_id"])
        after = httpx.get(f"{server.url}/metadata", timeout=10).json()

        # Normally the triggered run is the one that accepts the drop; if an hour boundary passed meanwhile, the
        # next hourly run may have started first and taken it (max_active_runs=1: one after the other).
        seen = {run["dag_run_id"] for run, _ in before_drop}
        acceptors = []
        for run in stack.runs("hm_ingest"):
            if run["dag_run_id"] not in seen:
                run = stack.wait_run_done("hm_ingest", run["dag_run_id"])
                tasks = stack.task_states("hm_ingest", run["dag_run_id"])
                if tasks.get("publish") == "success":
                    acceptors.append((run, tasks, stack.xcom("hm_ingest", run["dag_run_id"], "process_drops")))
        rid = refresh_run["dag_run_id"]
        return Outcome(
            models=models, drop_week=drop_week, before_drop=before_drop, triggered=triggered, acceptors=acceptors,
            refresh_runs=stack.runs("hm_refresh"),
            refresh_tasks=stack.task_states("hm_refresh", rid),
            refresh_xcom={t: stack.xcom("hm_refresh", rid, t)
                          for t in ("live_quality", "refresh_state", "switch_service")},
            upstream_events=stack.get(f"/dags/hm_refresh/dagRuns/{rid}/upstreamAssetEvents")["asset_events"],
            retrain={"dag": stack.get("/dags/hm_retrain"), "runs": stack.runs("hm_retrain")},
            metadata=(before, after), answers=list(hammer.answers), failures=list(hammer.failures),
            customers=ids,
        )
    finally:
        if server is not None:
            server.stop()
        stack.stop()


# ---------------------------------------------------------------------------
# What must hold
# ---------------------------------------------------------------------------
def test_the_accepted_drop_triggers_hm_refresh_through_the_asset(outcome):
    # the scheduled run on an empty incoming/ accepted nothing, so it announced nothing
    assert outcome.before_drop and all(run["run_type"] == "scheduled" for run, _ in outcome.before_drop)
    assert all(tasks == {"process_drops": "success", "any_accepted": "success", "publish": "skipped",
                         "fail_on_rejects": "success"} for _, tasks in outcome.before_drop), outcome.before_drop
    assert outcome.triggered["run_type"] == "manual"
    # one hm_ingest run (the triggered one, unless an hourly run came first) accepted the drop and announced it
    ((run, tasks, outcomes),) = outcome.acceptors
    assert run["dag_run_id"] == outcome.triggered["dag_run_id"] or run["run_type"] == "scheduled"
    assert [(o["file"], o["status"], o["week"]) for o in outcomes] == [
        (f"transactions_{outcome.drop_week}.csv", "accepted", outcome.drop_week.isoformat())], outcomes
    assert tasks == {"process_drops": "success", "any_accepted": "success", "publish": "success",
                     "fail_on_rejects": "success"}
    # exactly one refresh, started by the scheduler for the Asset event of that run
    (refresh,) = outcome.refresh_runs
    assert refresh["run_type"] == "asset_triggered" and refresh["state"] == "success"
    assert [(e["uri"], e["source_dag_id"], e["source_run_id"], e["source_task_id"])
            for e in outcome.upstream_events] == [("hm_recsys_transactions", "hm_ingest", run["dag_run_id"], "publish")]
    assert outcome.refresh_tasks == {"live_quality": "success", "refresh_state": "success",
                                     "switch_service": "success"}
    # hm_retrain was never let loose
    assert outcome.retrain["dag"]["is_paused"] is True and outcome.retrain["runs"] == []


def test_the_service_serves_the_newest_week_with_zero_failed_requests(outcome):
    m = outcome.models
    version = m.versions[0]
    old, new = m.as_of
    assert new == (outcome.drop_week + dt.timedelta(weeks=1)).isoformat()  # the newest ingested week, as of
    before, after = outcome.metadata
    assert (before["model_version"], before["as_of"]) == (version, old)
    assert (after["model_version"], after["as_of"]) == (version, new)
    refreshed, switched = outcome.refresh_xcom["refresh_state"], outcome.refresh_xcom["switch_service"]
    assert (refreshed["version"], refreshed["as_of"], refreshed["status"]) == (version, new, "built")
    assert (switched["status"], switched["model_version"], switched["as_of"]) == ("switched", version, new)

    assert outcome.failures == []
    assert len(outcome.answers) > 50
    seen = [a for _, _, a, _ in outcome.answers]
    assert set(seen) == {old, new} and seen.index(new) > 0
    assert all(v == version for _, v, _, _ in outcome.answers)
    # each answer is exactly what the evaluation scores on the published state it came from
    want = {a: m.state(version, a).predictions(outcome.customers, k=12) for a in (old, new)}
    assert sum(want[old][c] != want[new][c] for c in outcome.customers) > 0  # the two states tell apart
    mixed = [(c, a) for c, _, a, arts in outcome.answers if arts != want[a][c]]
    assert mixed == [], f"{len(mixed)} of {len(outcome.answers)} answers differ from their state's own answer"


def test_the_registry_and_the_monitoring_run_record_the_refresh(outcome):
    import mlflow

    from hm_recsys.monitor import MONITOR_TAG, SCORED_TAG, week_step
    from hm_recsys.registry import Registry

    m = outcome.models
    version = m.versions[0]
    old, new = m.as_of
    settings = m.settings
    reg = Registry(settings)
    assert reg.served_as_of(version) == new
    assert reg.served_states(version) == [old, new]
    # the drop's week was scored on the state that served it (as of that week), into the champion's monitoring run
    quality = outcome.refresh_xcom["live_quality"]
    assert (quality["status"], quality["version"]) == ("scored", version)
    assert [(w["week"], w["as_of"]) for w in quality["weeks"]] == [(outcome.drop_week.isoformat(), old)]
    assert reg.version(version).tags[SCORED_TAG] == f'["{outcome.drop_week.isoformat()}"]'
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(settings.experiment_name).experiment_id],
                                f"tags.{MONITOR_TAG} = '{version}'")
    history = client.get_metric_history(run.info.run_id, "live.recall_at_12")
    assert [(h.step, h.value) for h in history] == [
        (week_step(outcome.drop_week), quality["weeks"][0]["served_recall_at_12"])]
